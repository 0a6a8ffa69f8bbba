"""Opening a gallery in Datasette: the metadata file (labels, descriptions, hidden vec0 shadow tables,
canned similarity queries, thumbnails) and the way to start Datasette with sqlite-vec loaded.

Datasette imports ``pysqlite3`` instead of the standard ``sqlite3`` module when it can. On a Python whose
``sqlite3`` cannot load extensions (ours: the venv's interpreter), :func:`serve` hands Datasette the
``sqlean`` module (a dependency of this project, built from the same pysqlite3 code, able to load
extensions) under that name, then loads sqlite-vec with Datasette's own ``--load-extension``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import store
from .errors import InputError

PLUGIN_HINT = "pip install 'dinov2-gallery[datasette]' (or: pip install datasette datasette-render-images)"

# "Images like image :id", nearest first, the image itself and the ok row holding its bytes left out (as query
# --id does). A duplicate row uses the vector of the ok row it duplicates. sqlite-vec's KNN form: MATCH + k = ? (not LIMIT, which
# SQLite before 3.41 does not hand to the virtual table).
SIMILAR_SQL = """\
WITH target AS (
  SELECT CASE WHEN status = 'duplicate' THEN duplicate_of ELSE id END AS id
  FROM images WHERE id = CAST(:id AS INTEGER)
), knn AS (
  SELECT image_id, distance FROM image_embeddings
  WHERE embedding MATCH (SELECT embedding FROM image_embeddings WHERE image_id = (SELECT id FROM target))
    AND k = coalesce(nullif(CAST(:k AS INTEGER), 0), 10) + 2
)
SELECT images.id, 1.0 - knn.distance AS score, images.url, images.path, images.width, images.height,
       images.meta{thumbnail}
