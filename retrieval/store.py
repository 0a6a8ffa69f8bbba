"""The gallery database: SQLite (WAL) + sqlite-vec, as plain functions over a connection.

Layout (see ``migrations/*.sql`` for the columns):

- ``images``: one row per image URL (or local file: its path relative to the gallery's folder when inside
  it, else absolute; see ``lifecycle.local_key``), keyed by ``url_hash``, with status
  ``ok`` / ``failed`` / ``duplicate``;
- ``image_embeddings``: a sqlite-vec ``vec0`` virtual table, ``image_id INTEGER PRIMARY KEY`` (=
  ``images.id``) and ``embedding float[D] distance_metric=cosine``. D depends on the model, so this
  table is NOT created by a migration: ``ensure_model`` creates it when the model is first recorded.
  Only ``ok`` rows have a vector; vectors are float32 and L2-normalised;
- ``model``: the single row describing the model that made the vectors;
- ``runs``: one row per ingest run;
- ``migrations``: the migration files applied (created by this module, not by a migration).

Connections come from :func:`connect`. They are in autocommit mode (``isolation_level=None``): every
write here runs inside :func:`transaction` (``BEGIN IMMEDIATE`` ... ``COMMIT``), and a batch of
outcomes goes in one transaction with :func:`commit_batch`. Rows come back as the driver's ``Row``
(index or key access; ``dict(row)`` works).

The database stays usable from the plain ``sqlite3`` shell: ``.load`` the path printed by
``python -c "import sqlite_vec; print(sqlite_vec.loadable_path())"``, then query ``image_embeddings``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path

import numpy as np
import sqlite_vec

from .errors import DatabaseError, ModelMismatchError


def _migrations_dir() -> Path:
    """The checkout's ``migrations/`` (a source tree or an editable install), else the copy a wheel
    installs as data files under ``<prefix>/share/dinov2-gallery/migrations`` (pyproject.toml)."""
    import sysconfig

    checkout = Path(__file__).resolve().parent.parent / "migrations"
    installed = []
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        try:
            installed.append(Path(sysconfig.get_path("data", scheme)) / "share" / "dinov2-gallery" / "migrations")
        except KeyError:  # a scheme this platform does not have
            pass
    return next((d for d in [checkout, *installed] if d.is_dir()), checkout)


MIGRATIONS_DIR = _migrations_dir()
_MIGRATION_FILE = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")
# Migrations that also need Python (work SQL cannot do, e.g. hashing): file stem -> "module:function" in this
# package, called with the connection right after the file's statements, in the same transaction.

BUSY_TIMEOUT_S = 30.0
KNN_MAX_K = 4096  # sqlite-vec's limit on k in a vec0 KNN query
NORM_TOLERANCE = 1e-3
STATUSES = ("ok", "failed", "duplicate")
RUN_STATUSES = ("running", "completed", "interrupted", "crashed")
MODEL_FIELDS = ("variant", "weights_sha256", "preprocess", "interpolation", "pooling", "dim")
# keys a row dict given to record_* may hold
ROW_FIELDS = (
    "id", "url", "url_hash", "error", "http_status", "content_sha256", "width", "height", "format", "bytes",
    "path", "mtime", "meta",
)
KNOWN_FIELDS = ("id", "url", "status", "attempts", "error", "http_status", "mtime", "content_sha256")


# ---------------------------------------------------------------- driver and connection


def _driver():
    """The DB-API module to use: the stdlib ``sqlite3`` if it can load extensions, else ``sqlean``."""
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import sqlean
    except ImportError:  # pragma: no cover - sqlean.py is a dependency
        raise DatabaseError(
            "this Python's sqlite3 module cannot load extensions (sqlite-vec) and sqlean.py is not "
            "installed: pip install sqlean.py"
        ) from None
    return sqlean


def _sqlite_errors() -> tuple:
    errors = [sqlite3.Error]
    try:
        import sqlean

        errors.append(sqlean.Error)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


SQLITE_ERRORS = _sqlite_errors()
_CONNECTION_CLASSES: dict = {}


class _CheckpointOnClose:
    """Mixed into the driver's Connection: a clean close (no transaction open) of a connection that wrote
    something first checkpoints the WAL into the database file and truncates it (:func:`checkpoint`), so a
    copy of the ``.db`` file alone holds everything even while another process keeps the database open.
    A connection that only read leaves the file alone (``doctor`` reports a WAL, ``--repair`` folds it in)."""

    def close(self):
        try:
            if not self.in_transaction and self.total_changes > 0:
                checkpoint(self, wait_s=0.2)
        except Exception:  # noqa: BLE001 - closed, read-only or not a database: closing must still work
            pass
        super().close()


def _connection_class(driver):
    """A subclass of the driver's Connection that can carry the path it was opened with (and checkpoints
    the WAL when closed cleanly)."""
    cls = _CONNECTION_CLASSES.get(driver)
    if cls is None:
        cls = type("GalleryConnection", (_CheckpointOnClose, driver.Connection), {"path": None})
        _CONNECTION_CLASSES[driver] = cls
    return cls


def db_name(conn) -> str:
    """The database as named in messages: the path given to :func:`connect`, else SQLite's file name."""
    path = getattr(conn, "path", None)
    if path:
        return str(path)
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            return row[2] or ":memory:"
    return "database"  # pragma: no cover


