"""Living with a gallery: remove rows, prune files gone from a folder, filter searches by metadata, find
near-duplicates, and keep local files recorded relative to the gallery's folder.

Removal (:func:`remove`) keeps the gallery consistent in one transaction: a removed ``ok`` row whose bytes
other rows duplicate hands its vector to the first of them (``store._promote_duplicate``), which becomes
``ok``; removed duplicates simply go; vectors (through :func:`delete_vectors`, the one place a vector is
deleted here), ``thumbnails`` rows (when that table exists) and stored originals (``<images dir>/ab/<sha256>.ext``)
that no remaining row references follow the rows. Nothing is orphaned.

Metadata filters (:func:`parse_where`): ``KEY OP VALUE`` with OP one of ``= != < <= > >= ~`` (``~`` is SQL
LIKE: ``%`` any text, ``_`` one character, ASCII case-insensitive). They apply to the top-level keys of
``images.meta`` (the CSV's other columns) through ``json_each`` with the key and the value bound as
parameters: never SQL built from the text. When VALUE is a number the comparison is numeric (a cell that is
not a number then never matches, except for ``!=``); otherwise it compares text. A row without the key never
matches. Several conditions are AND-ed.

Local files: a file inside the gallery's folder (the database's folder) is recorded relative to it, in
``images.url`` (the key) and ``images.path``, so the folder can be moved or copied as a whole; files elsewhere
keep their absolute path. :func:`relativise_paths` is migration 0004's Python step for existing galleries.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import store
from .errors import ConfigError, InputError

# ---------------------------------------------------------------- local paths


def gallery_dir(db_path) -> Path:
    """The gallery's folder: relative paths stored in the database are relative to it."""
    return Path(db_path).resolve().parent


def local_key(path, base) -> str:
    """How a local file is recorded (``images.url`` and ``path``): relative to ``base`` (the gallery's
    folder) with ``/`` separators when inside it, else absolute."""
    p = Path(path)
    p = Path(os.path.abspath(p)).parent.resolve() / p.name  # a symlink's own name, in its folder's real path
    try:
        return p.relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(p)


def resolve_stored(path: str, db_path) -> Path:
    """A stored path (``images.path`` or a local ``images.url``) as an absolute path."""
    p = Path(path)
    return p if p.is_absolute() else gallery_dir(db_path) / p


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("csv:")


def relativise_paths(conn) -> int:
    """Migration 0004's Python step: local files and stored originals recorded by absolute path inside the
    gallery's folder are recorded relative to it (``url``, ``url_hash`` and ``path``). Returns the rows
    changed. A row whose relative key another row already holds is left as it was."""
    file = None
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            file = row[2]
    if not file:  # an in-memory database has no folder
        return 0
    base = Path(file).resolve().parent
    changed = 0
    rows = conn.execute("SELECT id, url, path FROM images WHERE url LIKE '/%' OR path LIKE '/%'").fetchall()
    for r in rows:
        url, path = r["url"], r["path"]
        new_url = url
        if url and not _is_url(url) and Path(url).is_absolute():
            new_url = local_key(url, base) if _inside(url, base) else url
        new_path = path
        if path and Path(path).is_absolute() and _inside(path, base):
            new_path = local_key(path, base)
        if (new_url, new_path) == (url, path):
            continue
        new_hash = store.url_hash(new_url)
        taken = conn.execute("SELECT id FROM images WHERE url_hash = ? AND id != ?", (new_hash, r["id"])).fetchone()
        if taken is not None:
            new_url, new_hash = url, store.url_hash(url)
            if new_path == path:
                continue
        conn.execute("UPDATE images SET url = ?, url_hash = ?, path = ? WHERE id = ?",
                     (new_url, new_hash, new_path, r["id"]))
        changed += 1
    return changed


def _inside(path, base: Path) -> bool:
    try:
        Path(path).resolve().relative_to(base)
        return True
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------- metadata filters

