"""Command line: ``python cli.py COMMAND ...`` in a checkout, or the ``dinov2-retrieval`` console script.

The only module that turns the library's exceptions into messages and exit codes:
exit 0 success, 1 a check that ran and failed (``verify``), 2 bad input (one line on stderr naming it),
130 interrupted.
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

DbOpt = typer.Option(None, "--db", help="Gallery database. Default: $DINOV2_DB, else gallery.db in the working directory.")


def _db_path(db: Optional[Path]) -> Path:
    return Path(db or os.environ.get("DINOV2_DB") or "gallery.db")


def _open_db(db: Optional[Path], must_exist: bool = False):
    from retrieval import store
    from retrieval.errors import InputError

    path = _db_path(db)
    if must_exist and not path.exists():
        raise InputError(f"{path}: no such gallery database (run: python cli.py ingest --csv FILE --db {path})")
    return path, store.connect(path)


class _Progress:
    """One self-rewriting status line on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def __call__(self, s):
        if not self.enabled:
            return
        rate = s.images_per_s
        eta = ""
        if s.total and rate > 0 and s.done < s.total:
            left = (s.total - s.done) / max(rate, s.done / max(s.seconds, 1e-9))
            eta = f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
        total = f"/{s.total}" if s.total else ""
        sys.stderr.write(f"\r{s.done}{total}  new {s.new}  skipped {s.skipped}  failed {s.failed}"
                         f"  duplicate {s.duplicate}  {rate:.2f} img/s{eta}\033[K")
        sys.stderr.flush()
        self.shown = True

    def close(self):
        if self.shown:
            sys.stderr.write("\n")


def _summary_line(s, db_path) -> str:
    line = (f"{s.status}: {s.new} new, {s.skipped} skipped, {s.failed} failed, {s.duplicate} duplicate"
            f" in {s.seconds:.1f} s ({s.images_per_s:.2f} images/s) -> {db_path} (run {s.run_id})")
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
    max_mb: float = typer.Option(50.0, "--max-mb", help="Largest download accepted, in MB."),
    offline: bool = OfflineOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
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
    # check the source before the database is opened: a mistyped name must not create a gallery
    if csv is not None and not csv.is_file():
        raise InputError(f"{csv}: no such CSV file")
    if folder is not None and not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout {timeout:g}: expected a positive number of seconds")
    max_bytes = int(max_mb * 1024 * 1024) if math.isfinite(max_mb) else 0
    if not 1 <= max_bytes <= 2**40:
        raise ConfigError(f"--max-mb {max_mb:g}: expected a number of megabytes above 0, at most {2**20}")
    fetch = FetchConfig(deadline=timeout, max_bytes=max_bytes)
    options = I.IngestOptions(workers=workers, retry_failed=retry_failed, max_attempts=max_attempts,
                              images_dir=images_dir, fetch=fetch)
    db_path, conn = _open_db(db)
    recorded = get_model(conn) or {}
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
        if csv is not None:
            summary = I.ingest_csv(conn, db_path, csv, encoder, options, progress=progress)
        else:
            summary = I.ingest_dir(conn, db_path, folder, encoder, options, progress=progress)
    except SQLITE_ERRORS as exc:  # e.g. the disk filled up: what was committed stays, the next run resumes
        raise DatabaseError(f"{db_path}: cannot write the database ({exc}; is the disk full?)") from exc
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), "db": str(db_path)}, indent=2))
    else:
        typer.echo(_summary_line(summary, db_path))


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
):
    """Find the gallery images most like a query image (cosine similarity)."""
    import json

    from retrieval import query as Q
    from retrieval.errors import ConfigError, InputError

    if sum(x is not None for x in (image, url, image_id)) != 1:
        raise ConfigError("give exactly one query: an image file, --url URL or --id N")
    if k < 1:
        raise ConfigError(f"-k {k}: expected a positive number")
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"--nprobe {nprobe}: expected a positive number")
    search = {"exact": True if exact else None, "nprobe": nprobe}
    db_path, conn = _open_db(db, must_exist=True)
    if image_id is not None:
        results = Q.by_id(conn, image_id, k, **search)
    else:
        # imported here: a query by id needs no encoder, decoder or HTTP client
        from retrieval.decode import decode, open_path
        from retrieval.hub import resolve_weights

        model = Q.gallery_model(conn)
        encoder = Q.gallery_encoder(conn, resolve_weights(weights, variant=model["variant"],
                                                          allow_download=not offline))
        if url is not None:
            from retrieval.fetch import Fetcher

            with Fetcher() as fetcher:
                res = fetcher.fetch(url)
            if not res.ok:
                raise InputError(f"{url}: {res.reason}")
            img = decode(res.data, url)
        else:
            img = open_path(image)
        results = Q.by_image(conn, encoder, img, k, **search)
    for r in results:
        r["path"] = Q.display_path(r["path"], db_path)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    if not results:
        typer.echo("no results: the gallery holds no vectors")
        return
    typer.echo(f"{'rank':>4}  {'score':>6}  {'id':>6}  url, then the stored file")
    for r in results:
        local = r["path"] and Path(r["path"]).resolve() == Path(r["url"]).resolve()
        typer.echo(f"{r['rank']:>4}  {r['score']:6.4f}  {r['id']:>6}  {r['path'] if local else r['url']}")
        if r["path"] and not local:
            typer.echo(f"{'':>4}  {'':>6}  {'':>6}  {r['path']}")


@app.command()
def stats(
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Counts by status, the model, the database's size and the last runs."""
    import json

    from retrieval import store

    db_path, conn = _open_db(db, must_exist=True)
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
    if s["runs"]:
        typer.echo("last runs")
        for r in s["runs"]:
            rate = f"{r['images_per_s']:.2f} img/s" if r.get("images_per_s") is not None else ""
            typer.echo(f"  #{r['id']} {r['started_at']} {r['status']:<11} new {r['new']}, skipped {r['skipped']}, failed {r['failed']}, duplicate {r['duplicate']}  {rate}  {r['source']}")


@app.command()
def doctor(
    db: Optional[Path] = DbOpt,
    repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed without losing an ok row that has a vector; checkpoint the WAL."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check a gallery database (integrity, vectors vs rows, norms, model, migrations, runs, files, WAL) and say how to repair it.

    Exit 0 when healthy (after --repair: when every problem was fixed), 1 when problems remain.
    """
    import json

    from retrieval import doctor as D

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



def main() -> None:
    # Pillow warns on stderr about any image declaring more than its MAX_IMAGE_PIXELS, before our own
    # size check (decode.py) turns that image into a one-line "too-large" failure: the warning is noise.
    # Set here, once, before any thread starts (the library leaves the warnings filters alone).
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
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
