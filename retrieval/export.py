"""Getting a gallery out: vectors with their rows as Parquet or ``.npy`` + JSON lines (``export``), and a
new gallery made with another model or settings from the stored originals (``reindex``).

Exported vectors are the stored float32 bytes, unchanged (``np.frombuffer`` of the vec0 blob). Both
exports stream: the gallery is read in chunks of :data:`CHUNK` rows, so memory stays flat however large
it is (the ``.npy`` is written through a memory map, the Parquet file one row group per chunk).

``reindex`` feeds the source gallery's rows through the ingest pipeline (``ingest.run``: decode,
preprocess, encode, store) with every row's bytes read from its stored original (``Item.original``)
or, for a local file, from its recorded path: no network request is ever made. Rows keep their ids;
``ok`` rows are fed first, then duplicates (which find their ok row by content, as in an ingest), then
failures with their recorded reason. The new gallery is built under a temporary name beside ``--out``
and renamed when complete, so an interrupted run leaves no half-made gallery at ``--out``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import store
from .errors import ConfigError, DatabaseError, InputError
from .query import display_path

CHUNK = 1024  # rows read (and written) at a time
FORMATS = ("parquet", "npy")
MODEL_KEY = b"dinov2_retrieval.model"  # Parquet key-value metadata: the gallery's model record (JSON)
SOURCE_KEY = b"dinov2_retrieval.source"  # ... and where and when the file was made (JSON)
ROW_COLUMNS = ("id", "url", "status", "error", "duplicate_of", "path", "width", "height", "format", "bytes",
               "content_sha256", "meta", "created_at")


class MissingDependency(InputError):
    """An optional package a command needs is not installed (the message says how to install it)."""


def _statuses(statuses) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(statuses or ("ok",)))
    bad = [s for s in wanted if s not in store.STATUSES]
    if bad:
        raise ConfigError(f"--status {bad[0]}: expected one of {', '.join(store.STATUSES)}")
    return wanted


def _absolute(path: str | None, db_path) -> str | None:
    """A stored path as an absolute file name (through ``query.display_path``, the one place that knows
    how paths are stored), so an export read from another folder still finds the originals."""
    shown = display_path(path, db_path)
    return os.path.abspath(shown) if shown else shown


class VectorReader:
    """The stored vectors of ``image_embeddings`` by image id, as the exact bytes sqlite-vec holds.

    sqlite-vec answers a lookup (``WHERE image_id = ?``) by reading the vector out of the blob of 1024
    vectors ("chunk") that holds it, and SQLite walks a large blob's overflow pages from its start on each
    such read: a few milliseconds per vector at D=768 (``bench/bench_export.py``), minutes for 100k. When
    the table's shadow tables have sqlite-vec 0.1's layout (its ``_info`` record says v0.1.x), whole
    chunks are read once (a few kept) and sliced instead; every slot is checked against the chunk's
    validity bits and row ids, and a vector that does not check out is read through the vec0 lookup
    (``fallbacks`` counts them)."""

    CACHE = 4  # chunks kept in memory (1024 * D * 4 bytes each)

    def __init__(self, conn, dim: int, table: str = "image_embeddings"):
        self.conn, self.dim, self.table = conn, int(dim), table
        self.fallbacks = 0
        self._chunks: dict[int, tuple] = {}
        self.fast = self._layout_known()

    def _layout_known(self) -> bool:
        try:
            version = self.conn.execute(
                f"SELECT value FROM {self.table}_info WHERE key = 'CREATE_VERSION'").fetchone()
            if version is None or not str(version[0]).startswith("v0.1."):
                return False
            self.conn.execute(f"SELECT chunk_id, size, validity, rowids FROM {self.table}_chunks LIMIT 0").fetchall()
            self.conn.execute(f"SELECT rowid, chunk_id, chunk_offset FROM {self.table}_rowids LIMIT 0").fetchall()
            self.conn.execute(f"SELECT rowid, vectors FROM {self.table}_vector_chunks00 LIMIT 0").fetchall()
        except store.SQLITE_ERRORS:
            return False
        return True

    def _chunk(self, chunk_id: int):
        got = self._chunks.pop(chunk_id, None)
        if got is None:
            meta = self.conn.execute(f"SELECT size, validity, rowids FROM {self.table}_chunks WHERE chunk_id = ?",
                                     (chunk_id,)).fetchone()
            vectors = self.conn.execute(f"SELECT vectors FROM {self.table}_vector_chunks00 WHERE rowid = ?",
                                        (chunk_id,)).fetchone()
            if meta is None or vectors is None:
                got = (0, b"", np.zeros(0, "<i8"), b"")
            else:
                got = (int(meta[0]), bytes(meta[1]), np.frombuffer(meta[2], "<i8"), bytes(vectors[0]))
            while len(self._chunks) >= self.CACHE:
                del self._chunks[next(iter(self._chunks))]
        self._chunks[chunk_id] = got
        return got

    def _lookup(self, image_id: int) -> bytes | None:
        self.fallbacks += 1
        row = self.conn.execute(f"SELECT embedding FROM {self.table} WHERE image_id = ?", (image_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def get(self, ids) -> dict[int, bytes]:
        """``{image_id: float32 bytes}`` for those of ``ids`` that have a vector."""
        ids = [int(i) for i in ids]
        if not self.fast:
            return {i: v for i in ids if (v := self._lookup(i)) is not None}
        where = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            for rowid, chunk_id, offset in self.conn.execute(
                    f"SELECT rowid, chunk_id, chunk_offset FROM {self.table}_rowids "
                    f"WHERE rowid IN ({', '.join('?' * len(part))})", part):
                where[int(rowid)] = (chunk_id, offset)
        width = self.dim * 4
        out = {}
        for image_id in ids:
            if image_id not in where:
                continue  # no vector
            chunk_id, offset = where[image_id]
            size, validity, rowids, vectors = self._chunk(int(chunk_id)) if chunk_id is not None else (0, b"", [], b"")
            ok = (offset is not None and 0 <= offset < size and offset // 8 < len(validity)
                  and validity[offset // 8] >> (offset % 8) & 1 and offset < len(rowids)
                  and int(rowids[offset]) == image_id and (offset + 1) * width <= len(vectors))
            if ok:
                out[image_id] = vectors[offset * width:(offset + 1) * width]
            else:
                v = self._lookup(image_id)
                if v is not None:
                    out[image_id] = v
        return out


def iter_rows(conn, db_path, statuses=("ok",)) -> Iterator[tuple[list[dict], list]]:
    """The gallery's rows with these statuses, by id, in chunks: ``(rows, blobs)`` where ``rows`` are dicts
    of :data:`ROW_COLUMNS` (path absolute, meta as parsed JSON) and ``blobs`` the stored vector bytes
    (None for a row without a vector)."""
    statuses = _statuses(statuses)
    model = store.get_model(conn)
    reader = (VectorReader(conn, int(model["dim"]))
              if model and store._table_exists(conn, "image_embeddings") else None)
    marks = ", ".join("?" * len(statuses))
    last = -1
    while True:
        rows = conn.execute(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM images WHERE status IN ({marks}) AND id > ? ORDER BY id LIMIT ?",
            (*statuses, last, CHUNK)).fetchall()
        if not rows:
            return
        last = int(rows[-1]["id"])
        blobs = reader.get(int(r["id"]) for r in rows if r["status"] == "ok") if reader else {}
        out = []
        for r in rows:
            d = {key: r[key] for key in ROW_COLUMNS}
            d["path"] = _absolute(d["path"], db_path)
            d["meta"] = json.loads(d["meta"]) if d["meta"] else None
            out.append(d)
        yield out, [blobs.get(d["id"]) for d in out]


def _count(conn, statuses) -> int:
    marks = ", ".join("?" * len(statuses))
    return int(conn.execute(f"SELECT count(*) FROM images WHERE status IN ({marks})", statuses).fetchone()[0])


def _source_record(db_path) -> dict:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"database": os.path.abspath(str(db_path)), "exported_at": now}


def _replace(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)


def export_npy(conn, db_path, out, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """``out`` (.npy): float32 (N, D), one row per ok image with a vector, by id; beside it ``out`` with
    the suffix ``.jsonl``: line i is row i's ``{id, url, path, width, height, ..., meta}``. Returns
    ``{rows, dim, files}``."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: an .npy export needs a file name ending in .npy")
    model = store.get_model(conn)
    if model is None or not store._table_exists(conn, "image_embeddings"):
        raise DatabaseError(f"{store.db_name(conn)}: the gallery holds no vectors yet (no model recorded)")
    dim = int(model["dim"])
    n = int(conn.execute(
        "SELECT count(*) FROM images WHERE status = 'ok' AND id IN (SELECT image_id FROM image_embeddings)"
    ).fetchone()[0])
    lines = out.with_suffix(".jsonl")
    tmp, tmp_lines = out.with_name(f".{out.name}.tmp.npy"), lines.with_name(f".{lines.name}.tmp")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        i = 0
        with open(tmp_lines, "w", encoding="utf-8") as f:
            for rows, blobs in iter_rows(conn, db_path, ("ok",)):
                for row, blob in zip(rows, blobs):
                    if blob is None:
                        continue
                    if i >= n:
                        raise DatabaseError(f"{store.db_name(conn)}: changed during the export; run it again")
                    arr[i] = np.frombuffer(blob, dtype="<f4")
                    row = {k: v for k, v in row.items() if k not in ("status", "error", "duplicate_of")}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    i += 1
                if progress:
                    progress(i, n)
        if i != n:
            raise DatabaseError(f"{store.db_name(conn)}: changed during the export; run it again")
        arr.flush()
        del arr
        _replace(tmp, out)
        _replace(tmp_lines, lines)
    finally:
        for t in (tmp, tmp_lines):
            if t.exists():
                t.unlink()
    return {"rows": n, "dim": dim, "files": [str(out), str(lines)]}


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(
            "Parquet export needs pyarrow: pip install 'dinov2-gallery[parquet]' (or pip install pyarrow)"
        ) from None
    return pa, pq