def load_vec(conn) -> None:
    """Load the sqlite-vec extension into ``conn`` (extension loading is switched off again after)."""
    conn.enable_load_extension(True)
    try:
        sqlite_vec.load(conn)
    finally:
        conn.enable_load_extension(False)


def connect(path, *, apply_migrations: bool = True, readonly: bool = False):
    """Open (creating if needed) the gallery database at ``path`` and bring its schema up to date.

    ``readonly=True``: open an existing gallery read-only, never creating or migrating anything; a file
    that is not a gallery is refused with one line naming what it is (see ``retrieval/dbopen.py``).

    Loads sqlite-vec; sets WAL, ``busy_timeout`` (30 s), ``foreign_keys=ON``, ``synchronous=NORMAL``;
    autocommit mode (use :func:`transaction`). Raises DatabaseError naming the file when it is not a
    SQLite database, cannot be opened, or holds a migration this code does not know (newer schema).
    ``apply_migrations=False`` leaves the schema alone (tests use it with ``migrate(conn, upto=N)``).
    """
    if readonly:
        from .dbopen import open_readonly

        return open_readonly(path)
    driver = _driver()
    name = str(path)
    try:
        conn = driver.connect(
            name, timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=_connection_class(driver)
        )
    except SQLITE_ERRORS as exc:
        raise DatabaseError(f"{name}: cannot open database: {exc}") from None
    conn.path = name
    try:
        load_vec(conn)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        _enable_wal(conn)  # reads the header: fails on a non-database
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.row_factory = driver.Row
        if apply_migrations:
            migrate(conn)
    except SQLITE_ERRORS as exc:
        conn.close()
        if "not a database" in str(exc):
            raise DatabaseError(f"{name}: not a SQLite database ({exc})") from None
        raise DatabaseError(f"{name}: cannot open database: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn) -> None:
    """Switch to WAL. Changing the journal mode of a fresh file that another process is opening at the
    same moment can fail with "database is locked" without SQLite calling the busy handler: retry."""
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return
        except SQLITE_ERRORS as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def checkpoint(conn, wait_s: float = 2.0) -> dict:
    """``PRAGMA wal_checkpoint(TRUNCATE)``: copy the WAL into the database file and empty it, waiting at
    most ``wait_s`` seconds for other connections (a reader in the middle of a read holds it off; it is
    then left incomplete, never an error). Returns ``{busy, wal_frames, checkpointed}`` as SQLite reports
    them (busy 0 and both counts 0 afterwards: the ``-wal`` file is empty)."""
    before = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute(f"PRAGMA busy_timeout = {max(0, int(wait_s * 1000))}")
    try:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(before)}")
    return {"busy": int(busy), "wal_frames": int(frames), "checkpointed": int(done)}


