"""Parquet shards: ingest results made elsewhere (a Ray cluster, another machine), merged into a gallery.

A shard is one Parquet file holding the outcome of one block of source rows, one row each:

| column | type | meaning |
|---|---|---|
| ``seq`` | int64 | the row's position in its source (merge applies a shard's rows in this order) |
| ``url``, ``url_hash`` | string | as in ``images`` (``url_hash`` = ``store.url_hash(url)``) |
| ``status`` | string | ``ok`` (with a vector), ``failed`` (with ``error``), ``duplicate`` (the same bytes as an ok row of the same shard: not encoded) |
| ``error`` | string | ``reason-tag: message`` for failed rows |
| ``http_status`` | int32 | |
| ``content_sha256``, ``format``, ``path`` | string | |
| ``width``, ``height`` | int32 | |
| ``bytes`` | int64 | |
| ``mtime`` | float64 | a local file's modification time, seconds |
| ``meta`` | string | the CSV row's other columns, JSON |
| ``vector`` | fixed_size_list<float32>[D] | L2-normalised; null unless ``ok`` |

The file's schema metadata (key ``dinov2_retrieval.shard``) holds JSON: ``shard_id`` (a uuid), ``model``
(the record of the model that made the vectors, as ``store.ensure_model`` takes it), ``source`` and
``version``. Files are written to a temporary name and renamed, so a directory never holds half a shard.

:func:`merge` applies shards to a gallery with the rules of a local ingest: a URL the gallery already has
as ok or duplicate is left alone; new content becomes an ok row with its vector; content an ok row already
holds (in the gallery or earlier in the merge) becomes a duplicate of that row, without a second vector;
failures are rows. Each shard's id is recorded (table ``merged_shards``) in the transaction that merges
it, so merging the same shard again changes nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import index, store
from .errors import ConfigError, InputError

VERSION = 1
META_KEY = b"dinov2_retrieval.shard"
SUFFIX = ".parquet"
INSTALL_HINT = "pip install -e '.[ray]'"
TRANSACTION_ROWS = 50_000  # rows merged per transaction (several shards go in one)
CHECKPOINT_ROWS = 250_000  # the WAL is copied into the database every so many merged rows (~1 GB for base)
MERGE_CACHE_KIB = 256 * 1024  # page cache while merging: vec0 rewrites its chunk blobs, which must stay cached

STRING_COLUMNS = ("url", "url_hash", "status", "error", "content_sha256", "format", "path", "meta")
INT32_COLUMNS = ("http_status", "width", "height")
INT64_COLUMNS = ("seq", "bytes")
FLOAT64_COLUMNS = ("mtime",)
COLUMNS = ("seq", "url", "url_hash", "status", "error", "http_status", "content_sha256", "width", "height",
           "format", "bytes", "path", "mtime", "meta", "vector")


def pyarrow():
    """The pyarrow modules (``pa``, ``pq``), or a ConfigError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"shards need pyarrow, which is not installed: {INSTALL_HINT}") from None
    return pa, pq


def schema(dim: int, info: dict | None = None):
    pa, _ = pyarrow()
    fields = []
    for name in COLUMNS:
        if name in STRING_COLUMNS:
            t = pa.string()
        elif name in INT32_COLUMNS:
            t = pa.int32()
        elif name in INT64_COLUMNS:
            t = pa.int64()
        elif name in FLOAT64_COLUMNS:
            t = pa.float64()
        else:
            t = pa.list_(pa.float32(), int(dim))
        fields.append(pa.field(name, t, nullable=name not in ("seq", "url", "url_hash", "status")))
    meta = {META_KEY: json.dumps(info, sort_keys=True).encode()} if info is not None else None
    return pa.schema(fields, metadata=meta)


def new_info(record: dict, source: str | None = None) -> dict:
    """The metadata of a new shard: a fresh id, the model record, the source."""
    model = {k: v for k, v in record.items() if k != "created_at"}
    return {"shard_id": uuid.uuid4().hex, "model": model, "source": source, "version": VERSION}