def export_parquet(conn, db_path, out, statuses=("ok",), *,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """``out``: one Parquet row per image with these statuses, by id: the columns of :data:`ROW_COLUMNS`
    (meta as JSON text) and ``vector``, a fixed-size list of D float32 (null for rows without one). The
    file's key-value metadata holds the model record (``dinov2_retrieval.model``) and the source
    (``dinov2_retrieval.source``). Returns ``{rows, dim, files}``."""
    pa, pq = _pyarrow()
    out = Path(out)
    statuses = _statuses(statuses)
    model = store.get_model(conn)
    dim = int(model["dim"]) if model else 0
    total = _count(conn, statuses)
    vector_type = pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())
    schema = pa.schema([
        ("id", pa.int64()), ("url", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("duplicate_of", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("format", pa.string()), ("bytes", pa.int64()), ("content_sha256", pa.string()), ("meta", pa.string()),
        ("created_at", pa.string()), ("vector", vector_type),
    ], metadata={MODEL_KEY: json.dumps(model, sort_keys=True).encode(),
                 SOURCE_KEY: json.dumps(_source_record(db_path)).encode()})
    tmp = out.with_name(f".{out.name}.tmp")
    done = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for rows, blobs in iter_rows(conn, db_path, statuses):
                columns = {key: [r[key] for r in rows] for key in ROW_COLUMNS}
                columns["meta"] = [None if m is None else json.dumps(m, ensure_ascii=False, sort_keys=True)
                                   for m in columns["meta"]]
                mask = np.array([b is None for b in blobs])
                flat = np.zeros((len(rows), dim), dtype=np.float32)
                for i, b in enumerate(blobs):
                    if b is not None:
                        flat[i] = np.frombuffer(b, dtype="<f4")
                if dim:
                    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim,
                                                                mask=pa.array(mask))
                else:
                    vectors = pa.nulls(len(rows), vector_type)
                arrays = [pa.array(columns[f.name], f.type) for f in schema if f.name != "vector"] + [vectors]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                done += len(rows)
                if progress:
                    progress(done, total)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"rows": done, "dim": dim, "files": [str(out)]}