FROM knn JOIN images ON images.id = knn.image_id
WHERE images.id != CAST(:id AS INTEGER) AND images.id != (SELECT id FROM target)
ORDER BY knn.distance, images.id
LIMIT coalesce(nullif(CAST(:k AS INTEGER), 0), 10)"""

THUMBNAIL_COLUMN = ",\n       (SELECT data FROM thumbnails WHERE thumbnails.image_id = images.id) AS thumbnail"

GALLERY_SQL = """\
SELECT images.id, images.url, images.width, images.height, images.meta{thumbnail}
FROM images WHERE images.status = 'ok'
ORDER BY images.id"""

TABLES = {
    "images": {
        "label_column": "url",
        "description": "One row per URL or local file: status ok (with a vector), failed (with the reason) or "
                       "duplicate (the same bytes as the ok row duplicate_of).",
        "columns": {
            "url": "The URL as given, or a local file's path",
            "url_hash": "sha256 of the normalised URL: the key re-runs skip by",
            "status": "ok / failed / duplicate",
            "error": "Why it failed: reason-tag: message",
            "content_sha256": "sha256 of the original's bytes",
            "duplicate_of": "For a duplicate: the ok image holding the same bytes",
            "path": "The stored original, relative to the database's folder (or absolute)",
            "meta": "The CSV row's other columns, as JSON",
        },
    },
    "image_embeddings": {
        "description": "sqlite-vec vec0 table: one L2-normalised float32 vector per ok image (cosine distance). "
                       "Search it with the 'similar' query.",
    },
    "model": {"description": "The model that made every vector: weights sha256, variant and settings."},
    "runs": {"description": "One row per ingest run, with its counts."},
    "migrations": {"description": "Schema migrations applied to this file."},
    "ok_images": {"label_column": "url", "description": "View: the images that have a vector, with their metadata."},
    "failed_images": {"label_column": "url", "description": "View: the failures, with the reason tag split out."},
    "duplicate_images": {"label_column": "url",
                         "description": "View: each duplicate beside the ok image holding the same bytes."},
    "failure_reasons": {"description": "View: how many failures of each reason."},
    "thumbnails": {"description": "A small JPEG of each image (rendered as a picture by datasette-render-images)."},
}


def shadow_tables(conn) -> list[str]:
    """The tables a virtual table keeps its data in (vec0's ``<name>_chunks``, ``_rowids``, ...)."""
    virtual = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL TABLE%'")]
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return [n for n in names if any(n.startswith(v + "_") for v in virtual)]


def metadata(conn, database: str) -> dict:
    """Datasette metadata for the gallery open on ``conn``, whose Datasette name is ``database`` (the
    file's stem). Tables and queries that need a table the file lacks are left out."""
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    tables = {name: dict(spec) for name, spec in TABLES.items() if name in present}
    for name in shadow_tables(conn):
        tables[name] = {"hidden": True}
    thumbnail = THUMBNAIL_COLUMN if "thumbnails" in present else ""
    queries = {}
    if "image_embeddings" in present:
        queries["similar"] = {
            "title": "Images similar to :id",
            "description": "The k images nearest to image :id (cosine similarity of their DINOv2 vectors; "
                           "k defaults to 10), the image itself and the image holding the same bytes left out.",
            "sql": SIMILAR_SQL.format(thumbnail=thumbnail),
        }
    queries["gallery"] = {
        "title": "The gallery" + (" with thumbnails" if thumbnail else ""),
        "description": "Every image that has a vector" + (", with its thumbnail." if thumbnail else "."),
        "sql": GALLERY_SQL.format(thumbnail=thumbnail),
    }
    model = store.get_model(conn)
    described = (f"{model['variant']} ({model['dim']}-d, {model['preprocess']}, pooling {model['pooling']})"
                 if model else "no model recorded yet")
    return {
        "title": "DINOv2 image gallery",
        "description": "Images and their DINOv2 vectors (sqlite-vec). Try the 'similar' query.",
        "databases": {
            database: {
                "description": f"Gallery {database}: vectors made by {described}.",
                "tables": tables,
                "queries": queries,
            }
        },
    }


def write_metadata(conn, database: str, out) -> Path:
    out = Path(out)
    out.write_text(json.dumps(metadata(conn, database), indent=2) + "\n", encoding="utf-8")
    return out


def extension_driver() -> str | None:
    """How Datasette can load sqlite-vec in this interpreter: ``"sqlite3"`` (the standard module can),
    ``"pysqlite3"`` (installed: Datasette prefers it), ``"sqlean"`` (handed over as pysqlite3), or None."""
    try:
        import pysqlite3  # noqa: F401

        return "pysqlite3"
    except ImportError:
        pass
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return "sqlite3"
    try:
        import sqlean  # noqa: F401

        return "sqlean"
    except ImportError:
        return None


def datasette_args(db_path, metadata_path, host: str, port: int) -> list[str]:
    import sqlite_vec

    return ["serve", str(db_path), "--load-extension", sqlite_vec.loadable_path(), "--metadata", str(metadata_path),
            "--host", host, "--port", str(port), "--setting", "sql_time_limit_ms", "20000"]


def serve(db_path, metadata_path, host: str = "127.0.0.1", port: int = 8001, extra=()) -> None:
    """Run Datasette (in this process, until it is stopped) on the gallery with sqlite-vec and the metadata."""
    driver = extension_driver()
    if driver is None:
        raise InputError("Datasette cannot load sqlite-vec in this Python (its sqlite3 cannot load extensions "
                         "and neither pysqlite3 nor sqlean is installed): pip install pysqlite3-binary")
    if driver == "sqlean":  # before Datasette is imported: it picks its sqlite3 module at import time
        import sqlean
        import sqlean.dbapi2

        sys.modules["pysqlite3"] = sqlean
        sys.modules["pysqlite3.dbapi2"] = sqlean.dbapi2
    try:
        from datasette.cli import cli
    except ImportError:
        raise InputError(f"Datasette is not installed: {PLUGIN_HINT}") from None

    cli.main(args=datasette_args(db_path, metadata_path, host, port) + list(extra), prog_name="datasette",
             standalone_mode=True)
