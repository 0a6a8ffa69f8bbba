"""Recover a damaged gallery into a new file (``python cli.py doctor --db G --recover NEW.db``).

The sqlite3 shell's ``.recover`` is not an option everywhere (Debian 12's sqlite3 3.40 fails on our
galleries, vec0 tables included), so this is done here, with what every installation has:

1. the damaged file is opened read-only; its schema (``sqlite_master``) must be readable;
2. every ordinary table is re-created in a new file from its own ``CREATE`` statement (so the new file has
   exactly the old schema and migrations), and its rows are copied in rowid order; when SQLite meets a
   damaged page the copy skips the unreadable rowid range (found by probing: the first rowid past the
   damage that can be read) and carries on, so every row on a readable page is kept;
3. indexes, triggers and views are re-created afterwards (a row that would break a UNIQUE index is dropped
   and counted); the sqlite-vec table ``image_embeddings`` is re-created with the model's width and the
   vector of every recovered ``ok`` row is copied if it can be read and is a finite unit vector;
4. ``doctor --repair``'s consistency repairs run on the new file: an ok row whose vector was lost is
   marked failed (transient, so the next plain ingest fetches it again), a duplicate whose ok row was lost
   points at another holder of its content or is fetched again, runs left 'running' are closed.

Nothing is written to the damaged file. The new file is built under a temporary name and renamed at the end.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import index as search_index
from . import store
from .errors import DatabaseError, InputError

MAX_ROWID = 2**63 - 1
MIN_ROWID = -(2**63)
_VEC0 = re.compile(r"^\s*CREATE\s+VIRTUAL\s+TABLE\s+.*\bUSING\s+vec0\s*\(", re.I | re.S)
_WIDTH = re.compile(r"\bfloat\[\s*(\d+)\s*\]", re.I)


@dataclass
class TableResult:
    name: str
    copied: int = 0
    dropped: int = 0  # readable rows refused by a constraint of the schema (e.g. a UNIQUE index)
    lost_ranges: list = field(default_factory=list)  # [(first rowid, last rowid)] that could not be read
    error: str = ""  # the table could not be read at all

    @property
    def lost_estimate(self) -> int:
        return sum(b - a + 1 for a, b in self.lost_ranges if b - a < 10**9)


@dataclass
class Recovery:
    source: str
    target: str
    tables: list = field(default_factory=list)
    vectors_copied: int = 0
    vectors_lost: list = field(default_factory=list)  # image ids of ok rows whose vector could not be used
    lost_objects: list = field(default_factory=list)  # indexes/triggers/views that could not be re-created
    repairs: list = field(default_factory=list)  # what the consistency repair did on the new file

    def as_dict(self) -> dict:
        return {"source": self.source, "target": self.target,
                "tables": [{"name": t.name, "copied": t.copied, "dropped": t.dropped,
                            "lost_rowid_ranges": t.lost_ranges, "error": t.error or None} for t in self.tables],
                "vectors_copied": self.vectors_copied, "vectors_lost": self.vectors_lost,
                "lost_objects": self.lost_objects, "repairs": self.repairs}

    def lines(self) -> list[str]:
        out = [f"recovered {self.source} -> {self.target}"]
        for t in self.tables:
            if t.error:
                out.append(f"  {t.name}: nothing readable ({t.error})")
                continue
            lost = ""
            if t.lost_ranges:
                ranges = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in t.lost_ranges[:5])
                lost = f"; unreadable rowids {ranges}{', ...' if len(t.lost_ranges) > 5 else ''}"
            dropped = f"; {t.dropped} dropped (constraint)" if t.dropped else ""
            out.append(f"  {t.name}: {t.copied} row{'' if t.copied == 1 else 's'}{lost}{dropped}")
        lost = len(self.vectors_lost)
        out.append(f"  vectors: {self.vectors_copied} copied" + (
            f"; {lost} unreadable (ids {', '.join(map(str, self.vectors_lost[:5]))}{', ...' if lost > 5 else ''}: "
            "those rows are fetched again by the next ingest)" if lost else ""))
        for o in self.lost_objects:
            out.append(f"  not re-created: {o}")
        for r in self.repairs:
            out.append(f"  repair: {r}")
        return out


def _is_damage(exc) -> bool:
    from .dbopen import is_damage

    return is_damage(exc)


def _copy_rows(src, dst, name: str, columns: list[str], result: TableResult, deadline: float) -> None:
    """Copy the rows of table ``name`` in rowid order, skipping unreadable rowid ranges."""
    cols = ", ".join(f'"{c}"' for c in columns)
    select = f'SELECT rowid, {cols} FROM "{name}" WHERE rowid >= ? ORDER BY rowid'
    insert = f'INSERT OR IGNORE INTO "{name}" (rowid, {cols}) VALUES ({", ".join("?" * (len(columns) + 1))})'
    pos = MIN_ROWID
    last_read = None
    while pos is not None:
        if time.monotonic() > deadline:
            result.lost_ranges.append((pos, MAX_ROWID))
            return
        try:
            for row in src.execute(select, (pos,)):
                rowid = row[0]
                if rowid < pos:  # a damaged page out of order: ignore what goes backwards
                    continue
                cur = dst.execute(insert, tuple(row))
                if cur.rowcount == 1:
                    result.copied += 1
                else:
                    result.dropped += 1
                last_read = rowid
                pos = rowid + 1 if rowid < MAX_ROWID else None
                if pos is None:
                    break
            return
        except store.SQLITE_ERRORS as exc:
            if not _is_damage(exc):
                raise
        # the driver reads one row ahead: rows just before the damage are read one by one, by rowid
        while True:
            ok, rowid = _probe(src, name, pos)
            if not ok:
                break
            if rowid is None:
                return
            try:
                row = src.execute(f'SELECT rowid, {cols} FROM "{name}" WHERE rowid = ?', (rowid,)).fetchone()
            except store.SQLITE_ERRORS as exc:
                if not _is_damage(exc):
                    raise
                break
            cur = dst.execute(insert, tuple(row))
            if cur.rowcount == 1:
                result.copied += 1
            else:
                result.dropped += 1
            last_read = rowid
            if rowid >= MAX_ROWID:
                return
            pos = rowid + 1
        # pos..X cannot be read: find the smallest start from which reading works again
        nxt = _next_readable(src, name, pos, deadline)
        if nxt is None:  # nothing readable after pos
            result.lost_ranges.append((pos if last_read is None else last_read + 1, MAX_ROWID))
            return
        result.lost_ranges.append((pos if last_read is None else last_read + 1, nxt - 1))
        pos = nxt


def _probe(src, name: str, start: int):
    """The first rowid >= start if the page it lives on (and the path to it) can be read: (True, rowid or None);
    (False, None) when that read meets damage."""
    try:
        row = src.execute(f'SELECT rowid FROM "{name}" WHERE rowid >= ? ORDER BY rowid LIMIT 1', (start,)).fetchone()
    except store.SQLITE_ERRORS as exc:
        if not _is_damage(exc):
            raise
        return False, None
    return True, (None if row is None else row[0])


def _next_readable(src, name: str, bad: int, deadline: float) -> int | None:
    """The first rowid after ``bad`` (a start whose read fails) from which rows can be read again."""
    step = 1
    good_start = None
    while bad + step <= MAX_ROWID and time.monotonic() < deadline:
        ok, rowid = _probe(src, name, bad + step)
        if ok:
            good_start = bad + step
            break
        step *= 2
    if good_start is None:
        ok, rowid = _probe(src, name, MAX_ROWID)
        if not ok:
            return None
        good_start = MAX_ROWID
    # smallest start in (bad, good_start] that reads: binary search
    lo, hi = bad, good_start
    while hi - lo > 1 and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        ok, _ = _probe(src, name, mid)
        if ok:
            hi = mid
        else:
            lo = mid
    ok, rowid = _probe(src, name, hi)
    return rowid if ok else None


def _unit_vector(blob, dim: int) -> bytes | None:
    if blob is None or len(blob) != 4 * dim:
        return None
    v = np.frombuffer(blob, dtype="<f4").astype(np.float64)
    if not np.all(np.isfinite(v)) or abs(float(np.linalg.norm(v)) - 1.0) > store.NORM_TOLERANCE:
        return None
    return bytes(blob)


def recover(source, target, *, time_limit: float = 3600.0) -> Recovery:
    """Copy every readable row of the gallery at ``source`` into a new gallery at ``target`` (which must not
    exist); returns what was copied and lost. The source is only read."""
    from . import doctor as D
    from .dbopen import SQLITE_HEADER, _raw_readonly

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise InputError(f"{source}: no such database file")
    if target.exists():
        raise InputError(f"{target}: already exists; name a new file for the recovered gallery")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent}: no such folder")
    if source.resolve() == target.resolve():
        raise InputError(f"{target}: must be a new file, not the damaged one")
    with open(source, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise DatabaseError(f"{source}: not a SQLite database (no SQLite header): nothing to recover")
    from .dbopen import inspect_file

    info = inspect_file(source)
    if info.kind in ("foreign", "empty-sqlite"):
        raise DatabaseError(f"{source}: {info.what}: nothing to recover")
    deadline = time.monotonic() + time_limit
    src = _raw_readonly(source)
    try:
        store.load_vec(src)
        try:
            schema = src.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid").fetchall()
        except store.SQLITE_ERRORS as exc:
            raise DatabaseError(f"{source}: its schema (the first page) cannot be read ({exc}): nothing can be "
                                "recovered from it here; restore it from a backup") from None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(str(tmp) + suffix)
            except FileNotFoundError:
                pass
        report = Recovery(str(source), str(target))
        try:
            _build(src, tmp, schema, report, deadline)
        except BaseException:
            for suffix in ("", "-journal"):
                try:
                    os.unlink(str(tmp) + suffix)
                except FileNotFoundError:
                    pass
            raise
    finally:
        src.close()
    os.replace(tmp, target)
    conn = store.connect(target, apply_migrations=False)
    try:
        report.repairs = [a for a in D.repair(conn, target, known_missing=report.vectors_lost)
                          if not a.startswith("checkpointed the WAL")]
    finally:
        conn.close()
    return report


def _build(src, tmp: Path, schema, report: Recovery, deadline: float) -> None:
    driver = store._driver()
    dst = driver.connect(str(tmp), isolation_level=None)
    try:
        store.load_vec(dst)
        dst.execute("PRAGMA journal_mode = OFF")
        dst.execute("PRAGMA synchronous = OFF")
        dst.execute("PRAGMA foreign_keys = OFF")
        virtual = {r[1]: r[3] for r in schema if r[0] == "table" and r[3] and r[3].upper().startswith("CREATE VIRTUAL")}
        shadow_prefixes = tuple(f"{v}_" for v in virtual)
        tables = [r for r in schema if r[0] == "table" and r[3] and r[1] not in virtual
                  and not r[1].startswith("sqlite_") and not r[1].startswith(shadow_prefixes)]
        dst.execute("BEGIN")
        for _, name, _, sql in tables:
            dst.execute(sql)
        for _, name, _, sql in tables:
            result = TableResult(name)
            report.tables.append(result)
            try:
                columns = [r[1] for r in dst.execute(f'PRAGMA table_info("{name}")')]
                _copy_rows(src, dst, name, columns, result, deadline)
            except store.SQLITE_ERRORS as exc:
                result.error = str(exc)
        dst.execute("COMMIT")
        # indexes (a row breaking a UNIQUE index is dropped), then triggers and views
        dst.execute("BEGIN")
        for kind in ("index", "trigger", "view"):
            for _, name, tbl, sql in (r for r in schema if r[0] == kind and r[3]):
                if tbl in virtual or tbl.startswith(shadow_prefixes):
                    continue
                try:
                    dst.execute(sql)
                except store.SQLITE_ERRORS as exc:
                    if kind == "index" and "UNIQUE" in str(exc).upper():
                        _drop_unique_violations(dst, name, tbl, report)
                        try:
                            dst.execute(sql)
                            continue
                        except store.SQLITE_ERRORS as exc2:
                            exc = exc2
                    report.lost_objects.append(f"{kind} {name} ({exc})")
        # the vectors: re-create the vec0 table and copy the vector of every recovered ok row
        vec_sql = virtual.get("image_embeddings")
        if vec_sql and _VEC0.match(vec_sql):
            width = _WIDTH.search(vec_sql)
            if width:
                dim = int(width.group(1))
                store._create_vectors_table(dst, dim)
                _copy_vectors(src, dst, dim, report)
        for name, sql in virtual.items():
            if name != "image_embeddings":
                report.lost_objects.append(f"virtual table {name} (re-create it with the command that made it)")
        dst.execute("COMMIT")
    finally:
        dst.close()


def _drop_unique_violations(dst, index: str, table: str, report: Recovery) -> None:
    """Rows that keep a UNIQUE index from being re-created: all but the first of each clash are deleted."""
    cols = [r[2] for r in dst.execute(f'PRAGMA index_info("{index}")')]
    if not cols:
        return
    key = ", ".join(f'"{c}"' for c in cols)
    cur = dst.execute(f'DELETE FROM "{table}" WHERE rowid NOT IN (SELECT min(rowid) FROM "{table}" GROUP BY {key})'
                      f' AND ({key}) IN (SELECT {key} FROM "{table}" GROUP BY {key} HAVING count(*) > 1)'
                      if len(cols) > 1 else
                      f'DELETE FROM "{table}" WHERE rowid NOT IN (SELECT min(rowid) FROM "{table}" GROUP BY {key})'
                      f' AND {key} IN (SELECT {key} FROM "{table}" GROUP BY {key} HAVING count(*) > 1)')
    for t in report.tables:
        if t.name == table:
            t.dropped += cur.rowcount
            t.copied -= cur.rowcount


def _shadow_vectors(src, wanted: set, dim: int) -> dict:
    """Vectors read straight from sqlite-vec's shadow tables (``image_embeddings_rowids``: rowid -> chunk and
    offset; ``image_embeddings_vector_chunks00``: one blob of up to 1024 vectors per chunk), each chunk once.
    (A vec0 scan reads the whole chunk blob for every row.) Unreadable rows and chunks are simply missing."""
    found: dict[int, bytes] = {}
    locations = {}
    result = TableResult("image_embeddings_rowids")
    try:
        cur = src.execute('SELECT rowid, chunk_id, chunk_offset FROM "image_embeddings_rowids" ORDER BY rowid')
        for rowid, chunk, offset in cur:
            if rowid in wanted:
                locations[rowid] = (chunk, offset)
    except store.SQLITE_ERRORS as exc:
        if not _is_damage(exc) and "no such" not in str(exc):
            raise
        result.error = str(exc)
    by_chunk: dict = {}
    for rowid, (chunk, offset) in locations.items():
        by_chunk.setdefault(chunk, []).append((rowid, offset))
    size = 4 * dim
    for chunk, members in by_chunk.items():
        try:
            row = src.execute('SELECT vectors FROM "image_embeddings_vector_chunks00" WHERE rowid = ?',
                              (chunk,)).fetchone()
        except store.SQLITE_ERRORS as exc:
            if not _is_damage(exc) and "no such" not in str(exc):
                raise
            continue
        if row is None or row[0] is None:
            continue
        blob = bytes(row[0])
        for rowid, offset in members:
            if offset is not None and 0 <= offset and (offset + 1) * size <= len(blob):
                found[rowid] = blob[offset * size:(offset + 1) * size]
    return found


def _copy_vectors(src, dst, dim: int, report: Recovery) -> None:
    try:
        ok_ids = [r[0] for r in dst.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id")]
    except store.SQLITE_ERRORS:
        return
    found = _shadow_vectors(src, set(ok_ids), dim)
    for image_id in ok_ids:  # what the shadow tables did not give (or gave wrong): through vec0, one by one
        if _unit_vector(found.get(image_id), dim) is not None:
            continue
        try:
            row = src.execute("SELECT embedding FROM image_embeddings WHERE image_id = ?", (image_id,)).fetchone()
        except store.SQLITE_ERRORS as exc:
            if not _is_damage(exc) and "no such" not in str(exc):
                raise
            continue
        if row is not None:
            found[image_id] = row[0]
    for image_id in ok_ids:
        blob = _unit_vector(found.get(image_id), dim)
        if blob is None:
            report.vectors_lost.append(image_id)
            continue
        search_index.insert(dst, image_id, blob)  # into its list of the search index (0 without one)
        report.vectors_copied += 1