def backup(conn, dest) -> Path:
    """Copy the gallery to ``dest`` with SQLite's online backup API (a consistent snapshot, the WAL's
    content included, while other connections keep reading and writing). Refuses an existing ``dest``."""
    dest = Path(dest)
    if dest.exists():
        raise DatabaseError(f"{dest}: already exists; give a new file name for the backup")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        target = _driver().connect(str(tmp))
        try:
            conn.backup(target)
            target.execute("PRAGMA journal_mode = DELETE").fetchone()  # one self-contained file
        finally:
            target.close()
        os.replace(tmp, dest)
    except SQLITE_ERRORS as exc:
        raise DatabaseError(f"{dest}: cannot write the backup ({exc})") from None
    except OSError as exc:
        raise DatabaseError(f"{dest}: cannot write the backup ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


@contextmanager
def transaction(conn):
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ROLLBACK if the block raises. Inside an open transaction it
    joins it (the outer block commits or rolls back everything)."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _now() -> str:
    """ISO-8601 UTC with milliseconds, as SQLite's strftime('%Y-%m-%dT%H:%M:%fZ', 'now') writes it."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _parse_time(text: str) -> float:
    """Seconds since the epoch of a timestamp written by :func:`_now` (or without milliseconds)."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()


def _table_exists(conn, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ? AND type = 'table'", (name,)).fetchone()
    return row is not None


# ---------------------------------------------------------------- migrations


def available_migrations(directory=None) -> list[tuple[str, Path]]:
    """The migration files, in order: ``[(name, path)]`` with name the file stem (``0001_gallery``)."""
    directory = Path(directory) if directory is not None else MIGRATIONS_DIR
    files = sorted(p for p in directory.glob("*.sql") if _MIGRATION_FILE.match(p.name))
    return [(p.stem, p) for p in files]


def applied_migrations(conn) -> list[str]:
    """Names of the migrations recorded in the database, in order (empty for a blank database)."""
    if not _table_exists(conn, "migrations"):
        return []
    return [row[0] for row in conn.execute("SELECT name FROM migrations ORDER BY name")]


def _statements(script: str):
    """Split a SQL script into complete statements (semicolons in strings, comments and triggers are
    handled by SQLite's own ``complete_statement``)."""
    driver = _driver()
    start = 0
    for i, ch in enumerate(script):
        if ch == ";" and driver.complete_statement(script[start : i + 1]):
            yield script[start : i + 1]
            start = i + 1
    rest = script[start:]
    if rest.strip() and driver.complete_statement(rest + ";"):
        yield rest


# Migrations with a step in Python besides their SQL file (run after it, in the same transaction):
# the vec0 table's width comes from the model, so rewriting it cannot be a SQL file.
# Python steps run right after a migration's SQL, in its transaction: module, function(conn)
PYTHON_STEPS = {"0003_search_index": ("retrieval.index", "upgrade"),
                "0004_lifecycle": ("retrieval.lifecycle", "relativise_paths"),
                "0008_list_index": ("retrieval.index", "add_list_index")}


def _python_step(conn, name: str) -> None:
    step = PYTHON_STEPS.get(name)
    if step:
        import importlib

        getattr(importlib.import_module(step[0]), step[1])(conn)


def migrate(conn, upto: int | None = None, directory=None) -> list[str]:
    """Apply the pending migrations (only the first ``upto`` files when given); returns those applied.

    Each file runs in one transaction together with its row in ``migrations``. A database holding a
    migration this code does not know is newer than the code: DatabaseError naming it.
    """
    known = available_migrations(directory)
    if not known:
        raise DatabaseError(f"no migration files in {Path(directory) if directory is not None else MIGRATIONS_DIR}: "
                            "the installation is incomplete; reinstall dinov2-gallery")
    names = [name for name, _ in known]
    applied = applied_migrations(conn)
    unknown = [name for name in applied if name not in names]
    if unknown:
        raise DatabaseError(
            f"{db_name(conn)}: the database is newer than this code (unknown migration "
            f"{', '.join(unknown)}); upgrade dinov2-gallery to use it"
        )
    wanted = known if upto is None else known[:upto]
    if all(name in applied for name, _ in wanted):
        return []
    conn.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = []
    for name, path in wanted:
        if name in applied:
            continue
        script = path.read_text(encoding="utf-8")
        with transaction(conn):
            # another process may have applied it while we waited for the write lock
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                continue
            try:
                for statement in _statements(script):
                    conn.execute(statement)
                _python_step(conn, name)
            except SQLITE_ERRORS as exc:
                raise DatabaseError(f"{db_name(conn)}: cannot apply migration {name}: {exc}") from None
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, _now()))
        done.append(name)
    return done


# ---------------------------------------------------------------- URLs

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<rest>[^#]*)(?:#.*)?$", re.S)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalise_url(url: str) -> str:
    """The URL as compared: scheme and host lower-cased, the default port (80 for http, 443 for https)
    and the fragment dropped, everything else (user info, path, query, their case) kept.

    Anything that is not ``scheme://...`` (a local file path) is returned unchanged but for surrounding
    whitespace.
    """
    url = url.strip()
    m = _URL.match(url)
    if not m:
        return url
    scheme = m["scheme"].lower()
    authority = m["authority"]
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):  # IPv6 literal
        end = hostport.find("]")
        host, port = (hostport[: end + 1], hostport[end + 1 :]) if end >= 0 else (hostport, "")
        port = port[1:] if port.startswith(":") else port
    else:
        host, _, port = hostport.partition(":")
    host = host.lower()
    if port == _DEFAULT_PORTS.get(scheme) or port == "":
        hostport = host
    else:
        hostport = f"{host}:{port}"
    return f"{scheme}://{userinfo}{at}{hostport}{m['rest']}"