OPERATORS = ("!=", "<=", ">=", "=", "<", ">", "~")
_WHERE = re.compile(r"^\s*(?P<key>[^=!<>~]+?)\s*(?P<op>!=|<=|>=|=|<|>|~)\s*(?P<value>.*?)\s*$", re.S)
_SQL_OP = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: str
    number: float | None  # the value as a number when it is one (numeric comparison)

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def _number(text) -> float | None:
    """A metadata value as a finite number, or None (SQL function ``gallery_number``)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        x = float(str(text).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def parse_where(text: str) -> Condition:
    """``"year>=2020"`` -> Condition; ConfigError naming the text when it is not KEY OP VALUE."""
    m = _WHERE.match(text)
    if not m or not m["key"].strip():
        raise ConfigError(f"--where {text!r}: expected KEY OP VALUE with OP one of {' '.join(OPERATORS)} "
                          "(e.g. --where tag=cat --where year>=2020)")
    value = m["value"]
    number = None if m["op"] == "~" else _number(value)
    return Condition(m["key"].strip(), m["op"], value, number)


def _register(conn) -> None:
    try:
        conn.create_function("gallery_number", 1, _number, deterministic=True)
    except (TypeError, NotImplementedError):  # pragma: no cover - drivers without the flag
        conn.create_function("gallery_number", 1, _number)


def where_sql(conditions, table: str = "images") -> tuple[str, dict]:
    """``(sql, params)``: a boolean SQL expression over ``table.meta`` that every condition holds
    (``"1"`` for none). Keys and values are bound parameters (named ``:w0k``, ``:w0v``, ...)."""
    parts, params = [], {}
    for i, c in enumerate(conditions):
        k, v = f"w{i}k", f"w{i}v"
        params[k] = c.key
        if c.op == "~":
            test = f"CAST(j.value AS TEXT) LIKE :{v}"
            params[v] = c.value
        elif c.number is not None:
            if c.op == "!=":
                test = f"(gallery_number(j.value) IS NULL OR gallery_number(j.value) <> :{v})"
            else:
                test = f"gallery_number(j.value) {_SQL_OP[c.op]} :{v}"
            params[v] = c.number
        else:
            test = f"CAST(j.value AS TEXT) {_SQL_OP[c.op]} :{v}"
            params[v] = c.value
        parts.append(f"EXISTS (SELECT 1 FROM json_each({table}.meta) AS j WHERE j.key = :{k} AND {test})")
    return (" AND ".join(parts) or "1"), params


def matching_ids(conn, conditions, *, statuses=("ok",), among=None) -> list[int]:
    """Ids of the rows (with one of ``statuses``; all when empty) that every condition holds for,
    optionally only ``among`` the given ids."""
    _register(conn)
    sql, params = where_sql(conditions)
    clauses = [sql]
    if statuses:
        names = [f"s{i}" for i in range(len(statuses))]
        clauses.append(f"images.status IN ({', '.join(':' + n for n in names)})")
        params.update(dict(zip(names, statuses)))
    found: list[int] = []
    if among is None:
        return [int(r[0]) for r in conn.execute(f"SELECT id FROM images WHERE {' AND '.join(clauses)} ORDER BY id",
                                                params)]
    among = list(among)
    for start in range(0, len(among), 500):
        chunk = among[start:start + 500]
        names = {f"i{j}": x for j, x in enumerate(chunk)}
        q = (f"SELECT id FROM images WHERE id IN ({', '.join(':' + n for n in names)}) AND "
             f"{' AND '.join(clauses)}")
        found.extend(int(r[0]) for r in conn.execute(q, {**params, **names}))
    return found


# ---------------------------------------------------------------- filtered search

# A filter matching at most this share of the gallery is answered by an exact scan of the matching rows (reading
# one vector from vec0 costs about 16 times what sqlite-vec's KNN spends per row), not by a growing KNN
EXACT_SCAN_SHARE = 1 / 16

_FILTERED_SCAN_SQL = """
SELECT images.id, images.url, images.path, 1.0 - vec_distance_cosine(e.embedding, :query) AS score,
       images.width, images.height, images.meta
