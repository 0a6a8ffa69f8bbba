"""Command line: ``python cli.py COMMAND ...`` in a checkout, or the ``dinov2-retrieval`` console script.

The only module that turns the library's exceptions into messages and exit codes:
exit 0 success, 1 a check that ran and failed (``verify``), 2 bad input (one line on stderr naming it),
130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from retrieval.errors import RetrievalError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Pure-NumPy DINOv2 image search: encode images, store vectors in SQLite + sqlite-vec, query by image.",
)
weights_app = typer.Typer(no_args_is_help=True, help="Get, inspect and convert DINOv2 weights files.")
app.add_typer(weights_app, name="weights")


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- weights


# ---------------------------------------------------------------- encoder: embed, verify


# ---------------------------------------------------------------- gallery: ingest, query, stats


def main() -> None:
    try:
        app()
    except RetrievalError as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
