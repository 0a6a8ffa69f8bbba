"""Command line: ``python cli.py COMMAND ...`` in a checkout, or the ``dinov2-gallery`` console script.

The only module that turns the library's exceptions into messages and exit codes:
exit 0 success, 1 a check that ran and failed (``verify``), 2 bad input (one line on stderr naming it),
130 interrupted (Ctrl-C), 143 stopped by SIGTERM.

The commands live in modules by what they do (``cmd_encoder``, ``cmd_ingest``, ``cmd_search``, ``cmd_upkeep``,
``cmd_export``), registered on one Typer app (``common.app``) when this package is imported; ``main`` is the
entry point.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import typer

from retrieval.errors import RetrievalError

from . import cmd_encoder, cmd_ingest, cmd_search, cmd_upkeep, cmd_export  # noqa: F401  (they register their commands)
from .common import _DB_IN_USE, app

__all__ = ["app", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the same clean stop as Ctrl-C (an ingest records its run
    'interrupted'), then exit 143."""


def _on_sigterm(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _interruption(exc) -> Optional[BaseException]:
    """The KeyboardInterrupt behind an exit (typer turns Ctrl-C into a silent exit 130), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main() -> None:
    # Pillow warns on stderr about any image declaring more than its MAX_IMAGE_PIXELS, before our own
    # size check (decode.py) turns that image into a one-line "too-large" failure: the warning is noise.
    # Set here, once, before any thread starts (the library leaves the warnings filters alone).
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # nothing printed reaches the terminal raw: control and bidi characters from file names, URLs, servers
    # and CSV cells are shown escaped (\u001b), JSON output stays valid (retrieval/safety.py)
    from retrieval.safety import SafeTextStream

    sys.stdout, sys.stderr = SafeTextStream(sys.stdout), SafeTextStream(sys.stderr)
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            app()
        except SystemExit as exc:
            interrupt = _interruption(exc)
            if interrupt is None:
                raise
            raise interrupt from None
    except RetrievalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # a SQLite error from the gallery (damaged, locked, older schema): one line
        from retrieval.store import SQLITE_ERRORS

        if not isinstance(exc, SQLITE_ERRORS):
            raise
        from retrieval.dbopen import explain

        typer.echo(f"Error: {explain(_DB_IN_USE[0] if _DB_IN_USE else 'database', exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            typer.echo("Interrupted (SIGTERM).", err=True)
            sys.exit(143)
        typer.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
