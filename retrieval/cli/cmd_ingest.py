"""Commands that fill a gallery or take from it: ``ingest``, ``merge``, ``remove``, ``thumbs``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import (AllowPrivateOpt, BatchOpt, DbOpt, OfflineOpt, WeightsOpt, _DB_IN_USE, _db_path, _open_db,
                     _Progress, _summary_line, app)


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