def url_hash(url: str) -> str:
    """sha256 hex of :func:`normalise_url` (UTF-8): the images table's key."""
    return sha256(normalise_url(url).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- model


def get_model(conn) -> dict | None:
    """The model record (variant, weights_sha256, preprocess, interpolation, pooling, dim, created_at and
    any extra keys it was recorded with), or None when no model is recorded yet."""
    row = conn.execute(
        "SELECT variant, weights_sha256, preprocess, interpolation, pooling, dim, extra, created_at "
        "FROM model WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    record = {key: row[key] for key in MODEL_FIELDS}
    record.update(json.loads(row["extra"]) if row["extra"] else {})
    record["created_at"] = row["created_at"]
    return record


def _short(digest) -> str:
    digest = str(digest)
    return digest[:12] + "…" if len(digest) > 12 else digest


def ensure_model(conn, record: dict) -> dict:
    """Record the model the first time (and create ``image_embeddings`` with D = ``record["dim"]``);
    later, check it is the same model: ModelMismatchError naming the database and what differs.

    ``record`` needs variant, weights_sha256, preprocess, interpolation, pooling, dim; other keys are
    stored as JSON in ``model.extra`` and compared when both sides have them. Returns the stored record.
    """
    missing = [key for key in MODEL_FIELDS if record.get(key) is None]
    if missing:
        raise ValueError(f"model record lacks {', '.join(missing)}")
    dim = int(record["dim"])
    if dim <= 0 or dim != record["dim"]:
        raise ValueError(f"model record: dim must be a positive integer, not {record['dim']!r}")
    extra = {k: v for k, v in record.items() if k not in MODEL_FIELDS and k != "created_at"}
    with transaction(conn):
        stored = get_model(conn)
        if stored is None:
            conn.execute(
                "INSERT INTO model (id, variant, weights_sha256, preprocess, interpolation, pooling, dim, "
                "extra, created_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(record["variant"]), str(record["weights_sha256"]), str(record["preprocess"]),
                    str(record["interpolation"]), str(record["pooling"]), dim,
                    json.dumps(extra, sort_keys=True) if extra else None, _now(),
                ),
            )
            _create_vectors_table(conn, dim)
            return get_model(conn)
        diffs = []
        if stored["weights_sha256"] != record["weights_sha256"]:
            diffs.append(
                f"weights sha256 {_short(stored['weights_sha256'])} ({stored['variant']}), "
                f"not {_short(record['weights_sha256'])} ({record['variant']})"
            )
        elif stored["variant"] != record["variant"]:
            diffs.append(f"variant {stored['variant']!r}, not {record['variant']!r}")
        for key in ("dim", "preprocess", "interpolation", "pooling"):
            if str(stored[key]) != str(record[key]):
                diffs.append(f"{key} {stored[key]!r}, not {record[key]!r}")
        for key, value in extra.items():
            if key in stored and stored[key] != value:
                diffs.append(f"{key} {stored[key]!r}, not {value!r}")
        if diffs:
            raise ModelMismatchError(f"{db_name(conn)} was built with {'; '.join(diffs)}")
        if not _table_exists(conn, "image_embeddings"):
            _create_vectors_table(conn, int(stored["dim"]))
        return stored


def _create_vectors_table(conn, dim: int) -> None:
    from . import index  # the layout (partition key, chunk size) belongs to the search index

    index.create_vectors_table(conn, dim)


def _model_dim(conn) -> int:
    row = conn.execute("SELECT dim FROM model WHERE id = 1").fetchone()
    if row is None or not _table_exists(conn, "image_embeddings"):
        raise DatabaseError(f"{db_name(conn)}: no model recorded yet (ensure_model comes first)")
    return int(row[0])


# ---------------------------------------------------------------- image rows


def known(conn, url_hashes) -> dict:
    """``{url_hash: {id, url, status, attempts, error, http_status, mtime, content_sha256}}`` for the
    hashes already in the gallery (absent hashes are simply missing from the result)."""
    hashes = list(dict.fromkeys(url_hashes))
    result = {}
    for start in range(0, len(hashes), 500):
        chunk = hashes[start : start + 500]
        rows = conn.execute(
            f"SELECT url_hash, {', '.join(KNOWN_FIELDS)} FROM images "
            f"WHERE url_hash IN ({', '.join('?' * len(chunk))})",
            chunk,
        )
        for row in rows:
            result[row["url_hash"]] = {key: row[key] for key in KNOWN_FIELDS}
    return result


def find_by_content(conn, content_sha256: str) -> int | None:
    """Id of the ok row holding this content, or None."""
    if not content_sha256:
        return None
    row = conn.execute(
        "SELECT id FROM images WHERE content_sha256 = ? AND status = 'ok'", (content_sha256,)
    ).fetchone()
    return None if row is None else int(row[0])


def _row_params(row: dict) -> dict:
    unknown = set(row) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown image row keys: {', '.join(sorted(unknown))} (known: {', '.join(ROW_FIELDS)})")
    if not row.get("url"):
        raise ValueError("an image row needs its url")
    params = {key: row.get(key) for key in ROW_FIELDS}
    params["url"] = str(row["url"])
    params["url_hash"] = row.get("url_hash") or url_hash(params["url"])
    meta = params["meta"]
    if meta is not None and not isinstance(meta, str):
        params["meta"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    if params["path"] is not None:
        params["path"] = str(params["path"])
    params["now"] = _now()
    return params


def _existing(conn, hash_: str):
    return conn.execute("SELECT id, status FROM images WHERE url_hash = ?", (hash_,)).fetchone()


def _check_vector(vector, dim: int) -> bytes:
    v = np.asarray(vector)
    if v.ndim != 1 or v.shape[0] != dim:
        raise ValueError(f"vector has shape {v.shape}, the gallery holds {dim}-d vectors")
    v = v.astype(np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("vector has non-finite values")
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise ValueError(f"vector is not L2-normalised (norm {norm:.6f})")
    return v.astype("<f4").tobytes()


_UPSERT_OK = """
INSERT INTO images (id, url, url_hash, status, error, attempts, http_status, content_sha256, duplicate_of,
                    width, height, format, bytes, path, mtime, meta, created_at, updated_at)
VALUES (:id, :url, :url_hash, 'ok', NULL, 1, :http_status, :content_sha256, NULL,
        :width, :height, :format, :bytes, :path, :mtime, :meta, :now, :now)
ON CONFLICT (url_hash) DO UPDATE SET
    url = excluded.url, status = 'ok', error = NULL, attempts = images.attempts + 1,
    http_status = excluded.http_status, content_sha256 = excluded.content_sha256, duplicate_of = NULL,
    width = excluded.width, height = excluded.height, format = excluded.format, bytes = excluded.bytes,
    path = excluded.path, mtime = excluded.mtime, meta = coalesce(excluded.meta, images.meta),
    updated_at = excluded.updated_at
"""

_UPSERT_FAILED = """
INSERT INTO images (id, url, url_hash, status, error, attempts, http_status, content_sha256,
                    width, height, format, bytes, path, mtime, meta, created_at, updated_at)
VALUES (:id, :url, :url_hash, 'failed', :error, 1, :http_status, :content_sha256,
        :width, :height, :format, :bytes, :path, :mtime, :meta, :now, :now)
ON CONFLICT (url_hash) DO UPDATE SET
    url = excluded.url, attempts = images.attempts + 1, error = excluded.error,
    http_status = CASE WHEN images.status = 'ok' THEN images.http_status
                       ELSE coalesce(excluded.http_status, images.http_status) END,
    content_sha256 = CASE WHEN images.status = 'ok' THEN images.content_sha256
                          ELSE coalesce(excluded.content_sha256, images.content_sha256) END,
    mtime = CASE WHEN images.status = 'ok' THEN images.mtime ELSE coalesce(excluded.mtime, images.mtime) END,
    meta = coalesce(excluded.meta, images.meta),
    status = CASE WHEN images.status = 'ok' THEN 'ok' ELSE 'failed' END,
    duplicate_of = NULL,
    updated_at = excluded.updated_at
"""

_UPSERT_DUPLICATE = """
INSERT INTO images (id, url, url_hash, status, error, attempts, http_status, content_sha256, duplicate_of,
                    width, height, format, bytes, path, mtime, meta, created_at, updated_at)
VALUES (:id, :url, :url_hash, 'duplicate', NULL, 1, :http_status, :content_sha256, :duplicate_of,
        :width, :height, :format, :bytes, :path, :mtime, :meta, :now, :now)
ON CONFLICT (url_hash) DO UPDATE SET
    url = excluded.url, status = 'duplicate', error = NULL, attempts = images.attempts + 1,
    http_status = excluded.http_status, content_sha256 = excluded.content_sha256,
    duplicate_of = excluded.duplicate_of, width = excluded.width, height = excluded.height,
    format = excluded.format, bytes = excluded.bytes, path = excluded.path, mtime = excluded.mtime,
    meta = coalesce(excluded.meta, images.meta), updated_at = excluded.updated_at
"""


def record_ok(conn, row: dict, vector) -> tuple[int, str]:
    """Insert or update the row as ok and replace its vector (DELETE + INSERT: vec0 has no upsert).

    ``row``: url (required) and any of url_hash (computed when absent), http_status, content_sha256,
    width, height, format, bytes, path, mtime, meta (dict or JSON text), id (the id a NEW row gets; an
    existing row keeps its own). ``vector``: shape (D,),
    L2-normalised (ValueError otherwise). If another ok row already holds the same content_sha256 the
    row is recorded as its duplicate instead. Returns ``(image_id, status_recorded)``.
    """
    with transaction(conn):
        dim = _model_dim(conn)
        blob = _check_vector(vector, dim)
        params = _row_params(row)
        holder = find_by_content(conn, params["content_sha256"])
        if holder is not None:
            mine = _existing(conn, params["url_hash"])
            if mine is None or int(mine["id"]) != holder:
                return record_duplicate(conn, row, holder)
        before = conn.execute("SELECT id, status, content_sha256 FROM images WHERE url_hash = ?",
                              (params["url_hash"],)).fetchone()
        if before is not None and before["status"] == "ok" and before["content_sha256"] != params["content_sha256"]:
            _promote_duplicate(conn, int(before["id"]))
        conn.execute(_UPSERT_OK, params)
        image_id = int(_existing(conn, params["url_hash"])["id"])
        conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (image_id,))
        _insert_vector(conn, image_id, blob)
        return image_id, "ok"


def _promote_duplicate(conn, image_id: int) -> None:
    """The ok row ``image_id`` is about to hold other content: its first duplicate takes over the old
    content and vector (becoming ok), and the other duplicates point at that one."""
    dups = [int(r[0]) for r in conn.execute(
        "SELECT id FROM images WHERE duplicate_of = ? AND status = 'duplicate' ORDER BY id", (image_id,))]
    if not dups:
        return
    heir = dups[0]
    old = conn.execute("SELECT embedding FROM image_embeddings WHERE image_id = ?", (image_id,)).fetchone()
    # the old content's unique-ok slot is freed first: the row being replaced stops being ok for a moment
    conn.execute("UPDATE images SET content_sha256 = NULL WHERE id = ?", (image_id,))
    conn.execute("UPDATE images SET status = 'ok', duplicate_of = NULL, updated_at = ? WHERE id = ?", (_now(), heir))
    conn.execute("UPDATE images SET duplicate_of = ? WHERE duplicate_of = ? AND status = 'duplicate'", (heir, image_id))
    if old is not None:
        conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (heir,))
        _insert_vector(conn, heir, old[0])


def _insert_vector(conn, image_id: int, blob) -> None:
    """INSERT a vector into its search-index list (index.insert), in the caller's transaction."""
    from . import index

    index.insert(conn, image_id, bytes(blob))


def record_failed(conn, row: dict) -> tuple[int, str]:
    """Insert or update the row as failed: attempts + 1, ``error`` set ("reason-tag: message").

    A row that was ok stays ok (with its vector and data); only attempts, error, url, meta (when
    given) and updated_at change.
    Returns ``(image_id, status_recorded)``.
    """
    with transaction(conn):
        params = _row_params(row)
        if not params["error"]:
            raise ValueError("record_failed needs the row's error")
        conn.execute(_UPSERT_FAILED, params)
        found = _existing(conn, params["url_hash"])
        return int(found["id"]), found["status"]


def record_duplicate(conn, row: dict, duplicate_of: int | None = None) -> tuple[int, str]:
    """Insert or update the row as a duplicate of the ok row ``duplicate_of`` (looked up by the row's
    content_sha256 when None, so a batch may name content committed earlier in the same batch). Any
    vector the row had is removed. Returns ``(image_id, status_recorded)``.
    """
    with transaction(conn):
        params = _row_params(row)
        if duplicate_of is None:
            duplicate_of = find_by_content(conn, params["content_sha256"])
            if duplicate_of is None:
                raise ValueError(f"{params['url']}: no ok image holds content {params['content_sha256']}")
        target = conn.execute("SELECT status, url_hash FROM images WHERE id = ?", (duplicate_of,)).fetchone()
        if (target is None or target["status"] != "ok") and params["content_sha256"]:
            # the named holder changed since it was looked up (another process): the content's current one
            holder = find_by_content(conn, params["content_sha256"])
            if holder is not None:
                duplicate_of = holder
                target = conn.execute("SELECT status, url_hash FROM images WHERE id = ?", (holder,)).fetchone()
        if target is None or target["status"] != "ok":
            raise ValueError(f"{params['url']}: duplicate_of={duplicate_of} is not an ok image")
        if target["url_hash"] == params["url_hash"]:  # the same URL already holds this content
            return int(duplicate_of), "ok"
        before = conn.execute("SELECT id, status, content_sha256 FROM images WHERE url_hash = ?",
                              (params["url_hash"],)).fetchone()
        if before is not None and before["status"] == "ok" and before["content_sha256"] != params["content_sha256"]:
            _promote_duplicate(conn, int(before["id"]))  # its old content lives on in its first duplicate
        params["duplicate_of"] = int(duplicate_of)
        conn.execute(_UPSERT_DUPLICATE, params)
        image_id = int(_existing(conn, params["url_hash"])["id"])
        if _table_exists(conn, "image_embeddings"):
            conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (image_id,))
        return image_id, "duplicate"