def make_table(rows: dict, vectors: np.ndarray, info: dict):
    """A shard table from columns (``rows[name]`` lists of equal length, every column but ``vector``) and
    ``vectors`` (n, D) float32, whose rows count only where status is ``ok``."""
    pa, _ = pyarrow()
    dim = int(info["model"]["dim"])
    sch = schema(dim, info)
    n = len(rows["url"])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, dim)
    ok = np.array([s == "ok" for s in rows["status"]], dtype=bool)
    arrays = []
    for f in sch:
        if f.name == "vector":
            values = pa.array(vectors.reshape(-1), type=pa.float32())
            arrays.append(pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok)))
        else:
            arrays.append(pa.array(rows[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=sch)


def write_shard(directory, name: str, table) -> Path:
    """Write ``table`` as ``directory/name.parquet`` atomically (a temporary file renamed); returns the path."""
    _, pq = pyarrow()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / (name + SUFFIX)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    try:
        # vectors barely compress (and cost time to decompress at merge): only the text columns are zstd
        codecs = {name: ("none" if name == "vector" else "zstd") for name in table.column_names}
        pq.write_table(table, tmp, compression=codecs)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def shard_files(source) -> list[Path]:
    """The shards of a directory (sorted by name; hidden and temporary files left out), or the given files."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return sorted(x for x in p.iterdir() if x.suffix == SUFFIX and not x.name.startswith(".") and x.is_file())
        if p.is_file():
            return [p]
        raise InputError(f"{p}: no such shard directory or file")
    return [Path(x) for x in source]


def read_info(path) -> dict:
    """A shard's metadata (shard_id, model, source, version); InputError naming the file if it is not a shard."""
    _, pq = pyarrow()
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a Parquet shard ({exc})") from None
    return _parse_info(path, meta)


def _parse_info(path, meta) -> dict:
    if META_KEY not in meta:
        raise InputError(f"{path}: a Parquet file without shard metadata (not written by dinov2-gallery)")
    info = json.loads(meta[META_KEY])
    if info.get("version") != VERSION:
        raise InputError(f"{path}: shard format version {info.get('version')!r}, this code reads {VERSION}")
    return info


def _numpy(arr, dtype) -> np.ndarray:
    """A primitive Arrow array as NumPy, nulls as NaN (as ``Array.to_numpy`` gives them, which imports pandas
    the first time: half a second of a merge). Read from the array's buffers: a view when it has no nulls."""
    n = arr.offset + len(arr)
    data = np.frombuffer(arr.buffers()[1], dtype=dtype, count=n)[arr.offset:]
    if arr.null_count:
        valid = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), count=n, bitorder="little")[arr.offset:]
        data = np.where(valid.astype(bool), data, np.nan)
    return data


def read_shard(path):
    """``(info, table)`` of a shard file, the table's rows in ``seq`` order."""
    _, pq = pyarrow()
    try:
        table = pq.ParquetFile(path).read()  # not read_table: it imports pyarrow.dataset, and with it pandas (0.5 s)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet shard ({exc})") from None
    info = _parse_info(path, table.schema.metadata or {})
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: shard lacks the columns {', '.join(missing)}")
    seq = _numpy(table.column("seq").combine_chunks(), np.int64)
    if seq.size > 1 and not np.all(seq[1:] >= seq[:-1]):  # shards written by raypath are in order already
        table = table.sort_by("seq")
    return info, table


# ---------------------------------------------------------------- merge


@dataclass
class MergeSummary:
    shards: int = 0  # shards merged by this call
    already: int = 0  # shards found merged before (nothing done)
    rows: int = 0  # rows read from the shards merged
    new: int = 0
    duplicate: int = 0
    failed: int = 0
    skipped: int = 0  # URLs the gallery already had (or that came twice)
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)  # failure tag -> count

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: "MergeSummary") -> None:
        for key in ("shards", "already", "rows", "new", "duplicate", "failed", "skipped", "seconds"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for tag, n in other.reasons.items():
            self.reasons[tag] = self.reasons.get(tag, 0) + n

    def as_dict(self) -> dict:
        return {"shards": self.shards, "already_merged": self.already, "rows": self.rows, "new": self.new,
                "duplicate": self.duplicate, "failed": self.failed, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 1),
                "failure_reasons": dict(sorted(self.reasons.items()))}


