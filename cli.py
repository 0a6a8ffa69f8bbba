"""``python cli.py COMMAND ...`` from a checkout: the thin entry point the README uses.

The command line itself lives in ``retrieval/cli/`` (one module per group of commands) (installed, it is the ``dinov2-gallery`` command).
"""

from retrieval.cli import app, main  # noqa: F401  (tests and scripts use cli.app / cli.main)

if __name__ == "__main__":
    main()