def commit_batch(conn, outcomes) -> list[tuple[int, str]]:
    """Record a batch of outcomes in ONE transaction (all or nothing); returns ``[(image_id, status)]``.

    Each outcome is a dict: the row's keys (see :func:`record_ok`) plus ``status`` ("ok", "failed" or
    "duplicate"), ``vector`` for ok, optionally ``duplicate_of`` for duplicate, ``error`` for failed.
    Outcomes are applied in order, so a duplicate may refer to content recorded ok earlier in the batch.
    """
    results = []
    with transaction(conn):
        for outcome in outcomes:
            outcome = dict(outcome)
            status = outcome.pop("status", None)
            if status == "ok":
                vector = outcome.pop("vector")
                results.append(record_ok(conn, outcome, vector))
            elif status == "failed":
                results.append(record_failed(conn, outcome))
            elif status == "duplicate":
                results.append(record_duplicate(conn, outcome, outcome.pop("duplicate_of", None)))
            else:
                raise ValueError(f"outcome status must be one of {', '.join(STATUSES)}, not {status!r}")
    return results


def get_image(conn, image_id: int) -> dict | None:
    """The images row as a dict (meta parsed), or None."""
    row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
    if row is None:
        return None
    result = dict(row)
    result["meta"] = json.loads(result["meta"]) if result["meta"] else None
    return result


