"""What every command module of the CLI shares: the Typer app, the options, opening the gallery, progress.

Errors are raised as the library's exceptions; ``retrieval/cli/__init__.py`` (``main``) alone turns them into
messages and exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

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


# ---------------------------------------------------------------- options and helpers of the encoder commands

WeightsOpt = typer.Option(None, "--weights", "-w", help="Weights file (.safetensors, .npz, .pth), or a variant name (small, base, large, giant, +'-reg'): its cached copy, downloaded if missing. Default: $DINOV2_WEIGHTS, ./vit-dinov2-base.npz, the cache, else download.")
PreprocessOpt = typer.Option("resize-short", "--preprocess", help="resize-short (short side 224, sides rounded to 14), center-crop (central 224x224), hf (transformers' processor).")
InterpolationOpt = typer.Option("hf", "--interpolation", help="Position-table interpolation: hf (transformers, the default) or official (facebookresearch/dinov2).")
PoolingOpt = typer.Option("cls", "--pooling", help="cls (CLS token after the final LayerNorm), mean (mean of patch tokens) or concat (both).")
BatchOpt = typer.Option(8, "--batch-size", "-b", help="Images encoded together.")
PrecisionOpt = typer.Option("float32", "--precision", help="float32, or float64 for verification.")
OfflineOpt = typer.Option(False, "--offline", help="Never download weights (also: DINOV2_OFFLINE=1).")


def _encoder(weights, preprocess="resize-short", interpolation="hf", pooling="cls", batch_size=8,
             precision="float32", offline=False):
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.hub import resolve_weights

    settings = EncoderSettings(preprocess=preprocess, interpolation=interpolation, pooling=pooling,
                               batch_size=batch_size, precision=precision)
    path = resolve_weights(weights, allow_download=not offline)
    return load_encoder(path, settings)


EMBED_WINDOW_BATCHES = 32  # embed decodes this many batches' worth of files at a time, not every file at once


def _pixels(paths, route):
    from retrieval.decode import open_path
    from retrieval.preprocess import preprocess

    return [preprocess(open_path(p), route) for p in paths]




# ---------------------------------------------------------------- options and helpers of the gallery commands

AllowPrivateOpt = typer.Option(False, "--allow-private", help="Also download from loopback, private and link-local addresses (your LAN); the same as DINOV2_ALLOW_PRIVATE=1.")
DbOpt = typer.Option(None, "--db", help="Gallery database. Default: $DINOV2_DB, else gallery.db in the working directory.")


def _db_path(db: Optional[Path]) -> Path:
    return Path(db or os.environ.get("DINOV2_DB") or "gallery.db")


_DB_IN_USE: list = []  # the database the command works on, for main()'s one-line SQLite errors


def _open_db(db: Optional[Path], must_exist: bool = False, readonly: bool = False):
    """(path, connection). ``readonly``: the gallery must exist and is opened read-only (nothing created or
    migrated; a file that is not a gallery is refused). Otherwise (ingest) the file is looked at read-only
    first: only a missing/blank file or an undamaged gallery is opened for writing."""
    from retrieval import dbopen, store
    from retrieval.errors import InputError

    path = _db_path(db)
    _DB_IN_USE[:] = [path]
    if (must_exist or readonly) and not path.exists():
        raise InputError(f"{path}: no such gallery database (run: python cli.py ingest --csv FILE --db {path})")
    if readonly:
        return path, store.connect(path, readonly=True)
    dbopen.check_for_writing(path)
    return path, store.connect(path)


class _Progress:
    """On a terminal: one self-rewriting status line on stderr. Otherwise (a log file, a pipe): a plain line on
    stderr every ``every`` seconds."""

    def __init__(self, enabled: bool, every: float = 10.0):
        self.tty = sys.stderr.isatty()
        self.enabled = enabled and (self.tty or every > 0)
        self.every = every
        self.shown = False
        self.told = False
        self.last = None

    def __call__(self, s):
        if not self.enabled:
            return
        rate = s.images_per_s
        eta = ""
        if s.total and rate > 0 and s.done < s.total:
            left = (s.total - s.done) / max(rate, s.done / max(s.seconds, 1e-9))
            eta = f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
        total = f"/{s.total}" if s.total else ""
        if not self.told and getattr(s, "url_column", None):  # say at once which column the URLs come from
            self.told = True
            sys.stderr.write(f"URLs from column '{s.url_column}' ({s.url_column_how})\n")
        text = (f"{s.done}{total}  new {s.new}  skipped {s.skipped}  failed {s.failed}"
                f"  duplicate {s.duplicate}  {rate:.2f} img/s{eta}")
        if self.tty:
            out = getattr(sys.stderr, "raw", sys.stderr)  # our own \r and erase-line, past the cleaning stream
            out.write(f"\r{text}\033[K")
            out.flush()
            self.shown = True
            return
        if self.last is None:
            self.last = s.seconds
        elif s.seconds - self.last >= self.every:
            self.last = s.seconds
            sys.stderr.write(f"progress {s.seconds:.0f} s: {text}\n")
            sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write("\n")


def _summary_line(s, db_path) -> str:
    line = (f"{s.status}: {s.new} new, {s.skipped} skipped, {s.failed} failed, {s.duplicate} duplicate"
            f" in {s.seconds:.1f} s ({s.images_per_s:.2f} images/s) -> {db_path} (run {s.run_id})")
    if getattr(s, "url_column", None):
        line += f"\nURLs from column '{s.url_column}' ({s.url_column_how})"
    if s.reasons:
        line += "\nfailed: " + ", ".join(f"{tag} x{n}" for tag, n in sorted(s.reasons.items(), key=lambda kv: -kv[1]))
    return line
