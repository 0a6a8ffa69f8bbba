"""Command line: ``python cli.py COMMAND ...`` in a checkout, or the ``dinov2-gallery`` console script.

The only module that turns the library's exceptions into messages and exit codes:
exit 0 success, 1 a check that ran and failed (``verify``), 2 bad input (one line on stderr naming it),
130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import os
import sys
import warnings
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


@weights_app.command("download")
def weights_download(
    variant: str = typer.Option("base", "--variant", help="small, base, large, giant, or one of them + '-reg'."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache directory. Default: $DINOV2_CACHE, else ~/.cache/dinov2-retrieval."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 (default: the pinned hash of the variant, if any)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Download a variant's model.safetensors from the hub ($DINOV2_HUB_URL) into the cache; print its path."""
    from retrieval.hub import download

    typer.echo(str(download(variant, cache, sha256=sha256, progress=not quiet)))


@weights_app.command("convert")
def weights_convert(
    src: Path = typer.Argument(..., help="Weights file: .safetensors, .npz or .pth (official or transformers names)."),
    dst: Path = typer.Argument(..., help="Output: .safetensors or .npz, in hub names, float32."),
):
    """Convert a weights file to .safetensors or .npz (hub names, float32)."""
    from retrieval.weights import convert

    cfg = convert(src, dst)
    typer.echo(f"{dst}: {cfg.description}")


@weights_app.command("info")
def weights_info(
    path: Optional[str] = typer.Argument(None, help="Weights file or variant name. Default: resolved like every command."),
    offline: bool = typer.Option(False, "--offline", help="Never download weights (also: DINOV2_OFFLINE=1)."),
):
    """Show a weights file's format, model, parameter count and sha256."""
    from retrieval.hub import resolve_weights
    from retrieval.weights import describe

    info = describe(resolve_weights(path, allow_download=not offline))
    cfg = info.config
    official = f"  (the official {info.official} weights)" if info.official else ""
    for label, value in (
        ("path", str(info.path)),
        ("format", f"{info.format} ({', '.join(info.dtypes) or 'empty'}), {info.size / 1e6:.1f} MB"),
        ("model", cfg.description),
        ("positions", f"{cfg.grid}x{cfg.grid} grid ({cfg.grid * cfg.patch}x{cfg.grid * cfg.patch} input)"),
        ("params", f"{info.n_params:,}"),
        ("sha256", info.sha256 + official),
    ):
        typer.echo(f"{label:<10} {value}")


@weights_app.command("path")
def weights_path():
    """Print the weights file commands use without --weights ($DINOV2_WEIGHTS, ./vit-dinov2-base.npz, the cache); never downloads."""
    from retrieval.hub import resolve_weights

    typer.echo(str(resolve_weights(None, allow_download=False)))


# ---------------------------------------------------------------- encoder: embed, verify

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