def get_vector(conn, image_id: int) -> np.ndarray | None:
    """The stored float32 vector of an image, or None."""
    if not _table_exists(conn, "image_embeddings"):
        return None
    row = conn.execute("SELECT embedding FROM image_embeddings WHERE image_id = ?", (image_id,)).fetchone()
    return None if row is None else np.frombuffer(row[0], dtype="<f4").astype(np.float32)


# ---------------------------------------------------------------- runs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or cannot tell
    return True


def mark_interrupted(conn) -> list[int]:
    """Mark 'running' runs of this host whose process is gone as 'interrupted'; returns their ids."""
    host = socket.gethostname()
    with transaction(conn):
        rows = conn.execute("SELECT id, pid, host FROM runs WHERE status = 'running'").fetchall()
        dead = [
            int(r["id"]) for r in rows
            if r["pid"] is not None and r["host"] == host and not _pid_alive(int(r["pid"]))
        ]
        for run_id in dead:
            conn.execute(
                "UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, ?) WHERE id = ?",
                (_now(), run_id),
            )
    return dead


def start_run(conn, source) -> int:
    """Record the start of an ingest run (this pid and host); first marks dead 'running' runs
    'interrupted'. Returns the run id."""
    mark_interrupted(conn)
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO runs (started_at, source, pid, host, status) VALUES (?, ?, ?, ?, 'running')",
            (_now(), None if source is None else str(source), os.getpid(), socket.gethostname()),
        )
        return int(cur.lastrowid)


