"""Commands that get data out: ``export``, ``reindex``, ``backup``, ``datasette``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import BatchOpt, DbOpt, OfflineOpt, _open_db, _Progress, _summary_line, app


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