@app.command()
def embed(
    images: List[Path] = typer.Argument(..., help="Image files, encoded in this order."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy: float32 (N, D) raw features, one row per image."),
    weights: Optional[str] = WeightsOpt,
    preprocess: str = PreprocessOpt,
    interpolation: str = InterpolationOpt,
    pooling: str = PoolingOpt,
    batch_size: int = BatchOpt,
    precision: str = PrecisionOpt,
    offline: bool = OfflineOpt,
):
    """Encode image files into a .npy of raw (not normalised) features."""
    import numpy as np

    from retrieval.encoder import encode_pixels
    from retrieval.errors import InputError

    # checked before any encoding work: a typo in the output folder must not cost the whole run
    folder = out.parent
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder, not a file name")
    if not folder.is_dir():
        raise InputError(f"--out {out}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {out}: cannot write in {folder}")
    encoder = _encoder(weights, preprocess, interpolation, pooling, batch_size, precision, offline)
    feats = np.empty((len(images), encoder.dim), np.float32)  # (N, D)
    window = EMBED_WINDOW_BATCHES * encoder.settings.batch_size  # images decoded and held at a time
    for start in range(0, len(images), window):
        part = images[start:start + window]
        feats[start:start + len(part)] = encode_pixels(encoder, _pixels(part, preprocess))
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(out)
    typer.echo(f"{out}: {feats.shape[0]} x {feats.shape[1]} float32 ({encoder.model.cfg.variant}, {preprocess}, {interpolation}, {pooling})")


BEHAVIOURS = {
    "size": "size (transformers Dinov2Model)",
    "offset": "offset 0.1 (official dinov2)",
    "antialias": "antialias (register variants)",
}


@app.command()
def verify(
    images: List[Path] = typer.Argument(..., help="The images the reference features were computed from, in row order."),
    reference: Path = typer.Option(..., "--reference", "-r", help=".npy of reference features, (N, D), one row per image."),
    weights: Optional[str] = WeightsOpt,
    preprocess: str = PreprocessOpt,
    pooling: str = PoolingOpt,
    tolerance: float = typer.Option(1e-5, "--tolerance", help="Largest mean absolute error that counts as a match."),
    precision: str = PrecisionOpt,
    offline: bool = OfflineOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Compare our features with reference features under each position-interpolation behaviour.

    Exit 0 when some behaviour is within the tolerance for every image, 1 when none is.
    """
    import json

    import numpy as np

    from retrieval import model as M
    from retrieval.errors import InputError

    try:
        ref = np.load(reference, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{reference}: not a readable .npy file ({exc})") from exc
    ref = np.atleast_2d(ref)
    encoder = _encoder(weights, preprocess, "hf", pooling, 8, precision, offline)
    if ref.shape != (len(images), encoder.dim):
        raise InputError(f"{reference}: holds features of shape {ref.shape}, expected ({len(images)}, {encoder.dim}) for {len(images)} images with {encoder.model.cfg.variant} {pooling}")
    pixels = _pixels(images, preprocess)
    rows = []
    for mode in M.POS_MODES:
        feats = np.concatenate([
            M.pool(M.forward(encoder.model, p[None], mode), encoder.model.cfg, pooling) for p in pixels
        ]).astype(np.float64)  # (N, D)
        for img, f, r in zip(images, feats, ref.astype(np.float64)):
            diff = np.abs(f - r)
            rows.append({
                "image": str(img), "behaviour": mode, "mae": float(diff.mean()), "max_error": float(diff.max()),
                "cosine": float(f @ r / (np.linalg.norm(f) * np.linalg.norm(r))),
            })
    matches = [m for m in M.POS_MODES if all(r["mae"] <= tolerance for r in rows if r["behaviour"] == m)]
    if as_json:
        typer.echo(json.dumps({"rows": rows, "matches": matches, "tolerance": tolerance}, indent=2))
    else:
        cfg = encoder.model.cfg
        typer.echo(f"weights    {encoder.weights_path} ({cfg.variant})")
        typer.echo(f"reference  {reference} {ref.shape}")
        typer.echo(f"preprocess {preprocess}, pooling {pooling}, {precision}")
        typer.echo("")
        width = max(len("image"), *(len(str(i)) for i in images))
        typer.echo(f"{'image':<{width}}  {'behaviour':<31}  {'MAE':>9}  {'max error':>9}  {'cosine':>10}")
        for r in rows:
            typer.echo(f"{r['image']:<{width}}  {BEHAVIOURS[r['behaviour']]:<31}  {r['mae']:9.3e}  {r['max_error']:9.3e}  {r['cosine']:10.8f}")
        typer.echo("")
        if matches:
            typer.echo(f"match: {', '.join(BEHAVIOURS[m] for m in matches)} (every image within MAE {tolerance:g})")
        else:
            typer.echo(f"no match: no behaviour within MAE {tolerance:g} for every image")
    if not matches:
        raise typer.Exit(1)


# ---------------------------------------------------------------- gallery: ingest, query, stats

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


@app.command()
def ingest(
    csv: Optional[Path] = typer.Option(None, "--csv", help="CSV of image URLs (column url/image_url/..., else the first)."),
    folder: Optional[Path] = typer.Option(None, "--dir", help="A folder of images, read recursively (instead of --csv)."),
    db: Optional[Path] = DbOpt,
    weights: Optional[str] = WeightsOpt,
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="resize-short (default), center-crop or hf; an existing gallery keeps its own."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="hf (default) or official; an existing gallery keeps its own."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="cls (default), mean or concat; an existing gallery keeps its own."),
    batch_size: int = BatchOpt,
    workers: int = typer.Option(8, "--workers", help="Concurrent downloads."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry every failed row, whatever its reason."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Transient failures (timeouts, 5xx, 429) are retried on later runs until this many attempts."),
    images_dir: Optional[Path] = typer.Option(None, "--images-dir", help="Where downloaded originals are stored. Default: <db name>_images beside the database."),
    timeout: float = typer.Option(60.0, "--timeout", help="Total seconds allowed for one download."),
    max_mb: float = typer.Option(50.0, "--max-mb", help="Largest download or local file accepted, in MB."),
    files_root: Optional[Path] = typer.Option(None, "--files-root", help="Local files named in the CSV (or found by --dir) are read only inside this folder (symlinks resolved). Default: the CSV's folder (--dir: that folder)."),
    offline: bool = OfflineOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
    allow_private: bool = AllowPrivateOpt,
    memory_mb: float = typer.Option(1024, "--memory-mb", help="Memory for downloads in flight plus decoded images waiting for the encoder, together, in MB."),
    url_column: Optional[str] = typer.Option(None, "--url-column", help="The CSV column holding the URLs (a header name or 1-based number). Default: the column whose cells look like URLs or image file names."),
    progress_every: float = typer.Option(10.0, "--progress-every", help="When stderr is not a terminal: a plain progress line every this many seconds (0: none)."),
    prune: bool = typer.Option(False, "--prune", help="With --dir: remove the rows of files that are gone from the folder (their vectors, duplicates, thumbnails and stored copies follow)."),
    copy_originals: bool = typer.Option(False, "--copy-originals", help="Local files: also store a copy in the gallery's images folder (by default the file itself is the original, recorded relative to the gallery's folder when inside it)."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray cluster; needs the [ray] extra, --csv only)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: the cluster's address (HOST:PORT, auto, ray://...). Default: start a local Ray instance."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="--engine ray: where the Parquet shards go. Default: <db name>_shards beside the database."),
    block_rows: int = typer.Option(64, "--block-rows", help="--engine ray: CSV rows per block (and per shard)."),
    actors: Optional[int] = typer.Option(None, "--actors", help="--engine ray: encoder actors. Default: one per node."),
    actor_cpus: Optional[float] = typer.Option(None, "--actor-cpus", help="--engine ray: CPUs per encoder actor (its thread count). Default: a node's CPUs less the download tasks' share."),
):
    """Add images to the gallery; re-runs skip everything already known (no network request)."""
    import json
    import math

    from retrieval import ingest as I
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.errors import ConfigError, DatabaseError, InputError
    from retrieval.fetch import FetchConfig
    from retrieval.hub import resolve_weights
    from retrieval.store import SQLITE_ERRORS, get_model

    if (csv is None) == (folder is None):
        raise ConfigError("give exactly one of --csv FILE or --dir FOLDER")
    if prune and folder is None:
        raise ConfigError("--prune works with --dir FOLDER (it removes the rows of files gone from it)")
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: expected local or ray")
    if engine == "ray":
        from retrieval import raypath

        if folder is not None:
            raise ConfigError("--engine ray ingests a --csv (use --engine local for --dir)")
        raypath.require_ray()  # before the database is opened: without Ray, one line saying how to install it
        ray_options = raypath.RayOptions(address=ray_address, shards_dir=shards, block_rows=block_rows,
                                         actors=actors, actor_cpus=actor_cpus)
    # check the source before the database is opened: a mistyped name must not create a gallery
    if csv is not None and not csv.is_file():
        raise InputError(f"{csv}: no such CSV file")
    if csv is not None:  # a binary file, a bad --url-column: one line before anything is created
        from retrieval.csvread import read_rows

        read_rows(csv, url_column=url_column).close()
    elif url_column is not None:
        raise ConfigError("--url-column goes with --csv")
    if folder is not None and not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout {timeout:g}: expected a positive number of seconds")
    max_bytes = int(max_mb * 1024 * 1024) if math.isfinite(max_mb) else 0
    if not 1 <= max_bytes <= 2**40:
        raise ConfigError(f"--max-mb {max_mb:g}: expected a number of megabytes above 0, at most {2**20}")
    fetch = FetchConfig(deadline=timeout, max_bytes=max_bytes, allow_private=True if allow_private else None)
    if files_root is not None and not files_root.is_dir():
        raise InputError(f"--files-root {files_root}: no such folder")
    options = I.IngestOptions(workers=workers, retry_failed=retry_failed, max_attempts=max_attempts,
                              images_dir=images_dir, fetch=fetch, files_root=files_root,
                              memory_mb=memory_mb, copy_originals=copy_originals)
    from retrieval import dbopen, store
    from retrieval.errors import ModelMismatchError
    from retrieval.lazyencoder import LazyEncoder, weights_sha256

    db_path = _db_path(db)
    _DB_IN_USE[:] = [db_path]
    info = dbopen.check_for_writing(db_path)  # a foreign or damaged file is refused here, untouched
    recorded = {}
    if info.kind == "gallery" and "model" in info.tables:
        ro = store.connect(db_path, readonly=True)
        try:
            recorded = get_model(ro) or {}
        finally:
            ro.close()
    settings = EncoderSettings(
        preprocess=preprocess or recorded.get("preprocess", "resize-short"),
        interpolation=interpolation or recorded.get("interpolation", "hf"),
        pooling=pooling or recorded.get("pooling", "cls"),
        batch_size=batch_size,
    )
    diffs = [f"{key} {recorded[key]!r}, not {getattr(settings, key)!r}" for key in ("preprocess", "interpolation", "pooling")
             if recorded and str(recorded[key]) != getattr(settings, key)]
    if diffs:
        raise ModelMismatchError(f"{db_path} was built with {'; '.join(diffs)}")
    # the weights are found (downloaded if need be) before a new gallery file is created
    weights_path = resolve_weights(weights, variant=recorded.get("variant"), allow_download=not offline)
    sha = weights_sha256(weights_path)  # remembered per file: a re-run does not read the weights again
    if recorded:
        if sha != recorded["weights_sha256"]:
            raise ModelMismatchError(f"{db_path} was built with weights sha256 {store._short(recorded['weights_sha256'])} "
                                     f"({recorded['variant']}), not {store._short(sha)} ({weights_path})")
        encoder = LazyEncoder(weights_path, settings, sha)  # loaded only if something needs encoding
    elif engine == "ray":
        encoder = None  # the actors load the weights
    else:
        encoder = load_encoder(weights_path, settings)
        encoder._sha256 = sha
    try:
        conn = store.connect(db_path)
    except DatabaseError as exc:  # e.g. a migration waiting for another program's lock
        if dbopen.is_lock(exc):
            raise dbopen.locked_error(db_path, exc) from None
        raise
    progress = _Progress(not quiet, progress_every)
    try:
        if engine == "ray":
            summary = raypath.ingest_csv(conn, db_path, csv, weights_path, settings, options, ray_options,
                                         progress=progress, url_column=url_column)
        elif csv is not None:
            summary = I.ingest_csv(conn, db_path, csv, encoder, options, progress=progress, url_column=url_column)
        else:
            summary = I.ingest_dir(conn, db_path, folder, encoder, options, progress=progress)
    except SQLITE_ERRORS as exc:  # e.g. the disk filled up: what was committed stays, the next run resumes
        if dbopen.is_damage(exc) or dbopen.is_lock(exc):
            raise dbopen.explain(db_path, exc) from exc
        raise DatabaseError(f"{db_path}: cannot write the database ({exc}; is the disk full?)") from exc
    finally:
        progress.close()
    extra, note = {}, None
    if folder is not None:  # files recorded from this folder that are not there any more
        from retrieval import lifecycle

        gone = lifecycle.gone_files(conn, db_path, folder)
        extra["gone"] = len(gone)
        if prune:
            removal = lifecycle.remove(conn, gone, db_path)
            extra["pruned"] = removal.as_dict()
            note = f"pruned {len(gone)} file{'s' * (len(gone) != 1)} gone from {folder}: {removal.summary()}"
        elif gone:
            note = f"{len(gone)} file{'s' * (len(gone) != 1)} gone from {folder}; --prune removes them"
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), **extra, "db": str(db_path)}, indent=2))
    else:
        typer.echo(_summary_line(summary, db_path))
        if note:
            typer.echo(note)


@app.command()
def merge(
    source: Path = typer.Argument(..., help="A folder of Parquet shards (cli.py ingest --engine ray --shards DIR), or one shard file."),
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the merge's summary as JSON on stdout."),
):
    """Merge Parquet shards made elsewhere into the gallery (the same deduplication as an ingest); shards already merged are passed over."""
    import json

    from retrieval import shards as S
    from retrieval import store
    from retrieval.errors import DatabaseError, InputError

    S.pyarrow()  # without pyarrow: one line saying how to install it, before the database is opened
    if not source.exists():
        raise InputError(f"{source}: no such shard directory or file")
    db_path, conn = _open_db(db)
    run_id = store.start_run(conn, str(source))
    status = "crashed"
    m = S.MergeSummary()
    try:
        m = S.merge(conn, source, bulk=True)
        status = "completed"
    except store.SQLITE_ERRORS as exc:
        raise DatabaseError(f"{db_path}: cannot write the database ({exc}; is the disk full?)") from exc
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        store.finish_run(conn, run_id, {"new": m.new, "skipped": m.skipped, "failed": m.failed,
                                        "duplicate": m.duplicate}, status)
    if as_json:
        typer.echo(json.dumps({**m.as_dict(), "db": str(db_path), "run_id": run_id}, indent=2))
    else:
        line = (f"merged {m.shards} shards ({m.already} already merged): {m.rows} rows, {m.new} new, "
                f"{m.skipped} skipped, {m.failed} failed, {m.duplicate} duplicate in {m.seconds:.1f} s "
                f"({m.rows_per_s:.0f} rows/s) -> {db_path}")
        typer.echo(line)


@app.command()
def query(
    image: Optional[Path] = typer.Argument(None, help="Query image file."),
    url: Optional[str] = typer.Option(None, "--url", help="Query by an image URL instead."),
    image_id: Optional[int] = typer.Option(None, "--id", help="Query by the id of an image already in the gallery."),
    k: int = typer.Option(10, "-k", "--k", help="How many results."),
    db: Optional[Path] = DbOpt,
    weights: Optional[str] = WeightsOpt,
    offline: bool = OfflineOpt,
    exact: bool = typer.Option(False, "--exact", help="Exact search over every vector, even where an index is built."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="Index lists to probe (default: the index's own, more for larger -k)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {rank, id, url, path, score, ...}."),
    allow_private: bool = AllowPrivateOpt,
    where: Optional[List[str]] = typer.Option(None, "--where", help="Only images whose metadata (the CSV's other columns) matches KEY OP VALUE, OP one of = != < <= > >= ~ (LIKE); numeric when VALUE is a number; repeatable, all must hold. E.g. --where tag=cat --where year>=2020."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Only results with at least this cosine similarity."),
    include_self: bool = typer.Option(False, "--include-self", help="With --id: keep the query image (and rows holding the same bytes) in the results."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML contact sheet of the results (thumbnails inlined) to this file."),
    open_html: bool = typer.Option(False, "--open", help="Open the --html contact sheet in the web browser."),
):
    """Find the gallery images most like a query image (cosine similarity)."""
    import json

    from retrieval import query as Q
    from retrieval.errors import ConfigError, InputError
    from retrieval.safety import redact_url

    if sum(x is not None for x in (image, url, image_id)) != 1:
        raise ConfigError("give exactly one query: an image file, --url URL or --id N")
    if k < 1:
        raise ConfigError(f"-k {k}: expected a positive number")
    from retrieval import lifecycle

    if open_html and html is None:
        raise ConfigError("--open opens the contact sheet: give --html FILE too")
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"--nprobe {nprobe}: expected a positive number")
    search = {"exact": True if exact else None, "nprobe": nprobe}
    conditions = [lifecycle.parse_where(w) for w in where or ()]
    db_path, conn = _open_db(db, readonly=True)
    filtered = bool(conditions) or min_score is not None
    img = None
    if image_id is not None:
        exclude = () if include_self else lifecycle.same_bytes(conn, image_id)
        if filtered or exclude:
            vector = Q.vector_of(conn, image_id)
            results = lifecycle.search(conn, vector, k, where=conditions, min_score=min_score, exclude=exclude,
                                       **search)
        else:
            results = Q.by_id(conn, image_id, k, **search)
    else:
        # imported here: a query by id needs no encoder, decoder or HTTP client
        from retrieval.decode import decode, open_path
        from retrieval.hub import resolve_weights

        model = Q.gallery_model(conn)
        encoder = Q.gallery_encoder(conn, resolve_weights(weights, variant=model["variant"],
                                                          allow_download=not offline))
        if url is not None:
            from retrieval.fetch import FetchConfig, Fetcher

            with Fetcher(FetchConfig(allow_private=True if allow_private else None)) as fetcher:
                res = fetcher.fetch(url)
            if not res.ok:
                raise InputError(f"{redact_url(url)}: {res.reason}")
            img = decode(res.data, redact_url(url))
        else:
            img = open_path(image)
        if filtered:
            results = lifecycle.search(conn, Q.vector_of_image(encoder, img), k, where=conditions,
                                       min_score=min_score, **search)
        else:
            results = Q.by_image(conn, encoder, img, k, **search)
    local = {r["id"]: bool(r["path"]) and r["path"] == r["url"] for r in results}  # a local file: url is its key
    if html is not None:
        _contact_sheet(html, open_html, results, conn, db_path, img, image, url, image_id)
    for r in results:
        r["path"] = Q.display_path(r["path"], db_path)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    if not results:
        typer.echo("no results: no image matches" if filtered else "no results: the gallery holds no vectors")
        return
    typer.echo(f"{'rank':>4}  {'score':>6}  {'id':>6}  url, then the stored file and the metadata")
    pad = f"{'':>4}  {'':>6}  {'':>6}"
    for r in results:
        typer.echo(f"{r['rank']:>4}  {r['score']:6.4f}  {r['id']:>6}  {r['path'] if local[r['id']] else r['url']}")
        if r["path"] and not local[r["id"]]:
            typer.echo(f"{pad}  {r['path']}")
        if r["meta"]:
            typer.echo(f"{pad}  " + ", ".join(f"{key}={value}" for key, value in r["meta"].items()))


@app.command()
def remove(
    image_ids: Optional[List[int]] = typer.Option(None, "--id", help="An image's id; repeatable."),
    urls: Optional[List[str]] = typer.Option(None, "--url", help="An image's URL, or a local file's path; repeatable."),
    where: Optional[List[str]] = typer.Option(None, "--where", help="Metadata condition KEY OP VALUE (as in query); repeatable, all must hold."),
    statuses: Optional[List[str]] = typer.Option(None, "--status", help="ok, failed or duplicate; repeatable (any of them)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed; change nothing."),
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON."),
):
    """Remove images from the gallery, with their vectors, thumbnails and stored copies; a duplicate of a removed image takes over its vector.

    --id and --url name rows (any of them); --where and --status narrow the selection (all must hold).
    """
    import json

    from retrieval import lifecycle

    conditions = [lifecycle.parse_where(w) for w in where or ()]
    db_path, conn = _open_db(db, must_exist=True)
    ids = lifecycle.find_rows(conn, db_path, ids=image_ids or (), urls=urls or (), where=conditions,
                              statuses=statuses or ())
    removal = lifecycle.remove(conn, ids, db_path, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(removal.as_dict(), indent=2, ensure_ascii=False))
        return
    if dry_run:
        for r in removal.rows:
            typer.echo(f"{r['id']:>6}  {r['status']:<9}  {r['url']}")
        for f in removal.files:
            typer.echo(f"{'':>6}  {'file':<9}  {f}")
    typer.echo(removal.summary())


@app.command()
def dupes(
    threshold: float = typer.Option(0.95, "--threshold", help="Cosine similarity from which two images count as near-duplicates."),
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the groups as JSON."),
):
    """Groups of near-duplicate images (connected components of pairs at or above --threshold; exact copies included)."""
    import json

    from retrieval import lifecycle
    from retrieval import query as Q

    db_path, conn = _open_db(db, readonly=True)
    found = lifecycle.dupes(conn, threshold)
    for g in found["groups"]:
        for m in g["images"]:
            m["path"] = Q.display_path(m["path"], db_path)
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    for g in found["groups"]:
        typer.echo(f"group {g['group']}: {g['size']} images, representative {g['representative']}")
        for m in g["images"]:
            copy = f"  (same bytes as {m['duplicate_of']})" if m["duplicate_of"] is not None else ""
            typer.echo(f"  {m['id']:>6}  {m['score']:6.4f}  {m['url']}{copy}")
    typer.echo(f"{len(found['groups'])} group{'s' * (len(found['groups']) != 1)} of near-duplicates, "
               f"{found['images']} images, threshold {threshold:g} ({found['vectors']} vectors compared "
               f"in {found['seconds']:.1f} s)")


def _contact_sheet(html, open_html, results, conn, db_path, img, image, url, image_id):
    """``query --html``: write the contact sheet (and ``--open`` it); a note on stderr says where."""
    import webbrowser

    from retrieval import contactsheet, thumbs
    from retrieval.errors import InputError

    if image_id is not None:
        label, query_thumb = f"image #{image_id}", thumbs.get(conn, image_id, db_path)
    else:
        label, query_thumb = (url if url is not None else str(image)), thumbs.make(img)
    page = contactsheet.render(results, conn, db_path, query_label=label, query_thumb=query_thumb)
    try:
        contactsheet.write(html, page)
    except OSError as exc:
        raise InputError(f"{html}: cannot write the contact sheet ({exc.strerror or exc})") from exc
    typer.echo(f"contact sheet: {html}", err=True)
    if open_html:
        webbrowser.open(html.resolve().as_uri())


@app.command()
def serve(
    db: Optional[Path] = DbOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default serves this machine only; another address is announced with a warning."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    weights: Optional[str] = WeightsOpt,
    offline: bool = OfflineOpt,
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest image upload accepted, in MB."),
    timeout: float = typer.Option(60.0, "--timeout", help="Search by URL: total seconds allowed for the download."),
    max_mb: float = typer.Option(50.0, "--max-mb", help="Search by URL: largest download accepted, in MB."),
    allow_private: bool = typer.Option(False, "--allow-private", help="Search by URL may fetch from loopback and private addresses (as ingest --allow-private)."),
    lazy: bool = typer.Option(False, "--lazy", help="Load the model on the first search by image, not in the background at start-up."),
):
    """Start the local web app on a gallery: search by upload, paste, URL or id; results as a grid; a JSON API."""
    import math

    from retrieval import web
    from retrieval.errors import ConfigError

    web.require()
    from retrieval.web.serve import run
    from retrieval.web.service import GalleryService, fetch_config

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 0 to 65535")
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-mb", max_mb), ("--timeout", timeout)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} {value:g}: expected a positive number")
    path, conn = _open_db(db, must_exist=True)  # applies pending migrations (the thumbnails table)
    conn.close()
    service = GalleryService(path, weights=weights, offline=offline, allow_private=allow_private,
                             max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                             fetch=fetch_config(allow_private, deadline=timeout, max_bytes=int(max_mb * 1024 * 1024)))
    run(service, host, port, warm=not lazy)


@app.command()
def thumbs(
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
):
    """Make the missing thumbnails from the stored originals (nothing is encoded again); serve and query --html make them lazily otherwise."""
    import json

    from retrieval import thumbs as T

    db_path, conn = _open_db(db, must_exist=True)
    progress = _Progress(not as_json)

    def show(done, total):
        if progress.enabled:
            sys.stderr.write(f"\rthumbnails {done}/{total}\033[K")
            sys.stderr.flush()
            progress.shown = True

    try:
        result = T.make_missing(conn, db_path, progress=show)
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    line = f"{result['made']} thumbnails made in {db_path}"
    if result["unreadable"]:
        ids = ", ".join(str(i) for i in result["unreadable"][:10])
        line += f"; {len(result['unreadable'])} originals missing or unreadable (ids {ids}{', ...' if len(result['unreadable']) > 10 else ''})"
    typer.echo(line)


@app.command()
def stats(
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Counts by status, the model, the database's size and the last runs."""
    import json

    from retrieval import store

    db_path, conn = _open_db(db, readonly=True)
    s = store.stats(conn)
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=str))
        return
    c = s["counts"]
    typer.echo(f"database   {db_path} ({s['file_bytes'] / 1e6:.1f} MB)")
    typer.echo(f"images     {c.get('total', 0)}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed, {c.get('duplicate', 0)} duplicate; {s['vectors']} vectors")
    ix = s["index"]
    if ix["state"] == "trained":
        typer.echo(f"index      {ix['lists']} lists, probing {ix['nprobe']}; trained on {ix['trained_on']} vectors "
                   f"({ix['trained_at']}), {ix['vectors']} now")
    else:
        typer.echo(f"index      none: exact search over {ix['vectors']} vectors")
    if ix["advice"]:
        typer.echo(f"           {ix['advice']}")
    m = s["model"]
    if m:
        typer.echo(f"model      {m['variant']}, dim {m['dim']}, {m['preprocess']}, interpolation {m['interpolation']}, pooling {m['pooling']}, weights sha256 {m['weights_sha256'][:12]}…")
    else:
        typer.echo("model      none yet")
    wal = f"; -wal file {s['wal_bytes'] / 1e6:.1f} MB not yet in the .db" if s.get("wal_bytes") else ""
    typer.echo(f"backup     python cli.py backup FILE (or sqlite3 {db_path} \".backup FILE\", or VACUUM INTO 'FILE'), not cp{wal}")
    if s["runs"]:
        typer.echo("last runs")
        for r in s["runs"]:
            rate = f"{r['images_per_s']:.2f} img/s" if r.get("images_per_s") is not None else ""
            typer.echo(f"  #{r['id']} {r['started_at']} {r['status']:<11} new {r['new']}, skipped {r['skipped']}, failed {r['failed']}, duplicate {r['duplicate']}  {rate}  {r['source']}")