FROM images JOIN image_embeddings AS e ON e.image_id = images.id
WHERE images.status = 'ok' AND {where}
ORDER BY score DESC, images.id
LIMIT :k
"""


def _result(rank, r) -> dict:
    import json

    return {"rank": rank, "id": int(r["id"]), "url": r["url"], "path": r["path"], "score": float(r["score"]),
            "width": r["width"], "height": r["height"], "meta": json.loads(r["meta"]) if r["meta"] else None}


def search(conn, vector, k: int, *, where=(), min_score: float | None = None, exclude=(),
           exact: bool | None = None, nprobe: int | None = None) -> list[dict]:
    """The ``k`` nearest ok images to ``vector`` among those every condition in ``where`` holds for, with a
    score of at least ``min_score``, leaving out the ids in ``exclude``; the result dicts of
    ``store.search`` (ranks renumbered from 1), which ``exact`` and ``nprobe`` are passed to.

    The nearest-neighbour part is ``store.search`` (so a faster index behind it is used), asked for more
    neighbours until ``k`` of them pass or the gallery is exhausted (it starts at the number that holds
    ``k`` matches if matches are spread evenly, and doubles). A selective filter (matching at most
    :data:`EXACT_SCAN_SHARE` of the gallery, or one that would need more neighbours than a KNN query
    answers) is answered by an exact scan of the matching rows with ``vec_distance_cosine`` instead."""
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, not {k}")
    where, exclude = list(where), set(int(i) for i in exclude)
    if not where and min_score is None and not exclude:
        return store.search(conn, vector, k, exact=exact, nprobe=nprobe)
    if not store._table_exists(conn, "image_embeddings"):
        return []
    n_vectors = store._count_vectors(conn)
    if n_vectors == 0:
        return []
    n_match = n_vectors
    if where:
        n_match = len(matching_ids(conn, where))
        if n_match == 0:
            return []
    want = k + len(exclude)
    needed = math.ceil(want * n_vectors / n_match)  # neighbours to ask for, if matches are spread evenly
    if where and (n_match <= n_vectors * EXACT_SCAN_SHARE or needed > store.KNN_MAX_K or needed >= n_vectors):
        return _exact_filtered(conn, vector, k, where, min_score, exclude)
    kk = min(n_vectors, max(want, math.ceil(needed * 1.25)))
    while True:
        found = store.search(conn, vector, kk, exact=exact, nprobe=nprobe)
        passing = set(matching_ids(conn, where, among=[r["id"] for r in found])) if where else None
        keep = [r for r in found if r["id"] not in exclude and (passing is None or r["id"] in passing)
                and (min_score is None or r["score"] >= min_score)]
        below = min_score is not None and found and found[-1]["score"] < min_score
        if len(keep) >= k or kk >= n_vectors or below or len(found) < kk:
            break
        kk = min(n_vectors, kk * 2)
    for rank, r in enumerate(keep[:k], start=1):
        r["rank"] = rank
    return keep[:k]


def _exact_filtered(conn, vector, k, where, min_score, exclude) -> list[dict]:
    _register(conn)
    q = np.asarray(vector, dtype=np.float32)
    dim = store._model_dim(conn)
    if q.ndim != 1 or q.shape[0] != dim:
        from .errors import ModelMismatchError

        raise ModelMismatchError(f"{store.db_name(conn)} holds {dim}-d vectors; the query vector has shape {q.shape}")
    sql, params = where_sql(where)
    rows = conn.execute(_FILTERED_SCAN_SQL.format(where=sql),
                        {**params, "query": q.astype("<f4").tobytes(), "k": k + len(exclude)}).fetchall()
    out = []
    for r in rows:
        if int(r["id"]) in exclude or (min_score is not None and float(r["score"]) < min_score):
            continue
        out.append(_result(len(out) + 1, r))
        if len(out) == k:
            break
    return out


def same_bytes(conn, image_id: int) -> set[int]:
    """The row ``image_id`` and every row holding the same bytes (its ok holder, the holder's duplicates):
    what ``query --id`` leaves out of its results unless ``--include-self``."""
    row = conn.execute("SELECT id, status, duplicate_of, content_sha256 FROM images WHERE id = ?",
                       (image_id,)).fetchone()
    if row is None:
        return set()
    ids = {int(image_id)}
    if row["duplicate_of"] is not None:
        ids.add(int(row["duplicate_of"]))
    if row["content_sha256"]:
        ids.update(int(r[0]) for r in conn.execute(
            "SELECT id FROM images WHERE content_sha256 = ? AND status IN ('ok', 'duplicate')", (row["content_sha256"],)))
    holders = [i for i in ids]
    for start in range(0, len(holders), 500):
        chunk = holders[start:start + 500]
        ids.update(int(r[0]) for r in conn.execute(
            f"SELECT id FROM images WHERE duplicate_of IN ({', '.join('?' * len(chunk))})", chunk))
    return ids


# ---------------------------------------------------------------- remove


def delete_vectors(conn, ids) -> int:
    """Delete the vectors of ``ids``: the ONE place this module deletes vectors (a search index kept beside
    the vec0 table is updated here too). Returns how many were deleted."""
    from . import index

    return index.delete(conn, ids)


def _delete_thumbnails(conn, ids) -> int:
    """Delete the ``thumbnails`` rows of ``ids`` when that table exists (slice webapp adds it)."""
    if not store._table_exists(conn, "thumbnails"):
        return 0
    n = 0
    for i in ids:
        n += conn.execute("DELETE FROM thumbnails WHERE image_id = ?", (int(i),)).rowcount or 0
    return n


@dataclass
class Removal:
    """What :func:`remove` did (or, with ``dry_run``, would do)."""

    rows: list[dict] = field(default_factory=list)  # {id, url, status} of the rows removed
    promoted: list[tuple[int, int]] = field(default_factory=list)  # (removed ok row, duplicate that took over)
    vectors: int = 0
    thumbnails: int = 0
    files: list[str] = field(default_factory=list)  # stored originals deleted (absolute paths)
    dry_run: bool = False

    def counts(self) -> dict:
        c: dict = {}
        for r in self.rows:
            c[r["status"]] = c.get(r["status"], 0) + 1
        return c

    def as_dict(self) -> dict:
        return {"dry_run": self.dry_run, "removed": len(self.rows), "by_status": self.counts(), "rows": self.rows,
                "promoted": [{"removed": a, "heir": b} for a, b in self.promoted], "vectors": self.vectors,
                "thumbnails": self.thumbnails, "files": self.files}

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        if not self.rows:
            return "nothing to remove"
        by = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        line = f"{verb} {len(self.rows)} row{'s' * (len(self.rows) != 1)} ({by}), {self.vectors} vector" \
               f"{'s' * (self.vectors != 1)}, {self.thumbnails} thumbnail{'s' * (self.thumbnails != 1)}, " \
               f"{len(self.files)} stored original{'s' * (len(self.files) != 1)}"
        if self.promoted:
            line += "; " + ", ".join(f"duplicate {b} takes over from {a}" for a, b in self.promoted)
        return line


class _DryRun(Exception):
    pass


def _stored_original(row) -> bool:
    """Whether ``row``'s path is a copy the gallery made (``<dir>/ab/<sha256>.ext``), not the user's file."""
    path, sha = row["path"], row["content_sha256"]
    if not path or not sha or path == row["url"]:
        return False
    p = Path(path)
    return p.stem == sha and p.parent.name == sha[:2]


def remove(conn, ids, db_path, *, dry_run: bool = False) -> Removal:
    """Remove the rows ``ids`` and everything that belongs to them, in one transaction (see the module's
    docstring); stored originals no remaining row references are deleted after the commit. With
    ``dry_run`` the same work is done and rolled back, and no file is touched."""
    ids = sorted(set(int(i) for i in ids))
    result = Removal(dry_run=dry_run)
    files: list[Path] = []
    try:
        with store.transaction(conn):
            rows = []
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows.extend(conn.execute(
                    f"SELECT id, url, status, path, content_sha256 FROM images WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk).fetchall())
            rows.sort(key=lambda r: (r["status"] != "duplicate", r["id"]))  # duplicates first: they name no one
            for r in rows:
                image_id = int(r["id"])
                if r["status"] == "ok":
                    heirs = conn.execute("SELECT id FROM images WHERE duplicate_of = ? AND status = 'duplicate' "
                                         "ORDER BY id LIMIT 1", (image_id,)).fetchone()
                    if heirs is not None:
                        heir = int(heirs[0])
                        o = conn.execute("SELECT path, width, height, format, bytes FROM images WHERE id = ?",
                                         (image_id,)).fetchone()
                        store._promote_duplicate(conn, image_id)
                        # the heir may have been recorded without the original's details (never decoded)
                        conn.execute(
                            "UPDATE images SET path = coalesce(path, ?), width = coalesce(width, ?), "
                            "height = coalesce(height, ?), format = coalesce(format, ?), bytes = coalesce(bytes, ?) "
                            "WHERE id = ?", (*tuple(o), heir))
                        result.promoted.append((image_id, heir))
                result.vectors += delete_vectors(conn, [image_id])  # any row's: none may outlive it
                result.thumbnails += _delete_thumbnails(conn, [image_id])
                conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
                result.rows.append({"id": image_id, "url": r["url"], "status": r["status"]})
                if _stored_original(r) and conn.execute("SELECT 1 FROM images WHERE path = ?", (r["path"],)).fetchone() is None:
                    p = resolve_stored(r["path"], db_path)
                    if p not in files and p.is_file():
                        files.append(p)
            result.rows.sort(key=lambda x: x["id"])
            if dry_run:
                raise _DryRun
    except _DryRun:
        result.files = [str(p) for p in files]
        return result
    for p in files:
        try:
            p.unlink()
            result.files.append(str(p))
        except FileNotFoundError:
            pass
        try:
            p.parent.rmdir()  # the ab/ folder, when it is empty now
        except OSError:
            pass
    return result


def find_rows(conn, db_path, *, ids=(), urls=(), where=(), statuses=()) -> list[int]:
    """The rows ``remove`` selects: the rows named by ``ids`` and ``urls`` (any of them; all rows when
    neither is given), narrowed to those every ``where`` condition and one of ``statuses`` holds for.
    InputError for an id or URL the gallery does not hold; ConfigError when nothing selects."""
    if not (ids or urls or where or statuses):
        raise ConfigError("say what to remove: --id N, --url URL, --where KEY=VALUE or --status STATUS")
    for s in statuses:
        if s not in store.STATUSES:
            raise ConfigError(f"--status {s}: expected one of {', '.join(store.STATUSES)}")
    named: list[int] | None = None
    if ids or urls:
        named = []
        for i in ids:
            if conn.execute("SELECT 1 FROM images WHERE id = ?", (int(i),)).fetchone() is None:
                raise InputError(f"--id {i}: no such image in {store.db_name(conn)}")
            named.append(int(i))
        base = gallery_dir(db_path)
        for u in urls:
            keys = {store.url_hash(u)}
            if not _is_url(u):  # a local file, as the user names it: relative to here, recorded relative to the gallery
                keys.add(store.url_hash(local_key(Path(u).expanduser(), base)))
            row = conn.execute(f"SELECT id FROM images WHERE url_hash IN ({', '.join('?' * len(keys))})",
                               list(keys)).fetchone()
            if row is None:
                raise InputError(f"--url {u}: no such image in {store.db_name(conn)}")
            named.append(int(row[0]))
    if where or statuses or named is None:
        return matching_ids(conn, where, statuses=tuple(statuses), among=named)
    return sorted(set(named))


# ---------------------------------------------------------------- prune


def gone_files(conn, db_path, folder) -> list[int]:
    """Rows of local files under ``folder`` whose file no longer exists (rows read from disk: they carry
    the file's mtime, or failed reading it)."""
    root = Path(folder).resolve()
    gone = []
    for r in conn.execute("SELECT id, url FROM images WHERE (mtime IS NOT NULL OR error LIKE 'unreadable:%') "
                          "ORDER BY id"):
        if _is_url(r["url"]):
            continue
        p = resolve_stored(r["url"], db_path)
        if _inside(p, root) and not p.is_file():
            gone.append(int(r["id"]))
    return gone


# ---------------------------------------------------------------- near-duplicates


def read_vectors(conn, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Every stored vector: ``(ids int64 (n,), vectors float32 (n, D))``, read in chunks."""
    if not store._table_exists(conn, "image_embeddings"):
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    dim = store._model_dim(conn)
    n = store._count_vectors(conn)
    ids = np.empty(n, np.int64)
    X = np.empty((n, dim), np.float32)
    cur = conn.execute("SELECT image_id, embedding FROM image_embeddings")
    i = 0
    while True:
        rows = cur.fetchmany(chunk)
        if not rows:
            break
        for r in rows:
            if i == n:  # written meanwhile: grow
                ids = np.resize(ids, n + chunk)
                X = np.resize(X, (n + chunk, dim))
                n += chunk
            ids[i] = r[0]
            X[i] = np.frombuffer(r[1], dtype="<f4")
            i += 1
    order = np.argsort(ids[:i], kind="stable")
    return ids[:i][order], X[:i][order]


def near_pairs(X: np.ndarray, threshold: float, block: int = 1024, tile: int = 4096
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows of ``X`` (L2-normalised float32) with cosine similarity >= threshold:
    ``(i, j, score)``. A blocked matrix product over the upper triangle, ``block`` rows against ``tile``
    columns at a time (a 16 MB float32 tile: thresholded while it is still in cache)."""
    n = X.shape[0]
    I, J, S = [], [], []
    for a in range(0, n, block):
        rows = X[a:a + block]
        for c in range(a, n, tile):
            sims = rows @ X[c:c + tile].T  # rows a.. against rows c..
            hit = sims >= threshold
            if not hit.any():
                continue
            r, col = np.nonzero(hit)
            keep = col + c > r + a  # only i < j (the diagonal tiles hold both halves)
            r, col = r[keep], col[keep]
            I.append(r + a)
            J.append(col + c)
            S.append(sims[r, col])
    if not I:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(I).astype(np.int64), np.concatenate(J).astype(np.int64), np.concatenate(S)


def _components(n: int, I: np.ndarray, J: np.ndarray) -> np.ndarray:
    parent = np.arange(n)

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j in zip(I.tolist(), J.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(x) for x in range(n)])


def dupes(conn, threshold: float = 0.95, *, block: int = 1024) -> dict:
    """Groups of near-duplicate images: ``{threshold, groups: [{group, representative, size, images:
    [{id, url, path, status, score, duplicate_of}]}], images, seconds}``.

    Two ok images are linked when their cosine similarity is at least ``threshold``; a group is a
    connected component of these links (so in a chain a-b-c, a and c are grouped even when below the
    threshold with each other). The representative is the member with the most links (then the lowest
    id); each member's ``score`` is its similarity to the representative. Rows recorded as exact
    duplicates (the same bytes) join their holder's group with score 1.0 and ``duplicate_of`` set, so an
    ok image with only exact copies is a group too. Groups come largest first."""
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise ConfigError(f"--threshold {threshold}: expected a cosine similarity from -1 to 1")
    started = time.perf_counter()
    ids, X = read_vectors(conn)
    I, J, _ = near_pairs(X, threshold, block) if len(ids) else (np.zeros(0, np.int64),) * 3
    exact: dict[int, list[int]] = {}
    for r in conn.execute("SELECT id, duplicate_of FROM images WHERE status = 'duplicate' AND duplicate_of IS NOT NULL "
                          "ORDER BY id"):
        exact.setdefault(int(r[1]), []).append(int(r[0]))
    index = {int(x): i for i, x in enumerate(ids)}
    members: dict[int, list[int]] = {}
    if len(I):
        roots = _components(len(ids), I, J)
        touched = np.unique(np.concatenate([I, J]))
        for x in touched.tolist():
            members.setdefault(int(roots[x]), []).append(x)
    grouped = {x for m in members.values() for x in m}
    for holder in exact:
        if holder in index and index[holder] not in grouped:
            members[index[holder]] = [index[holder]]
    degree = np.bincount(np.concatenate([I, J]), minlength=len(ids)) if len(I) else np.zeros(len(ids), np.int64)
    groups = []
    for m in members.values():
        rep = min(m, key=lambda x: (-int(degree[x]), int(ids[x])))
        scores = X[m] @ X[rep]
        entries = [(int(ids[x]), float(s), None) for x, s in zip(m, scores)]
        for x in m:
            entries.extend((d, 1.0, int(ids[x])) for d in exact.get(int(ids[x]), ()))
        groups.append((int(ids[rep]), entries))
    info = _rows_info(conn, [e[0] for _, entries in groups for e in entries])
    out = []
    for rep, entries in groups:
        entries.sort(key=lambda e: (e[0] != rep, -e[1], e[0]))
        out.append({"representative": rep, "size": len(entries), "images": [
            {"id": i, "url": info[i]["url"], "path": info[i]["path"], "status": info[i]["status"],
             "score": round(s, 6), "duplicate_of": d} for i, s, d in entries]})
    out.sort(key=lambda g: (-g["size"], g["representative"]))
    for n, g in enumerate(out, start=1):
        g["group"] = n
    return {"threshold": threshold, "groups": [{"group": g.pop("group"), **g} for g in out],
            "images": sum(g["size"] for g in out), "vectors": int(len(ids)),
            "seconds": round(time.perf_counter() - started, 3)}


def _rows_info(conn, ids) -> dict:
    info = {}
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for r in conn.execute(f"SELECT id, url, path, status FROM images WHERE id IN ({', '.join('?' * len(chunk))})",
                              chunk):
            info[int(r["id"])] = {"url": r["url"], "path": r["path"], "status": r["status"]}
    return info