def export(conn, db_path, out, fmt: str, statuses=("ok",), *, progress=None) -> dict:
    """Dispatch on ``fmt`` (parquet or npy; npy holds ok rows only)."""
    if fmt == "npy":
        if tuple(statuses or ("ok",)) != ("ok",):
            raise ConfigError("--format npy holds one vector per ok image: --status applies to parquet only")
        return export_npy(conn, db_path, out, progress=progress)
    if fmt == "parquet":
        return export_parquet(conn, db_path, out, statuses, progress=progress)
    raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------- reindex


def _is_local(url: str) -> bool:
    """A row keyed by a local file's path (not ``scheme://...`` nor a ``csv:FILE:LINE`` placeholder)."""
    return "://" not in url and not url.startswith("csv:")


def _link_original(original: str, sha: str | None, images_dir: Path | None) -> None:
    """Hard-link a stored original into the new gallery's images folder under the name the ingest gives it
    (``<sha[:2]>/<sha><ext>``), so the ingest finds it there and writes no copy (a folder on another file
    system, or a link refused: it copies the bytes as usual)."""
    name = Path(original).name
    if images_dir is None or not sha or not name.startswith(sha):
        return
    dest = Path(images_dir) / sha[:2] / name
    if dest.exists():
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(original, dest)
    except OSError:
        pass