def finish_run(conn, run_id: int, counts: dict, status: str = "completed") -> None:
    """Record the end of a run: counts ``new``, ``skipped``, ``failed``, ``duplicate`` (missing = 0),
    ``images_per_s`` (when absent: new / elapsed seconds since started_at) and the final status
    ('completed', 'interrupted' or 'crashed')."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
    c = {key: int(counts.get(key) or 0) for key in ("new", "skipped", "failed", "duplicate")}
    rate = counts.get("images_per_s")
    with transaction(conn):
        row = conn.execute("SELECT started_at FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"no run {run_id}")
        if rate is None:
            elapsed = max(time.time() - _parse_time(row[0]), 1e-3)
            rate = c["new"] / elapsed
        conn.execute(
            "UPDATE runs SET finished_at = ?, new = ?, skipped = ?, failed = ?, duplicate = ?, "
            "images_per_s = ?, status = ? WHERE id = ?",
            (_now(), c["new"], c["skipped"], c["failed"], c["duplicate"], float(rate), status, run_id),
        )


# ---------------------------------------------------------------- search

# The statements: retrieval/index.py (IVF_SQL, EXACT_SQL, and the k > 4096 ones).


def search(conn, vector, k: int, exact: bool | None = None, nprobe: int | None = None) -> list[dict]:
    """The ``k`` nearest images to ``vector`` (D floats, L2-normalised by the caller), nearest first:
    ``[{rank (1-based), id, url, path, score (= 1 - cosine distance), width, height, meta (dict)}]``.
    One SQL statement (retrieval/index.py): with a trained index, the IVF query probing the nearest
    lists (``nprobe`` of them; default: the index's own); without one, or with ``exact=True``, a vec0
    KNN over every vector (k <= 4096) or its equivalent above."""
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, not {k}")
    if not _table_exists(conn, "image_embeddings"):
        return []
    dim = _model_dim(conn)
    q = np.asarray(vector, dtype=np.float32)
    if q.ndim != 1 or q.shape[0] != dim:
        raise ModelMismatchError(
            f"{db_name(conn)} holds {dim}-d vectors; the query vector has shape {q.shape}"
        )
    from . import index

    rows = index.search(conn, q, k, exact=exact, nprobe=nprobe)
    return [
        {
            "rank": rank,
            "id": int(r["id"]),
            "url": r["url"],
            "path": r["path"],
            "score": float(r["score"]),
            "width": r["width"],
            "height": r["height"],
            "meta": json.loads(r["meta"]) if r["meta"] else None,
        }
        for rank, r in enumerate(rows, start=1)
    ]


# ---------------------------------------------------------------- stats and checks


def _count_vectors(conn) -> int:
    from . import index  # counts vec0's rowids shadow table: no row-by-row scan

    return index.count_vectors(conn)


def stats(conn) -> dict:
    """``{database, file_bytes, wal_bytes, counts: {ok, failed, duplicate, total}, model (dict|None),
    vectors, migrations: [names], runs: [last 5 runs as dicts, newest first]}``."""
    counts = {status: 0 for status in STATUSES}
    for row in conn.execute("SELECT status, count(*) FROM images GROUP BY status"):
        counts[row[0]] = int(row[1])
    counts["total"] = sum(counts.values())
    file_name = None
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            file_name = row[2]

    def size(p):
        try:
            return os.path.getsize(p)
        except OSError:
            return 0

    runs = [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 5")]
    from . import index

    n_vectors = _count_vectors(conn)
    return {
        "database": db_name(conn),
        "file_bytes": size(file_name) if file_name else 0,
        "wal_bytes": size(file_name + "-wal") if file_name else 0,
        "counts": counts,
        "model": get_model(conn),
        "vectors": n_vectors,
        "index": index.summary(conn, n_vectors),
        "migrations": applied_migrations(conn),
        "runs": runs,
    }


# Consistency queries (store.check and doctor): each selects the ids of the rows with that problem.
SQL_OK_WITHOUT_VECTOR = ("SELECT id FROM images WHERE status = 'ok' "
                         "AND id NOT IN (SELECT image_id FROM image_embeddings) ORDER BY id")
SQL_ORPHAN_VECTORS = ("SELECT image_id FROM image_embeddings "
                      "WHERE image_id NOT IN (SELECT id FROM images WHERE status = 'ok') ORDER BY image_id")
# parameters: a zero vector of the table's width, the tolerance; NaN norms come back NULL and count as bad
SQL_BAD_NORMS = ("SELECT image_id FROM image_embeddings "
                 "WHERE ifnull(abs(vec_distance_l2(embedding, ?) - 1.0), 1e300) > ? ORDER BY image_id")
SQL_DANGLING_DUPLICATES = (
    "SELECT d.id FROM images AS d LEFT JOIN images AS o ON o.id = d.duplicate_of "
    "WHERE d.status = 'duplicate' AND (o.id IS NULL OR o.status != 'ok') ORDER BY d.id")


def check(conn, limit: int = 10) -> list[str]:
    """Consistency problems (empty list = healthy): SQLite integrity_check, missing model record or
    vector table, ok rows without a vector, vectors without an ok row, vectors whose L2 norm is not ~1,
    duplicates pointing at a row that is not ok. At most ``limit`` ids are listed per problem."""
    problems = []
    integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        problems.extend(f"integrity_check: {line}" for line in integrity[:limit])

    def listed(ids):
        shown = ", ".join(str(i) for i in ids[:limit])
        return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")

    model = get_model(conn)
    has_vectors = _table_exists(conn, "image_embeddings")
    if model is None:
        problems.append("no model record")
    if not has_vectors:
        if model is not None:
            problems.append("model recorded but the image_embeddings table is missing")
        n_ok = conn.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
        if n_ok:
            problems.append(f"{n_ok} ok images but no image_embeddings table")
    else:
        ids = [r[0] for r in conn.execute(SQL_OK_WITHOUT_VECTOR)]
        if ids:
            problems.append(f"{len(ids)} ok images without a vector: ids {listed(ids)}")
        ids = [r[0] for r in conn.execute(SQL_ORPHAN_VECTORS)]
        if ids:
            problems.append(f"{len(ids)} vectors without an ok image: image_ids {listed(ids)}")
        dim = int(model["dim"]) if model else None
        if dim:
            zero = np.zeros(dim, dtype="<f4").tobytes()
            ids = [r[0] for r in conn.execute(SQL_BAD_NORMS, (zero, NORM_TOLERANCE))]
            if ids:
                problems.append(f"{len(ids)} vectors not L2-normalised: image_ids {listed(ids)}")
    ids = [r[0] for r in conn.execute(SQL_DANGLING_DUPLICATES)]
    if ids:
        problems.append(f"{len(ids)} duplicates not pointing at an ok image: ids {listed(ids)}")
    return problems