@app.command()
def doctor(
    db: Optional[Path] = DbOpt,
    repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed without losing an ok row that has a vector; checkpoint the WAL."),
    recover: Optional[Path] = typer.Option(None, "--recover", help="A damaged database: copy every readable row into this NEW file (a working gallery) and say what was lost."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check a gallery database (integrity, vectors vs rows, norms, model, migrations, runs, files, WAL) and say how to repair it.

    Exit 0 when healthy (after --repair: when every problem was fixed), 1 when problems remain.
    """
    import json
    import shlex

    from retrieval import doctor as D
    from retrieval.errors import ConfigError

    _DB_IN_USE[:] = [_db_path(db)]
    if recover is not None:
        from retrieval.recover import recover as recover_db

        if repair:
            raise ConfigError("give --repair or --recover, not both")
        source = _db_path(db)
        result = recover_db(source, recover)
        after = D.examine(recover)
        if as_json:
            typer.echo(json.dumps({**result.as_dict(), "healthy": after.healthy}, indent=2, default=str))
        else:
            typer.echo("\n".join(result.lines()))
            if after.healthy:
                src_q, new_q = shlex.quote(str(source)), shlex.quote(str(recover))
                typer.echo(f"{recover}: a healthy gallery. Use it with --db {new_q}, or put it in place of the "
                           f"damaged one (keep a copy of that first if you like): "
                           f"rm -f {shlex.quote(str(source) + '-wal')} {shlex.quote(str(source) + '-shm')} "
                           f"&& mv {new_q} {src_q}")
            else:
                typer.echo(D.format_report(after))
        if not after.healthy:
            raise typer.Exit(1)
        return
    report = D.examine(_db_path(db), repair_it=repair)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        typer.echo(D.format_report(report))
    if not report.healthy:
        raise typer.Exit(1)


@app.command("index")
def build_index(
    db: Optional[Path] = DbOpt,
    lists: Optional[int] = typer.Option(None, "--lists", help="Number of lists (k-means centroids). Default: about sqrt(N)."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="Lists a top-10 query probes (default 12; more for larger -k)."),
    force: bool = typer.Option(False, "--force", help="Build even below 50,000 vectors, where exact search is fast."),
    drop: bool = typer.Option(False, "--drop", help="Remove the index: search becomes exact."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
):
    """Build (or rebuild/retrain) the search index: k-means lists over the gallery's vectors, in the database."""
    import time

    from retrieval import index as X
    from retrieval.errors import ConfigError

    db_path, conn = _open_db(db, must_exist=True)
    if drop:
        X.drop(conn)
        typer.echo(f"{db_path}: index removed; search is exact")
        return
    n = X.count_vectors(conn)
    if n == 0:
        raise ConfigError(f"{db_path}: the gallery holds no vectors yet: nothing to index")
    if n < X.EXACT_BELOW and not force and lists is None:
        typer.echo(f"{db_path}: {n} vectors: exact search is fast below {X.EXACT_BELOW:,}; no index built "
                   "(--force builds one anyway)")
        return
    if lists is not None and lists < 1:
        raise ConfigError(f"--lists {lists}: expected a positive number")
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"--nprobe {nprobe}: expected a positive number")
    shown = {"on": (not quiet) and sys.stderr.isatty(), "any": False}

    def progress(stage, done, total):
        if shown["on"]:
            sys.stderr.write(f"\r{stage}: {done}/{total}\033[K")
            sys.stderr.flush()
            shown["any"] = True

    t = time.perf_counter()
    st = X.build(conn, nlist=lists, nprobe=nprobe, progress=progress)
    if shown["any"]:
        sys.stderr.write("\n")
    typer.echo(f"{db_path}: index of {st['nlist']} lists over {st['trained_on']} vectors (k-means on {st['sample']}), "
               f"probing {st['nprobe']}; {time.perf_counter() - t:.1f} s")


@app.command("vec-path")
def vec_path():
    """Print the sqlite-vec extension's path, for `.load` in the sqlite3 shell."""
    import sqlite_vec

    typer.echo(sqlite_vec.loadable_path())


# ---------------------------------------------------------------- getting data out: export, reindex, backup, datasette


@app.command()
def export(
    fmt: str = typer.Option(..., "--format", "-f", help="parquet (rows + vectors, pyarrow needed: pip install '.[parquet]') or npy (float32 vectors of the ok images + a .jsonl of their rows beside it)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.parquet, or .npy: the rows go to the same name with .jsonl)."),
    status: Optional[List[str]] = typer.Option(None, "--status", help="Which rows (parquet only; repeatable): ok (default), failed, duplicate."),
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Export the vectors with their ids, URLs and metadata (Parquet, or .npy + JSON lines); bit-for-bit the stored float32."""
    import json

    from retrieval.export import export as run_export

    db_path, conn = _open_db(db, must_exist=True, readonly=True)
    try:
        result = run_export(conn, db_path, out, fmt, status or ("ok",))
    finally:
        conn.close()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"{result['rows']} rows, {result['dim']}-d float32 vectors -> {', '.join(result['files'])}")


@app.command()
def reindex(
    out: Path = typer.Option(..., "--out", "-o", help="The new gallery database (refused if it exists, unless --force)."),
    db: Optional[Path] = DbOpt,
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Weights of the new model: a file or a variant name. Default: the source gallery's variant, found as every command finds weights."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="resize-short, center-crop or hf. Default: the source gallery's."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="hf or official. Default: the source gallery's."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="cls, mean or concat. Default: the source gallery's."),
    batch_size: int = BatchOpt,
    images_dir: Optional[Path] = typer.Option(None, "--images-dir", help="Where the new gallery keeps its originals. Default: <out name>_images beside it."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    offline: bool = OfflineOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
):
    """Build a new gallery with another model or settings from this gallery's stored originals (no network): same rows, ids and statuses."""
    import json

    from retrieval import store
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.export import reindex as run_reindex
    from retrieval.hub import resolve_weights

    db_path, conn = _open_db(db, must_exist=True, readonly=True)
    try:
        recorded = store.get_model(conn) or {}
    finally:
        conn.close()
    settings = EncoderSettings(
        preprocess=preprocess or recorded.get("preprocess", "resize-short"),
        interpolation=interpolation or recorded.get("interpolation", "hf"),
        pooling=pooling or recorded.get("pooling", "cls"),
        batch_size=batch_size,
    )
    encoder = load_encoder(resolve_weights(weights, variant=recorded.get("variant"), allow_download=not offline),
                           settings)
    progress = _Progress(not quiet)
    try:
        summary = run_reindex(db_path, out, encoder, force=force, images_dir=images_dir, progress=progress)
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), "db": str(out), "from": str(db_path)}, indent=2))
    else:
        typer.echo(_summary_line(summary, out))