def reindex_items(src_path, images_dir: Path | None = None, out_dir: Path | None = None) -> Iterator:
    """The source gallery's rows as ingest Items whose bytes come from disk: ok rows, then duplicates,
    then failures (with their recorded reason), each group by id. The gallery is opened on the first
    ``next()`` (the ingest producer's thread: a connection belongs to the thread that made it)."""
    src = store.connect(src_path, readonly=True)
    try:
        yield from _reindex_items(src, src_path, images_dir, out_dir)
    finally:
        try:
            src.close()
        except store.SQLITE_ERRORS:  # closed from another thread by the garbage collector: nothing to do
            pass


def _rekey(item, file: str, out_dir: Path | None) -> None:
    """A local file's row is keyed by its path relative to its gallery's folder (``lifecycle.local_key``): in
    the new gallery, relative to the new gallery's folder, as an ingest there would key it."""
    from .lifecycle import local_key

    if out_dir is None:
        return
    item.url = local_key(file, out_dir)
    item.url_hash = store.url_hash(item.url)


def _reindex_items(src, src_path, images_dir, out_dir=None) -> Iterator:
    from .ingest import Item

    queries = (
        ("ok", "SELECT i.*, NULL AS holder_path FROM images AS i WHERE status = 'ok' AND id > ? ORDER BY id LIMIT ?"),
        ("duplicate", "SELECT d.*, o.path AS holder_path FROM images AS d LEFT JOIN images AS o ON o.id = d.duplicate_of "
                      "WHERE d.status = 'duplicate' AND d.id > ? ORDER BY d.id LIMIT ?"),
        ("failed", "SELECT i.*, NULL AS holder_path FROM images AS i WHERE status = 'failed' AND id > ? ORDER BY id LIMIT ?"),
    )
    for status, sql in queries:
        last = -1
        while True:
            rows = src.execute(sql, (last, CHUNK)).fetchall()
            if not rows:
                break
            last = int(rows[-1]["id"])
            for r in rows:
                meta = json.loads(r["meta"]) if r["meta"] else None
                item = Item(url=r["url"], url_hash=r["url_hash"], meta=meta, http_status=r["http_status"],
                            id=int(r["id"]))
                if status == "failed":  # not read again: its reason and what was known of its bytes stay
                    item.error = r["error"] or "failed: no reason recorded"
                    item.mtime = r["mtime"]
                    if _is_local(r["url"]) and r["url"] and not r["url"].startswith("csv:"):
                        _rekey(item, _absolute(r["url"], src_path), out_dir)
                    item.info = {k: r[k] for k in ("content_sha256", "bytes", "width", "height", "format")
                                 if r[k] is not None}
                else:
                    local = _is_local(r["url"])
                    # a local file: its recorded path; a download: its stored original (a duplicate of a
                    # download has none of its own: the ok row's, which holds the same bytes)
                    stored = r["path"] if (local or r["path"]) else r["holder_path"]
                    if not stored:
                        item.error = "missing-original: the source gallery stored no original to reindex from"
                        yield item
                        continue
                    item.local = local
                    item.original = _absolute(stored, src_path)
                    if local:
                        item.file = Path(item.original)
                        _rekey(item, item.original, out_dir)
                    if not local:
                        _link_original(item.original, r["content_sha256"], images_dir)
                    if local:
                        try:
                            item.mtime = os.stat(item.original).st_mtime_ns / 1e9  # seconds, as ingest records them
                        except OSError:
                            item.mtime = None
                yield item


