"""Gallery health check (``python cli.py doctor``): what is wrong with a gallery database, and the repair.

:func:`examine` opens the database (never creating it, never applying migrations), runs every check and,
with ``repair=True``, fixes what can be fixed without losing an ``ok`` row that has a vector, then checks
again. Each check ends ``ok``, ``problem`` or ``fixed`` (a problem that ``--repair`` removed), or
``skipped`` (its tables do not exist yet). The checks:

- ``versions``: ``sqlite_version()`` and ``vec_version()`` (information);
- ``quick_check``, ``integrity_check``: SQLite's own. A corrupt database is never repaired in place: the
  route is ``python cli.py doctor --db gallery.db --recover new.db`` (``retrieval/recover.py``: every
  readable row into a new file);
- ``migrations``: applied vs available (pending ones are applied by ``--repair``; a migration this code
  does not know means the database is newer than the code);
- ``model``: the model record exists when there are vectors, the ``image_embeddings`` vec0 table exists,
  and its width ``float[W]`` equals the recorded ``dim``;
- ``vectors_missing``: ok rows without a vector -> marked failed with a transient reason (see
  :data:`VECTOR_MISSING`, attempts reset to 0) so that the next plain ``ingest`` fetches them again;
- ``vectors_orphan``: vectors whose image row is missing or not ok -> deleted;
- ``vector_norms``: vectors whose L2 norm is not 1 within 1e-3 -> renormalised (DELETE + INSERT: vec0 has
  no upsert); a zero or non-finite vector cannot be, so it is deleted and its row handled as above;
- ``search_index``: the vec0 table has the current layout (partition key ``list``, ``chunk_size=128``;
  else -> rewritten, vectors unchanged); with a trained index (``python cli.py index``), the centroids
  table matches the state row (else -> the index is dropped: exact search) and every vector is in its
  nearest centroid's list (a vector inserted without its list, e.g. from the sqlite3 shell, is found by
  exact search only -> moved into its list). Information: when a (re)build is advised;
- ``duplicates``: duplicate rows pointing at a missing or non-ok row -> re-pointed at the ok row holding
  the same content when there is one, else marked failed (transient, :data:`DUPLICATE_DANGLING`);
- ``runs``: runs left 'running' by a process of this host that no longer exists -> 'interrupted';
- ``originals``: stored originals (``images.path``, relative to the database's folder or absolute; for
  local-file rows the file itself) missing on disk: manual (restore them; the vectors are intact);
- ``orphan_files``: files in the images folder (``<db name>_images``) that no row refers to, e.g. originals
  stored by a run killed before it committed their rows -> deleted (not while a run is in progress);
- ``wal``: the size of the ``-wal`` file (a problem above :data:`WAL_LIMIT`): ``--repair`` always runs
  ``PRAGMA wal_checkpoint(TRUNCATE)``.

All data repairs run in ONE transaction (``BEGIN IMMEDIATE``), migrations included; the checkpoint
follows it.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dbopen, store
from . import index as search_index
from .errors import DatabaseError, InputError

EXAMPLES = 5  # ids shown per problem
WAL_LIMIT = 64 * 1024 * 1024  # a -wal file above this is a problem (checkpoints are being starved)
# Reasons written by --repair. The "incomplete" tag is one ingest.is_transient() accepts, and attempts are
# reset to 0, so a plain `ingest` run (no --retry-failed) fetches these rows again.
VECTOR_MISSING = "incomplete: doctor --repair: the row was ok but had no usable vector; the next ingest fetches it again"
DUPLICATE_DANGLING = ("incomplete: doctor --repair: duplicate of a missing or non-ok image; "
                      "the next ingest fetches it again")
_WIDTH = re.compile(r"\bfloat\[\s*(\d+)\s*\]", re.I)


@dataclass
class Check:
    name: str  # stable id: versions, quick_check, ..., wal
    status: str = "ok"  # ok | problem | fixed | skipped
    detail: str = ""  # one line: what was found
    count: int = 0  # how many rows/files/... are affected
    examples: list = field(default_factory=list)  # a few ids (or names)
    repair: str = ""  # problem: what --repair does, or the manual instruction
    auto: bool = False  # --repair fixes it
    done: str = ""  # fixed: what --repair did

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "count": self.count,
                "examples": self.examples, "repair": self.repair or None,
                "repair_automatic": self.auto if self.status in ("problem", "fixed") else None,
                "done": self.done or None}


@dataclass
class Report:
    database: str
    checks: list
    repaired: bool = False  # --repair was asked
    actions: list = field(default_factory=list)  # what --repair did, in order
    versions: dict = field(default_factory=dict)

    @property
    def problems(self) -> list:
        return [c for c in self.checks if c.status == "problem"]

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"database": self.database, "healthy": self.healthy, "repair": self.repaired,
                "problems": len(self.problems), "versions": self.versions,
                "checks": [c.as_dict() for c in self.checks], "actions": self.actions}


# ---------------------------------------------------------------- opening


def open_gallery(path, *, readonly: bool = True):
    """A connection to an existing gallery database, without creating it or migrating it: read-only unless
    ``readonly=False`` (``--repair``).

    InputError when the file does not exist; DatabaseError when it is not a SQLite database or not a gallery
    (the file is looked at read-only first and left untouched; see ``retrieval/dbopen.py``)."""
    path = Path(path)
    if readonly:
        return dbopen.open_readonly(path, allow_newer=True)
    dbopen._refuse(dbopen.inspect_file(path), allow_newer=True)
    return store.connect(path, apply_migrations=False)


def recover_command(path) -> str:
    return dbopen.recover_command(path)


# ---------------------------------------------------------------- helpers


def _tables(conn) -> set:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _vec_width(conn) -> int | None:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'image_embeddings'").fetchone()
    if row is None or not row[0]:
        return None
    m = _WIDTH.search(row[0])
    return int(m.group(1)) if m else None


def _ids(conn, sql, params=()) -> list:
    return [r[0] for r in conn.execute(sql, params)]


def _listed(ids, limit=EXAMPLES) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _stale_runs(conn) -> tuple[list, list, list]:
    """'running' runs: (dead on this host, alive on this host, elsewhere or without a pid)."""
    host = socket.gethostname()
    dead, alive, unknown = [], [], []
    for r in conn.execute("SELECT id, pid, host FROM runs WHERE status = 'running' ORDER BY id"):
        if r["pid"] is None or r["host"] != host:
            unknown.append(int(r["id"]))
        elif store._pid_alive(int(r["pid"])):
            alive.append(int(r["id"]))
        else:
            dead.append(int(r["id"]))
    return dead, alive, unknown


# ---------------------------------------------------------------- checks


def _versions(conn, ctx) -> Check:
    sqlite_v, vec_v = conn.execute("SELECT sqlite_version(), vec_version()").fetchone()
    ctx["versions"] = {"sqlite": sqlite_v, "sqlite_vec": vec_v}
    return Check("versions", detail=f"SQLite {sqlite_v}, sqlite-vec {vec_v}")


def _pragma_check(pragma):
    def check(conn, ctx) -> Check:
        if ctx["corrupt"]:  # quick_check failed already: integrity_check would say the same, at length
            return Check(pragma, "skipped", detail="not run: quick_check failed")
        try:
            lines = [line for r in conn.execute(f"PRAGMA {pragma}") for line in str(r[0]).splitlines()
                     if line.strip() and not line.startswith("*** in database")]
        except store.SQLITE_ERRORS as exc:  # "database disk image is malformed": the check cannot even run
            lines = [str(exc)]
        if lines == ["ok"]:
            return Check(pragma, detail="ok")
        ctx["corrupt"] = True
        return Check(pragma, "problem", detail=f"the database is corrupt ({_plural(len(lines), 'error')}): "
                     f"{lines[0]}", count=len(lines), examples=lines[:EXAMPLES],
                     repair=f"not repaired here: copy every readable row into a new gallery with "
                            f"{recover_command(ctx['path'])} (it says what was lost and how to put the new file "
                            f"in place)")
    check.__name__ = pragma
    return check


def _migrations(conn, ctx) -> Check:
    available = [name for name, _ in store.available_migrations()]
    applied = store.applied_migrations(conn)
    unknown = [n for n in applied if n not in available]
    pending = [n for n in available if n not in applied]
    if unknown:
        ctx["newer"] = True
        return Check("migrations", "problem", detail=f"the database holds migrations this code does not know: "
                     f"{', '.join(unknown)}", count=len(unknown), examples=unknown[:EXAMPLES],
                     repair="upgrade dinov2-gallery (the database is newer than this code); nothing is repaired")
    if pending:
        return Check("migrations", "problem", detail=f"{len(applied)} of {len(available)} applied; pending: "
                     f"{', '.join(pending)}", count=len(pending), examples=pending[:EXAMPLES],
                     repair="--repair applies them (as any ingest would)", auto=True)
    return Check("migrations", detail=f"{len(applied)} applied ({', '.join(applied)}), none pending")


def _model(conn, ctx) -> Check:
    tables = ctx["tables"]
    if "model" not in tables or "images" not in tables:
        return Check("model", "skipped", detail="no model/images table (see migrations)")
    model = store.get_model(conn)
    width = _vec_width(conn)
    has_vec = "image_embeddings" in tables
    n_ok = conn.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
    if model is None:
        n_vec = conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] if has_vec else 0
        if not n_ok and not n_vec:
            return Check("model", detail="none recorded yet (empty gallery)")
        return Check("model", "problem", detail=f"no model record, but {n_ok} ok rows and {n_vec} vectors",
                     count=1, repair="manual: the model that made the vectors is unknown; rebuild the gallery: "
                     "ingest the same sources into a new database")
    desc = f"{model['variant']}, dim {model['dim']}, {model['preprocess']}, {model['interpolation']}, {model['pooling']}"
    if not has_vec:
        return Check("model", "problem", detail=f"{desc}; but the image_embeddings table is missing", count=1,
                     repair=f"--repair creates it (float[{model['dim']}]); the ok rows then lack vectors "
                            "and are handled as such", auto=True)
    if width != int(model["dim"]):
        return Check("model", "problem", detail=f"{desc}; but image_embeddings holds float[{width}] vectors",
                     count=1, repair="manual: the vectors do not match the recorded model; rebuild the gallery: "
                     "ingest the same sources into a new database")
    return Check("model", detail=f"{desc}; image_embeddings float[{width}]")


def _need_vectors(ctx, name) -> Check | None:
    if "images" not in ctx["tables"]:
        return Check(name, "skipped", detail="no images table (see migrations)")
    if "image_embeddings" not in ctx["tables"]:
        return Check(name, "skipped", detail="no image_embeddings table (see model)")
    return None


def _vectors_missing(conn, ctx) -> Check:
    if "images" in ctx["tables"] and "image_embeddings" not in ctx["tables"]:
        ids = _ids(conn, "SELECT id FROM images WHERE status = 'ok' ORDER BY id")
    else:
        skip = _need_vectors(ctx, "vectors_missing")
        if skip:
            return skip
        ids = _ids(conn, store.SQL_OK_WITHOUT_VECTOR)
    if not ids:
        return Check("vectors_missing", detail="every ok row has a vector")
    return Check("vectors_missing", "problem", detail=f"{_plural(len(ids), 'ok row')} without a vector: ids {_listed(ids)}",
                 count=len(ids), examples=ids[:EXAMPLES], auto=True,
                 repair="--repair marks them failed with the transient reason \"incomplete: doctor --repair: ...\" "
                        "(attempts reset), so the next plain `python cli.py ingest` fetches them again")


def _vectors_orphan(conn, ctx) -> Check:
    skip = _need_vectors(ctx, "vectors_orphan")
    if skip:
        return skip
    ids = _ids(conn, store.SQL_ORPHAN_VECTORS)
    if not ids:
        return Check("vectors_orphan", detail="every vector belongs to an ok row")
    return Check("vectors_orphan", "problem",
                 detail=f"{_plural(len(ids), 'vector')} whose image row is missing or not ok: image_ids {_listed(ids)}",
                 count=len(ids), examples=ids[:EXAMPLES], auto=True, repair="--repair deletes them")


def _vector_norms(conn, ctx) -> Check:
    skip = _need_vectors(ctx, "vector_norms")
    if skip:
        return skip
    width = _vec_width(conn)
    if not width:
        return Check("vector_norms", "skipped", detail="the vectors table's width is unknown")
    ids = _ids(conn, store.SQL_BAD_NORMS, (np.zeros(width, "<f4").tobytes(), store.NORM_TOLERANCE))
    if not ids:
        return Check("vector_norms", detail=f"every vector has unit L2 norm (within {store.NORM_TOLERANCE:g})")
    return Check("vector_norms", "problem",
                 detail=f"{_plural(len(ids), 'vector')} not L2-normalised: image_ids {_listed(ids)}",
                 count=len(ids), examples=ids[:EXAMPLES], auto=True,
                 repair="--repair renormalises them (a zero or non-finite vector is deleted and its row "
                        "re-fetched by the next ingest)")


def _search_index(conn, ctx) -> Check:
    skip = _need_vectors(ctx, "search_index")
    if skip:
        return skip
    found = search_index.check(conn, EXAMPLES)
    if found["status"] != "problem":
        return Check("search_index", found["status"], detail=found["detail"])
    if found.get("layout") is False:
        repair = "--repair rewrites the table in the current layout (vectors unchanged; as migration 0003 does)"
    elif found.get("centroids"):
        repair = "--repair drops the index (exact search); then rebuild it: python cli.py index"
    else:
        repair = "--repair moves each into its nearest centroid's list"
    return Check("search_index", "problem", detail=found["detail"], count=found["count"],
                 examples=found["examples"], auto=True, repair=repair)


def _duplicates(conn, ctx) -> Check:
    if "images" not in ctx["tables"]:
        return Check("duplicates", "skipped", detail="no images table (see migrations)")
    ids = _ids(conn, store.SQL_DANGLING_DUPLICATES)
    if not ids:
        return Check("duplicates", detail="every duplicate points at an ok row")
    return Check("duplicates", "problem",
                 detail=f"{_plural(len(ids), 'duplicate row')} pointing at a missing or non-ok row: ids {_listed(ids)}",
                 count=len(ids), examples=ids[:EXAMPLES], auto=True,
                 repair="--repair points each at the ok row with the same content if there is one, else marks it "
                        "failed (transient: the next plain ingest fetches it again)")


def _runs(conn, ctx) -> Check:
    if "runs" not in ctx["tables"]:
        return Check("runs", "skipped", detail="no runs table (see migrations)")
    dead, alive, unknown = _stale_runs(conn)
    notes = []
    if alive:
        notes.append(f"{_plural(len(alive), 'run')} in progress (ids {_listed(alive)})")
    if unknown:
        notes.append(f"{_plural(len(unknown), 'run')} 'running' on another host or without a pid, not judged "
                     f"(ids {_listed(unknown)})")
    if not dead:
        return Check("runs", detail="; ".join(notes) or "no run left 'running'")
    return Check("runs", "problem",
                 detail=f"{_plural(len(dead), 'run')} left 'running' by a process that is gone: ids {_listed(dead)}"
                        + (f"; {'; '.join(notes)}" if notes else ""),
                 count=len(dead), examples=dead[:EXAMPLES], auto=True,
                 repair="--repair marks them 'interrupted' (as the next ingest would)")


def _originals(conn, ctx) -> Check:
    if "images" not in ctx["tables"]:
        return Check("originals", "skipped", detail="no images table (see migrations)")
    db_dir = Path(ctx["path"]).resolve().parent
    missing, local_missing, checked = [], [], 0
    for r in conn.execute("SELECT id, url, path FROM images WHERE status IN ('ok', 'duplicate') "
                          "AND path IS NOT NULL AND path != '' ORDER BY id"):
        checked += 1
        p = Path(r["path"])
        if not p.is_absolute():
            p = db_dir / p
        if not p.is_file():
            (local_missing if r["path"] == r["url"] else missing).append(int(r["id"]))
    if not missing and not local_missing:
        return Check("originals", detail=f"the stored file of every ok/duplicate row is present ({checked} rows)")
    ids = sorted(missing + local_missing)
    parts = []
    if missing:
        parts.append(f"{_plural(len(missing), 'stored original')} missing (ids {_listed(missing)})")
    if local_missing:
        parts.append(f"{_plural(len(local_missing), 'local source file')} gone (ids {_listed(local_missing)})")
    return Check("originals", "problem", detail="; ".join(parts) + f", of {checked}", count=len(ids),
                 examples=ids[:EXAMPLES],
                 repair="manual (the vectors are intact, search still works; results point at missing files): "
                        "restore the images folder beside the database (files are named by content sha256) "
                        "from a backup; put moved local files back, or ingest them from their new place")


def _images_dir(path) -> Path:
    p = Path(path).resolve()
    return p.with_name(p.stem + "_images")  # ingest.default_images_dir


def _orphan_paths(conn, path) -> list:
    """Files in the gallery's images folder that no row refers to: originals stored by a run that stopped before
    committing their rows (or temporary files of a write cut short)."""
    folder = _images_dir(path)
    if not folder.is_dir():
        return []
    db_dir = Path(path).resolve().parent
    referenced = set()
    for (stored,) in conn.execute("SELECT path FROM images WHERE path IS NOT NULL AND path != ''"):
        p = Path(stored)
        referenced.add(str(p if p.is_absolute() else db_dir / p))
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            f = Path(dirpath) / name
            if str(f) not in referenced and str(f.resolve()) not in referenced:
                found.append(f)
    return sorted(found)


def _orphan_files(conn, ctx) -> Check:
    if "images" not in ctx["tables"]:
        return Check("orphan_files", "skipped", detail="no images table (see migrations)")
    folder = _images_dir(ctx["path"])
    files = _orphan_paths(conn, ctx["path"])
    if not files:
        return Check("orphan_files", detail=f"no file in {folder.name}/ without a row")
    names = [str(f.relative_to(folder)) for f in files]
    if "runs" in ctx["tables"] and _stale_runs(conn)[1]:
        return Check("orphan_files", detail=f"{_plural(len(files), 'file')} in {folder.name}/ without a row yet "
                     "(a run is in progress)", count=len(files), examples=names[:EXAMPLES])
    return Check("orphan_files", "problem",
                 detail=f"{_plural(len(files), 'file')} in {folder.name}/ that no row refers to (stored by a run "
                        f"that stopped before committing them): {_listed(names)}",
                 count=len(files), examples=names[:EXAMPLES], auto=True,
                 repair="--repair deletes them (the next ingest stores them again if it needs them)")


def _wal(conn, ctx) -> Check:
    wal = _size(str(ctx["path"]) + "-wal")
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    detail = f"journal_mode {mode}, -wal file {_mb(wal)}"
    if wal > WAL_LIMIT:
        return Check("wal", "problem", detail=detail + f" (above {_mb(WAL_LIMIT)}: checkpoints are being held off, "
                     "usually by a long-lived reader)", count=1, examples=[wal], auto=True,
                     repair="--repair checkpoints it (PRAGMA wal_checkpoint(TRUNCATE)); close other readers first")
    return Check("wal", detail=detail)


CHECKS = (_versions, _pragma_check("quick_check"), _pragma_check("integrity_check"), _migrations, _model,
          _vectors_missing, _vectors_orphan, _vector_norms, _search_index, _duplicates, _runs, _originals,
          _orphan_files, _wal)


def diagnose(conn, path) -> tuple[list, dict]:
    """Run every check; returns (checks, context). A check that raises (e.g. on a corrupt file) is a problem."""
    ctx = {"path": Path(path), "corrupt": False, "newer": False, "versions": {}}
    checks = []
    # read the file memory-mapped: the checks read every page (half the CPU of read() calls at 1M vectors)
    conn.execute(f"PRAGMA mmap_size = {search_index.MMAP_BYTES}").fetchall()
    conn.execute("BEGIN")  # one read snapshot for every check (WAL: an ingest may be committing meanwhile)
    try:
        ctx["tables"] = _tables(conn)
        for fn in CHECKS:
            name = fn.__name__.lstrip("_")
            if ctx["corrupt"] and fn not in CHECKS[:3] and name != "wal":
                checks.append(Check(name, "skipped", detail="not checked: the database is corrupt"))
                continue
            try:
                checks.append(fn(conn, ctx))
            except store.SQLITE_ERRORS as exc:
                corrupt = any(w in str(exc).lower() for w in ("malformed", "corrupt", "not a database"))
                ctx["corrupt"] = ctx["corrupt"] or corrupt
                checks.append(Check(name, "problem", detail=f"the check failed: {exc}", count=1,
                                    repair=f"the database looks corrupt: recover it: {recover_command(ctx['path'])}"
                                    if corrupt else "manual: inspect the database with the sqlite3 shell"))
    finally:
        if conn.in_transaction:
            try:
                conn.execute("COMMIT")  # a read-only transaction: nothing to write
            except store.SQLITE_ERRORS:  # e.g. "database disk image is malformed"
                try:
                    conn.execute("ROLLBACK")
                except store.SQLITE_ERRORS:
                    pass  # SQLite already ended it
    return checks, ctx


# ---------------------------------------------------------------- repair


def _mark_refetch(conn, ids, reason, now) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        conn.execute(
            f"UPDATE images SET status = 'failed', error = ?, attempts = 0, duplicate_of = NULL, updated_at = ? "
            f"WHERE id IN ({', '.join('?' * len(chunk))})", (reason, now, *chunk))


def repair(conn, path, *, known_missing=None) -> list[str]:
    """Fix what can be fixed, in one transaction, then checkpoint the WAL; returns what was done.

    Never deletes an ok row or the vector of an ok row whose vector is usable. ``known_missing`` (from
    ``doctor --recover``, which inserted only checked unit vectors of ok rows): the ok rows without a vector,
    so the scans of the vectors table are skipped."""
    actions = []
    now = store._now()
    with store.transaction(conn):
        done = store.migrate(conn)
        if done:
            actions.append(f"applied migrations {', '.join(done)}")
        tables = _tables(conn)
        model = store.get_model(conn) if "model" in tables else None
        if model is not None and "image_embeddings" not in tables:
            store._create_vectors_table(conn, int(model["dim"]))
            actions.append(f"created image_embeddings float[{int(model['dim'])}]")
            tables = _tables(conn)
        width = _vec_width(conn)
        if known_missing is not None:
            ids = sorted(known_missing)
            _mark_refetch(conn, ids, VECTOR_MISSING, now)
            if ids:
                actions.append(f"marked {_plural(len(ids), 'ok row')} without a vector failed "
                               f"(\"incomplete: ...\", attempts 0: the next ingest fetches them again) (ids {_listed(ids)})")
        elif ("image_embeddings" in tables and "images" in tables and width
                and (model is None or width == int(model["dim"]))):
            ids = _ids(conn, store.SQL_ORPHAN_VECTORS)
            for i in ids:
                conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (i,))
            if ids:
                actions.append(f"deleted {_plural(len(ids), 'orphan vector')} (image_ids {_listed(ids)})")
            ids = _ids(conn, store.SQL_BAD_NORMS, (np.zeros(width, "<f4").tobytes(), store.NORM_TOLERANCE))
            fixed, dropped = [], []
            for i in ids:
                blob = conn.execute("SELECT embedding FROM image_embeddings WHERE image_id = ?", (i,)).fetchone()[0]
                v = np.frombuffer(blob, dtype="<f4").astype(np.float64)
                norm = float(np.linalg.norm(v)) if np.all(np.isfinite(v)) else float("nan")
                conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (i,))
                if np.isfinite(norm) and norm > 1e-12:
                    search_index.insert(conn, i, (v / norm).astype("<f4").tobytes())  # into its list
                    fixed.append(i)
                else:
                    dropped.append(i)
            if fixed:
                actions.append(f"renormalised {_plural(len(fixed), 'vector')} (image_ids {_listed(fixed)})")
            if dropped:
                actions.append(f"deleted {_plural(len(dropped), 'zero or non-finite vector')} "
                               f"(image_ids {_listed(dropped)})")
            done = search_index.repair(conn)  # vectors outside their list, an old table layout
            if done:
                actions.append(done)
            # after the deletions above: every ok row still without a vector
            ids = _ids(conn, store.SQL_OK_WITHOUT_VECTOR)
            _mark_refetch(conn, ids, VECTOR_MISSING, now)
            if ids:
                actions.append(f"marked {_plural(len(ids), 'ok row')} without a vector failed "
                               f"(\"incomplete: ...\", attempts 0: the next ingest fetches them again) (ids {_listed(ids)})")
        if "images" in tables:
            # after the rows above became failed: duplicates of them are dangling too
            repointed, refetch = [], []
            for r in conn.execute(
                    "SELECT d.id, d.content_sha256 FROM images AS d LEFT JOIN images AS o ON o.id = d.duplicate_of "
                    "WHERE d.status = 'duplicate' AND (o.id IS NULL OR o.status != 'ok') ORDER BY d.id").fetchall():
                holder = store.find_by_content(conn, r["content_sha256"])
                if holder is not None and holder != r["id"]:
                    conn.execute("UPDATE images SET duplicate_of = ?, updated_at = ? WHERE id = ?",
                                 (holder, now, r["id"]))
                    repointed.append(int(r["id"]))
                else:
                    refetch.append(int(r["id"]))
            _mark_refetch(conn, refetch, DUPLICATE_DANGLING, now)
            if repointed:
                actions.append(f"re-pointed {_plural(len(repointed), 'duplicate')} at the ok row with the same "
                               f"content (ids {_listed(repointed)})")
            if refetch:
                actions.append(f"marked {_plural(len(refetch), 'dangling duplicate')} failed (\"incomplete: ...\": "
                               f"the next ingest fetches them again) (ids {_listed(refetch)})")
        if "runs" in tables:
            dead = _stale_runs(conn)[0]
            for run_id in dead:
                conn.execute("UPDATE runs SET status = 'interrupted', finished_at = coalesce(finished_at, ?) "
                             "WHERE id = ?", (now, run_id))
            if dead:
                actions.append(f"marked {_plural(len(dead), 'run')} 'interrupted' (ids {_listed(dead)})")
    if "images" in tables and not ("runs" in tables and _stale_runs(conn)[1]):  # no run in progress
        removed = 0
        for f in _orphan_paths(conn, path):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
        if removed:
            actions.append(f"deleted {_plural(removed, 'orphan file')} from {_images_dir(path).name}/")
    before = _size(str(path) + "-wal")
    busy, log, moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    after = _size(str(path) + "-wal")
    if busy:
        actions.append(f"WAL checkpoint incomplete: another connection holds the database ({_mb(after)} left)")
    else:
        actions.append(f"checkpointed the WAL ({_mb(before)} -> {_mb(after)})")
    return actions


# ---------------------------------------------------------------- entry point


def examine(path, *, repair_it: bool = False) -> Report:
    """Check the gallery at ``path``; with ``repair_it``, repair then check again (problems that are gone
    are reported ``fixed``). Without ``repair_it`` the database is opened read-only."""
    conn = open_gallery(path, readonly=not repair_it)
    try:
        checks, ctx = diagnose(conn, path)
        report = Report(database=str(path), checks=checks, repaired=repair_it, versions=ctx["versions"])
        if not repair_it or not report.problems:
            if repair_it:
                report.actions = repair(conn, path)  # nothing to fix: the checkpoint only
            return report
        if ctx["corrupt"]:
            report.actions = ["nothing repaired: the database is corrupt (see quick_check, integrity_check)"]
            return report
        if ctx["newer"]:
            report.actions = ["nothing repaired: the database is newer than this code (see migrations)"]
            return report
        report.actions = repair(conn, path)
        after, ctx = diagnose(conn, path)
        by_name = {c.name: c for c in checks}
        for c in after:
            was = by_name.get(c.name)
            if c.status != "problem" and was is not None and was.status == "problem":
                was.status, was.done = "fixed", c.detail
        # a check that was fine but is not now (should not happen) is shown as it is now
        report.checks = [by_name[c.name] if by_name[c.name].status == "fixed" else c for c in after]
        report.versions = ctx["versions"]
        return report
    finally:
        conn.close()


STATUS_WIDTH = 8
NAME_WIDTH = max(len(fn.__name__.lstrip("_")) for fn in CHECKS)


def format_report(report: Report) -> str:
    """One line per check (status, name, what was found), then the repair for each problem."""
    lines = [f"database  {report.database}"]
    pad = " " * (STATUS_WIDTH + NAME_WIDTH + 2)
    for c in report.checks:
        lines.append(f"{c.status:<{STATUS_WIDTH}}{c.name:<{NAME_WIDTH}}  {c.detail}")
        if c.status == "problem":
            lines.append(f"{pad}repair: {c.repair}")
        elif c.status == "fixed":
            lines.append(f"{pad}now: {c.done}")
    if report.actions:
        lines.append("repairs")
        lines.extend(f"  {a}" for a in report.actions)
    problems = report.problems
    if not problems:
        fixed = sum(c.status == "fixed" for c in report.checks)
        lines.append("healthy" + (f" ({_plural(fixed, 'problem')} fixed)" if fixed else ""))
    else:
        auto = sum(c.auto for c in problems)
        more = f"; {auto} can be fixed with --repair" if auto and not report.repaired else ""
        lines.append(f"{_plural(len(problems), 'problem')}{more}")
    return "\n".join(lines)