@app.command()
def backup(
    dest: Path = typer.Argument(..., help="The backup file to write (must not exist)."),
    db: Optional[Path] = DbOpt,
):
    """Copy the gallery into one self-contained file with SQLite's backup API (safe while it is in use; a plain cp may miss the -wal file)."""
    from retrieval import store

    db_path, conn = _open_db(db, must_exist=True, readonly=True)
    try:
        store.backup(conn, dest)
        n = store.stats(conn)["counts"]["total"]
    finally:
        conn.close()
    typer.echo(f"{db_path} -> {dest} ({n} images, {dest.stat().st_size / 1e6:.1f} MB)")


@app.command("datasette")
def datasette_cmd(
    db: Optional[Path] = DbOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (this machine only by default)."),
    port: int = typer.Option(8001, "--port", "-p", help="Port to listen on."),
    write_metadata: Optional[Path] = typer.Option(None, "--write-metadata", help="Only write the Datasette metadata file (for running datasette yourself) and exit."),
):
    """Browse the gallery in Datasette with sqlite-vec loaded: labels, hidden vec0 shadow tables, a 'similar' query."""
    import tempfile

    from retrieval import datasette_meta as DM

    db_path, conn = _open_db(db, must_exist=True)
    try:
        if write_metadata is not None:
            DM.write_metadata(conn, db_path.stem, write_metadata)
            typer.echo(f"{write_metadata}: Datasette metadata for {db_path}")
            return
        with tempfile.TemporaryDirectory(prefix="dinov2-datasette-") as tmp:
            meta = DM.write_metadata(conn, db_path.stem, Path(tmp) / "metadata.json")
            conn.close()
            typer.echo(f"Datasette on http://{host}:{port}/{db_path.stem} (Ctrl-C stops it)", err=True)
            DM.serve(db_path, meta, host=host, port=port)
    finally:
        conn.close()


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