def _remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        if p.exists():
            p.unlink()


def reindex(src_path, out_path, encoder, *, force: bool = False, images_dir=None, workers: int = 4,
            progress=None):
    """Build a new gallery at ``out_path`` from the gallery at ``src_path`` with ``encoder`` (another model
    or other settings): same rows (same ids, URLs, metadata), same statuses, originals read from disk.
    Refuses an existing ``out_path`` unless ``force``. Returns the ingest :class:`~retrieval.ingest.Summary`
    (``source`` names the source gallery)."""
    from .ingest import IngestOptions, default_images_dir, run

    src_path, out_path = Path(src_path), Path(out_path)
    if not src_path.is_file():
        raise InputError(f"{src_path}: no such gallery database")
    if out_path.exists() and out_path.resolve() == src_path.resolve():
        raise InputError(f"--out {out_path}: is the source gallery itself; give a new file name")
    if out_path.exists() and not force:
        raise InputError(f"--out {out_path}: already exists; pass --force to replace it")
    if not out_path.parent.is_dir():
        raise InputError(f"--out {out_path}: no such folder {out_path.parent}")
    src = store.connect(src_path, readonly=True)
    try:
        if store.get_model(src) is None:
            raise DatabaseError(f"{src_path}: the gallery is empty (no model recorded): nothing to reindex")
        total = int(src.execute("SELECT count(*) FROM images").fetchone()[0])
        tmp = out_path.with_name(f".{out_path.name}.reindex-{os.getpid()}.tmp")
        _remove_db(tmp)
        options = IngestOptions(workers=workers, images_dir=Path(images_dir or default_images_dir(out_path)))
        conn = store.connect(tmp)
        try:
            summary = run(conn, tmp, reindex_items(src_path, options.images_dir, out_path.resolve().parent), f"reindex of {src_path.resolve()}", encoder,
                          options, total=total, progress=progress)
            if summary.status == "completed":
                store.checkpoint(conn)
        except BaseException:
            conn.close()
            _remove_db(tmp)
            raise
        conn.close()
    finally:
        src.close()
    if force:
        _remove_db(out_path)
    os.replace(tmp, out_path)
    _remove_db(tmp)  # an -shm left beside the temporary name
    return summary
