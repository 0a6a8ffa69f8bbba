"""Opening a gallery file safely: read-only readers, refusing what is not a gallery, naming damage.

Readers (``query``, ``stats``, ``doctor`` without ``--repair``) open the database with
:func:`open_readonly` (``store.connect(path, readonly=True)``): a ``file:...?mode=ro`` URI, so nothing is
created, migrated or written to the database file. (SQLite itself may create the ``-wal``/``-shm``
companions of a WAL database beside it, as any reader does; the database file stays byte-for-byte the
same, and a folder where they cannot be created is handled by SQLite's read-only WAL support.)

Before anything is opened for writing (``ingest``) :func:`check_for_writing` looks at the file the
same read-only way: a file that is not a gallery (another program's SQLite database, a file with a
foreign ``images`` table, a file that is not SQLite at all) is refused with one line naming what it is,
and so is a damaged gallery (``PRAGMA quick_check``), which doctor can recover (``doctor --recover``).

:func:`explain` turns a SQLite error met while using a gallery into one line: damaged, locked by another
program, older schema (naming the command that upgrades it), or the error itself.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .errors import DatabaseError, InputError

SQLITE_HEADER = b"SQLite format 3\x00"
# the columns every gallery's images table has had since 0001 (a foreign images table lacks them)
GALLERY_IMAGE_COLUMNS = {"url", "url_hash", "status", "content_sha256"}
DAMAGE_WORDS = ("malformed", "corrupt", "not a database")
LOCK_WORDS = ("database is locked", "database table is locked", "busy")


def doctor_command(path) -> str:
    return f"python cli.py doctor --db {_q(path)}"


def recover_command(path) -> str:
    """The command that recovers the readable rows of a damaged gallery into a new file."""
    p = Path(path)
    return f"python cli.py doctor --db {_q(p)} --recover {_q(p.with_name(p.stem + '-recovered.db'))}"


def upgrade_command(path) -> str:
    return f"python cli.py doctor --db {_q(path)} --repair"


def _q(path) -> str:
    import shlex

    return shlex.quote(str(path))


def is_damage(exc) -> bool:
    text = str(exc).lower()
    return any(w in text for w in DAMAGE_WORDS)


def is_lock(exc) -> bool:
    text = str(exc).lower()
    return any(w in text for w in LOCK_WORDS)


def damaged_error(path, exc) -> DatabaseError:
    return DatabaseError(f"{path}: the database is damaged ({exc}); recover its readable rows into a new file: "
                         f"{recover_command(path)}")


def locked_error(path, exc=None) -> DatabaseError:
    from .store import BUSY_TIMEOUT_S

    return DatabaseError(f"{path}: the database is locked by another program (waited {BUSY_TIMEOUT_S:g} s"
                         f"{'; ' + str(exc) if exc else ''}); try again when it has finished")


def explain(path, exc) -> DatabaseError:
    """A SQLite error met while using the gallery at ``path``, as one line (a DatabaseError)."""
    text = str(exc)
    if is_damage(exc):
        return damaged_error(path, exc)
    if is_lock(exc):
        return locked_error(path, exc)
    if "no such table" in text or "no such column" in text:
        return DatabaseError(f"{path}: the gallery's schema is older than this code needs ({text}); upgrade it "
                             f"with: {upgrade_command(path)} (or any ingest into it)")
    if "readonly" in text.replace("-", "").replace(" ", "").lower():
        journal = Path(f"{path}-journal")
        if journal.is_file() and journal.stat().st_size > 0:  # SQLITE_READONLY_ROLLBACK
            return DatabaseError(f"{path}: an interrupted write left {journal.name}, which only a writer can roll "
                                 f"back: run {upgrade_command(path)} (or re-run the interrupted command)")
        return DatabaseError(f"{path}: cannot write the database ({text})")
    return DatabaseError(f"{path}: database error: {text}")


# ---------------------------------------------------------------- what a file is


@dataclass
class FileInfo:
    path: Path
    kind: str  # missing | not-a-file | empty-file | not-sqlite | damaged | empty-sqlite | foreign | gallery
    what: str = ""  # the one-line description used in messages
    tables: list = field(default_factory=list)
    applied: list = field(default_factory=list)  # migrations recorded in the file
    pending: list = field(default_factory=list)  # migrations this code has that the file lacks
    unknown: list = field(default_factory=list)  # migrations the file has that this code does not know


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the database file ({exc.strerror or exc})") from None


def _uri(path: Path, immutable: bool = False) -> str:
    return "file:" + quote(str(path.resolve())) + "?mode=ro" + ("&immutable=1" if immutable else "")


def _raw_readonly(path: Path, immutable: bool = False):
    """A bare read-only connection (no extension, no pragmas that write)."""
    from . import store

    driver = store._driver()
    return driver.connect(_uri(path, immutable), uri=True, timeout=store.BUSY_TIMEOUT_S, isolation_level=None,
                          factory=store._connection_class(driver))


def inspect_file(path) -> FileInfo:
    """What the file at ``path`` is, read without writing anything (no -wal: immutable, else mode=ro)."""
    info = _inspect(Path(path), immutable=not Path(str(path) + "-wal").exists())
    if info.kind == "damaged":
        # an immutable read takes no lock: it may have caught another process creating the file. Look again,
        # this time with SQLite's locks.
        info = _inspect(Path(path), immutable=False)
    return info


def _inspect(path: Path, immutable: bool) -> FileInfo:
    from . import store

    if not path.exists():
        return FileInfo(path, "missing", "no such file")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the database file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        return FileInfo(path, "not-a-file", "not a regular file")
    if st.st_size == 0:
        return FileInfo(path, "empty-file", "an empty file (0 bytes), not a gallery database")
    if _header(path) != SQLITE_HEADER:
        return FileInfo(path, "not-sqlite", "not a SQLite database (no SQLite header)")
    # no -wal beside it: nobody has it open for writing now; immutable=1 reads without creating -wal/-shm
    try:
        conn = _raw_readonly(path, immutable)
    except store.SQLITE_ERRORS as exc:
        return FileInfo(path, "damaged", f"cannot open it ({exc})")
    try:
        try:
            rows = conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        except store.SQLITE_ERRORS as exc:
            if "not a database" in str(exc) or "malformed" in str(exc) or "corrupt" in str(exc):
                return FileInfo(path, "damaged", f"its schema cannot be read ({exc})")
            if is_lock(exc):
                raise locked_error(path, exc) from None
            raise DatabaseError(f"{path}: cannot read the database ({exc})") from None
        tables = sorted(r[1] for r in rows if r[0] == "table" and not r[1].startswith("sqlite_"))
        if not tables:
            return FileInfo(path, "empty-sqlite", "an empty SQLite database (no tables), not a gallery database")
        names = set(tables)
        if "images" not in names and "migrations" not in names:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            return FileInfo(path, "foreign", f"another program's SQLite database (tables {shown}), not a gallery "
                                             "database", tables)
        if "images" in names:
            try:
                cols = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
            except store.SQLITE_ERRORS as exc:
                return FileInfo(path, "damaged", f"its images table cannot be read ({exc})", tables)
            if not GALLERY_IMAGE_COLUMNS <= cols:
                return FileInfo(path, "foreign", f"another program's SQLite database: its images table is not a "
                                                 f"gallery's (columns {', '.join(sorted(cols))})", tables)
        if "migrations" not in names:
            return FileInfo(path, "foreign", "a SQLite database with an images table but no migrations table: not "
                                             "made by dinov2-gallery", tables)
        try:
            applied = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
        except store.SQLITE_ERRORS as exc:
            return FileInfo(path, "damaged", f"its migrations table cannot be read ({exc})", tables)
        known = [name for name, _ in store.available_migrations()]
        return FileInfo(path, "gallery", "a gallery database", tables, applied,
                        pending=[n for n in known if n not in applied],
                        unknown=[n for n in applied if n not in known])
    finally:
        conn.close()


def _refuse(info: FileInfo, allow_newer: bool = False):
    if info.kind == "missing":
        raise InputError(f"{info.path}: no such gallery database")
    if info.kind == "not-a-file":
        raise InputError(f"{info.path}: not a regular file")
    if info.kind == "damaged":
        if info.what.startswith("its schema"):
            raise DatabaseError(f"{info.path}: the database is damaged: {info.what}; its rows cannot be recovered "
                                "without it: restore the file from a backup")
        raise damaged_error(info.path, info.what)
    if info.kind != "gallery":
        raise DatabaseError(f"{info.path}: {info.what}; left unchanged")
    if info.unknown and not allow_newer:
        raise DatabaseError(f"{info.path}: the database is newer than this code (unknown migration "
                            f"{', '.join(info.unknown)}); upgrade dinov2-gallery to use it")


def open_readonly(path, *, allow_newer: bool = False):
    """A read-only connection to an existing gallery: nothing is created or migrated, and what is not a
    gallery is refused with one line naming what it is (the file is left unchanged).

    sqlite-vec is loaded, rows are the driver's Row, ``PRAGMA query_only`` is on. A gallery with pending
    migrations (an older schema) is opened as it is; ``conn.pending_migrations`` lists them, and a query
    that needs a newer table or column fails with a SQLite error that :func:`explain` turns into the
    command that upgrades it. A database newer than this code is refused unless ``allow_newer`` (doctor).
    """
    from . import store

    path = Path(path)
    info = inspect_file(path)
    _refuse(info, allow_newer)
    try:
        conn = _raw_readonly(path)
    except store.SQLITE_ERRORS as exc:
        raise explain(path, exc) from None
    conn.path = str(path)
    conn.pending_migrations = info.pending
    try:
        store.load_vec(conn)
        conn.execute(f"PRAGMA busy_timeout = {int(store.BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA query_only = ON")
        conn.row_factory = store._driver().Row
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except store.SQLITE_ERRORS as exc:
        conn.close()
        raise explain(path, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def check_for_writing(path, *, quick_check: bool = True) -> FileInfo:
    """Before a writer (ingest) opens ``path``: a missing file, a 0-byte file or an empty SQLite database
    may become a gallery; a gallery must not be newer than this code nor damaged (``PRAGMA quick_check``,
    a full read of the file); anything else is refused with one line and left unchanged."""
    from . import store

    info = inspect_file(path)
    if info.kind in ("missing", "empty-file", "empty-sqlite"):
        return info
    _refuse(info)
    if quick_check:
        conn = _raw_readonly(Path(path))
        try:
            lines = [ln.strip() for r in conn.execute("PRAGMA quick_check(5)") for ln in str(r[0]).splitlines()
                     if ln.strip() and not ln.startswith("*** in database")]
        except store.SQLITE_ERRORS as exc:
            if is_lock(exc):
                raise locked_error(path, exc) from None
            lines = [str(exc)]
        finally:
            conn.close()
        if lines != ["ok"]:
            raise DatabaseError(f"{path}: the database is damaged ({lines[0]}); nothing was written to it. "
                                f"Recover its readable rows into a new file: {recover_command(path)}")
    return info