def merged_ids(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT shard_id FROM merged_shards")}


_COLUMNS = ("id, url, url_hash, status, error, attempts, http_status, content_sha256, duplicate_of, width, "
            "height, format, bytes, path, mtime, meta, created_at, updated_at")


_BODY = ("url", "url_hash", "http_status", "content_sha256", "width", "height", "format", "bytes", "path", "mtime",
         "meta")  # a shard row's columns as the merge binds them (?1 to ?11), before id, duplicate_of, error, time


def _insert_sql(status: str) -> str:
    """The INSERT of the merge's new rows of one status: a row binds the 11 columns of ``_BODY``, then id,
    duplicate_of, error and the time (?15, for created_at and updated_at)."""
    return (f"INSERT INTO images ({_COLUMNS}) VALUES "
            f"(?12, ?1, ?2, '{status}', ?14, 1, ?3, ?4, ?13, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?15, ?15)")


def _tag(error: str) -> str:
    return error.split(":", 1)[0].strip()


def _holders(conn, shas) -> dict:
    """content_sha256 -> id of the ok row holding it, for the given hashes found in the gallery."""
    shas = list({s for s in shas if s})
    found = {}
    for start in range(0, len(shas), 500):
        chunk = shas[start:start + 500]
        # no condition on status in SQL: with one, SQLite may walk the status index over every ok row
        rows = conn.execute(f"SELECT content_sha256, id, status FROM images WHERE content_sha256 IN "
                            f"({', '.join('?' * len(chunk))})", chunk)
        found.update((r[0], int(r[1])) for r in rows if r[2] == "ok")
    return found


def _check_vectors(path, vecs: np.ndarray, ok: np.ndarray) -> None:
    """The store's checks (store._check_vector) for a whole shard at once: finite, L2 norm 1 within
    NORM_TOLERANCE (float32 sums are exact enough for that tolerance)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vecs, vecs))[ok]  # (n_ok,); NaN or inf for a non-finite vector
    if not np.all(np.isfinite(norms)):
        raise InputError(f"{path}: a vector with non-finite values")
    if norms.size and np.max(np.abs(norms - 1.0)) > store.NORM_TOLERANCE:
        raise InputError(f"{path}: a vector that is not L2-normalised (norm {norms[np.argmax(np.abs(norms - 1))]:.6f})")


def _prepare(path, info: dict, table) -> tuple[dict, np.ndarray]:
    """A shard table as plain columns (``name -> list``, plus ``body``: per row the tuple of columns the merge
    binds first, see :func:`_insert_sql`) and its vectors (n, D), checked: InputError naming the file for
    an ok row without a vector, a vector that is not finite or not unit length, or an unknown status. Needs
    no database: the reader thread runs it while the merge inserts the shard before."""
    cols = {name: table.column(name).to_pylist() for name in COLUMNS if name != "vector"}
    n = len(cols["url"])
    dim = int(info["model"]["dim"])
    vec_col = table.column("vector").combine_chunks()
    vecs = _numpy(vec_col.values, np.float32)[:n * dim].reshape(n, dim) if n else np.empty((0, dim), np.float32)
    status = cols["status"]
    ok = np.array([s == "ok" for s in status], dtype=bool)
    if n and (np.array(vec_col.is_null().to_pylist(), dtype=bool) & ok).any():
        raise InputError(f"{path}: an ok row without a vector")
    _check_vectors(path, vecs, ok)
    bad = sorted({s for s in status} - {"ok", "failed", "duplicate"})
    if bad:
        raise InputError(f"{path}: unknown status {bad[0]!r}")
    cols["body"] = list(zip(*(cols[c] for c in _BODY)))
    return cols, vecs


def _merge_table(conn, path, info: dict, cols: dict, vecs: np.ndarray, summary: MergeSummary) -> None:
    """Apply one shard's rows (as :func:`_prepare` gives them) inside the caller's transaction."""
    n = len(cols["url"])
    status = cols["status"]
    summary.rows += n
    known = store.known(conn, cols["url_hash"])
    now = store._now()

    def params(i: int) -> dict:
        return {k: cols[k][i] for k in store.ROW_FIELDS if k in cols}  # no "id": the gallery gives it

    # URLs the gallery holds as failed: through the store's own per-row rules (attempts, ok kept ok, ...)
    seen: set[str] = set()
    fast: list[int] = []
    slow_outcomes = []
    for i, h in enumerate(cols["url_hash"]):
        k = known.get(h)
        if h in seen or (k is not None and k["status"] in ("ok", "duplicate")):
            summary.skipped += 1
            continue
        seen.add(h)
        if k is None:
            fast.append(i)
            continue
        row = params(i)
        if status[i] == "failed":
            slow_outcomes.append({**row, "status": "failed"})
        elif status[i] == "ok":
            slow_outcomes.append({**row, "status": "ok", "vector": vecs[i]})
        else:
            slow_outcomes.append({**row, "status": "duplicate"})
    if slow_outcomes:
        for o, (_, st) in zip(slow_outcomes, store.commit_batch(conn, slow_outcomes)):
            _count(summary, o["status"], st, o.get("error"))

    _insert_new(conn, path, cols, vecs, fast, now, summary)
    conn.execute("INSERT INTO merged_shards (shard_id, name, rows, merged_at) VALUES (?, ?, ?, ?)",
                 (info["shard_id"], Path(path).name, n, now))


def _insert_new(conn, path, cols: dict, vecs: np.ndarray, fast: list, now: str, summary: MergeSummary) -> None:
    """Insert the rows ``fast`` (indexes into the shard's columns) of URLs the gallery does not know: ok rows
    with their vectors, duplicates of the ok row holding their bytes (in the gallery or earlier in the
    merge), failures. Ids follow the gallery's largest, in the shard's order."""
    status, sha, error = cols["status"], cols["content_sha256"], cols["error"]
    holders = _holders(conn, (sha[i] for i in fast if status[i] != "failed"))
    next_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0]) + 1
    body, url = cols["body"], cols["url"]  # body[i] + (id, duplicate_of, error, time) is what _insert_sql binds
    ok_rows, ok_ids, ok_at, dup_rows, failed_rows = [], [], [], [], []
    for i in fast:
        st, h = status[i], sha[i]
        if st == "failed":
            failed_rows.append(body[i] + (next_id, None, error[i], now))
            tag = _tag(error[i] or "")
            summary.reasons[tag] = summary.reasons.get(tag, 0) + 1
        elif h in holders:
            dup_rows.append(body[i] + (next_id, holders[h], None, now))
        elif st == "duplicate":
            raise InputError(f"{path}: row {url[i]} is a duplicate of content no ok row holds")
        else:
            holders[h] = next_id
            ok_rows.append(body[i] + (next_id, None, None, now))
            ok_ids.append(next_id)
            ok_at.append(i)
        next_id += 1
    summary.new += len(ok_rows)
    summary.duplicate += len(dup_rows)
    summary.failed += len(failed_rows)
    # ok rows first: duplicates refer to them (foreign key); each vector into its search-index list
    conn.executemany(_insert_sql("ok"), ok_rows)
    index.insert_array(conn, ok_ids, vecs[ok_at])
    conn.executemany(_insert_sql("duplicate"), dup_rows)
    conn.executemany(_insert_sql("failed"), failed_rows)


def _count(summary: MergeSummary, wanted: str, recorded: str, error: str | None) -> None:
    if wanted == "failed":
        if recorded == "failed":
            summary.failed += 1
            summary.reasons[_tag(error or "")] = summary.reasons.get(_tag(error or ""), 0) + 1
        else:
            summary.skipped += 1  # a failure of a URL that is ok: it stays ok
    elif recorded == "duplicate":
        summary.duplicate += 1
    else:
        summary.new += 1


def merge(conn, source, *, transaction_rows: int = TRANSACTION_ROWS,
          progress: Callable[[MergeSummary], None] | None = None, bulk: bool = False) -> MergeSummary:
    """Merge the shards of ``source`` (a directory, a file, or a list of files) into the gallery at ``conn``,
    in name order, several shards per transaction (up to ``transaction_rows`` rows). Shards already merged
    are passed over. The first shard's model is recorded (``store.ensure_model``) if the gallery has none;
    a shard made by another model is refused (ModelMismatchError), before anything of it is written (the
    shards of the open transaction are not merged either).

    ``bulk=True`` (``cli.py merge``): when no other connection has the gallery open, the merge writes through
    a rollback journal instead of the WAL, so each page is written once rather than to the WAL and then
    again by the checkpoint (:func:`_bulk_journal`); the gallery is back in WAL mode when the merge ends."""
    files = shard_files(source)
    summary = MergeSummary()
    started = time.monotonic()
    done = merged_ids(conn)
    models: set[str] = set()
    part, batch = MergeSummary(), []  # what the open transaction holds: its counts, its shard ids

    def commit():
        nonlocal part
        if not batch:
            return
        conn.execute("COMMIT")
        summary.add(part)
        if summary.rows // CHECKPOINT_ROWS != (summary.rows - part.rows) // CHECKPOINT_ROWS:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # a no-op out of WAL mode
        done.update(batch)
        part, batch[:] = MergeSummary(), []
        summary.seconds = time.monotonic() - started
        if progress:
            progress(summary)

    with _merge_pragmas(conn, bulk), _read_ahead(files, done) as loaded:
        try:
            for path, info, shard in loaded:
                if shard is None or info["shard_id"] in done or info["shard_id"] in batch:
                    summary.already += 1
                    continue
                if not conn.in_transaction:
                    conn.execute("BEGIN IMMEDIATE")
                key = json.dumps(info["model"], sort_keys=True)
                if key not in models:
                    store.ensure_model(conn, info["model"])  # joins the open transaction
                    models.add(key)
                _merge_table(conn, path, info, *shard, part)
                part.shards += 1
                batch.append(info["shard_id"])
                if part.rows >= transaction_rows:
                    commit()
            commit()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    summary.seconds = time.monotonic() - started
    return summary


@contextmanager
def _read_ahead(files: list, done: set, depth: int = 2):
    """Yield ``(path, info, (columns, vectors))`` per file (None for a shard in ``done``), read and checked
    (:func:`_prepare`) by a thread ``depth`` files ahead of the caller: Parquet decoding and SQLite release
    the GIL, so the next shards are read while SQLite inserts this one."""
    def load(path):
        info = read_info(path)
        if info["shard_id"] in done:
            return path, info, None
        return path, info, _prepare(path, info, read_shard(path)[1])

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
    ahead = deque(reader.submit(load, f) for f in files[:depth])

    def tables():
        for k in range(len(files)):
            loaded = ahead.popleft().result()
            if k + depth < len(files):
                ahead.append(reader.submit(load, files[k + depth]))
            yield loaded

    try:
        yield tables()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _merge_pragmas(conn, bulk: bool):
    """The merge's connection settings, restored after: a page cache large enough for vec0's chunk blobs
    (which every insert rewrites), no automatic checkpoint after each transaction (a checkpoint every
    CHECKPOINT_ROWS rows and one at the end keep the WAL bounded), and with ``bulk`` a rollback journal."""
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    autockpt = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    conn.execute(f"PRAGMA cache_size = {-MERGE_CACHE_KIB}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    journal = _bulk_journal(conn) if bulk else None
    try:
        yield
    finally:
        if journal is not None:
            conn.execute(f"PRAGMA synchronous = {int(journal)}")
            store._enable_wal(conn)
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(autockpt)}")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute(f"PRAGMA cache_size = {int(cache)}")


def _bulk_journal(conn):
    """Leave WAL mode for a rollback journal (``synchronous = FULL``: a commit is durable, a crash rolls
    back to the last one) if no other connection has the gallery open; SQLite refuses the switch
    otherwise, at once (no busy wait here), and the merge keeps the WAL. Returns the ``synchronous``
    value to restore, or None when the journal mode was not changed."""
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        return None
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        mode = str(conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]).lower()
    except store.SQLITE_ERRORS:  # another connection has the database open
        return None
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
    if mode != "delete":
        return None
    conn.execute("PRAGMA synchronous = FULL")
    return sync
