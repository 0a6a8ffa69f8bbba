"""The search index: an IVF (inverted file) index that lives inside the gallery's SQLite file.

How it works (sqlite-vec 0.1.9, the pinned version):

- ``image_embeddings`` is a vec0 table with a ``PARTITION KEY`` column ``list`` and ``chunk_size=128``
  (:func:`vectors_table_sql`). vec0 keeps each partition's vectors in their own chunks, so a KNN query
  constrained on ``list`` reads only those lists. The small chunk (128 vectors = 384 KB at 768-d instead
  of vec0's default 1,024 = 3 MB) makes row-wise reads cheap: one vector no longer walks a 3 MB
  overflow chain;
- ``index_centroids`` (vec0, ``list INTEGER PRIMARY KEY``, ``centroid float[D]``) holds the k-means
  centroids (spherical k-means on a sample of the gallery, :func:`kmeans`). Every vector's ``list`` is the
  id of its nearest centroid (highest cosine);
- ``search_index`` (migration 0003) is the single-row state: lists, how many vectors it was trained on,
  the default number of lists probed, a generation counter bumped by each build;
- a query probes the ``nprobe`` lists whose centroids are nearest to it, in ONE SQL statement
  (:data:`IVF_SQL`): ``list IN (SELECT list FROM probe)`` makes SQLite run vec0's KNN once per probed
  list (``k`` results from each), and the outer ``ORDER BY ... LIMIT`` keeps the best ``k`` of them all.

Without a trained index (a new or small gallery) every vector has ``list = 0`` and search is exact
(:data:`EXACT_SQL`): vec0's KNN over every partition. :func:`search` picks the path; ``exact=True``
forces the exact one.

Writers keep the index in step: a vector is inserted by :func:`insert` (its list assigned from the
centroids, in the caller's transaction) and deleted by :func:`delete` (vec0 DELETE by rowid: the row
leaves its partition). vec0 0.1.9 cannot UPDATE a partition key: moving a vector to another list is
DELETE + INSERT. vec0 0.1.9 cannot rename a table either, so a rebuild (:func:`build`, :func:`relayout`)
stages ``(image_id, list, embedding)`` in a TEMP table, drops and recreates ``image_embeddings`` and
copies the vectors back (bytes unchanged), sorted by list, in one transaction.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np

TABLE = "image_embeddings"
CENTROIDS = "index_centroids"
STATE = "search_index"
LIST_INDEX = f"{TABLE}_chunks_by_list"  # migration 0008: vec0 finds a list's last chunk through it
CHUNK_SIZE = 128
EXACT_BELOW = 50_000  # `python cli.py index` builds an index from this many vectors on (exact search is fast below)
KNN_MAX_K = 4096  # sqlite-vec's limit on k in a vec0 KNN query
DEFAULT_NPROBE = 4  # lists probed for k <= 10; more for larger k (nprobe_for)
MMAP_BYTES = 1 << 34  # searches read the file memory-mapped (PRAGMA mmap_size): half the CPU of read() calls
MIN_SAMPLE_PER_LIST = 64  # k-means trains on up to this many vectors per list ...
MAX_SAMPLE = 65_536  # ... and at most this many
KMEANS_ITERS = 10
FULL_CHECK_MAX = 200_000  # doctor: above this many vectors, the nearest-centroid check reads a sample of chunks
REBUILD_GROWTH = 2.0  # rebuild advised when the gallery is this many times larger (or smaller) than trained on
ASSIGN_TOLERANCE = 1e-5  # doctor: a vector whose own list is within this cosine of the best is in the right list
_PARTITION = re.compile(r"\blist\s+integer\s+partition\s+key\b", re.I)
_CHUNK = re.compile(r"\bchunk_size\s*=\s*(\d+)", re.I)

# ---------------------------------------------------------------- SQL

# The query's own vector is :query (float32 bytes); :k results; :nprobe lists probed.
IVF_SQL = """
WITH probe AS (
    SELECT list FROM index_centroids WHERE centroid MATCH :query AND k = :nprobe
), knn AS (
    SELECT image_id, distance FROM image_embeddings
    WHERE embedding MATCH :query AND k = :kk AND list IN (SELECT list FROM probe)
)
SELECT images.id, images.url, images.path, 1.0 - knn.distance AS score,
       images.width, images.height, images.meta
FROM knn JOIN images ON images.id = knn.image_id
ORDER BY knn.distance, images.id
LIMIT :k
"""

EXACT_SQL = """
WITH knn AS (
    SELECT image_id, distance
    FROM image_embeddings
    WHERE embedding MATCH :query AND k = :k
)
SELECT images.id, images.url, images.path, 1.0 - knn.distance AS score,
       images.width, images.height, images.meta
FROM knn JOIN images ON images.id = knn.image_id
ORDER BY knn.distance, images.id
"""

# Exact answer for k above sqlite-vec's 4096: each list's best min(k, 4096) by vec0's KNN. Exact as long
# as no list holds more than 4096 vectors (search checks the largest list; else SCAN_SQL).
EXACT_ALL_LISTS_SQL = """
WITH knn AS (
    SELECT image_id, distance FROM image_embeddings
    WHERE embedding MATCH :query AND k = :kk AND list IN (SELECT list FROM index_centroids)
)
SELECT images.id, images.url, images.path, 1.0 - knn.distance AS score,
       images.width, images.height, images.meta
FROM knn JOIN images ON images.id = knn.image_id
ORDER BY knn.distance, images.id
LIMIT :k
"""

# Exact full scan, any k.
SCAN_SQL = """
SELECT images.id, images.url, images.path, 1.0 - vec_distance_cosine(e.embedding, :query) AS score,
       images.width, images.height, images.meta
FROM image_embeddings AS e JOIN images ON images.id = e.image_id
ORDER BY score DESC, images.id
LIMIT :k
"""

# What the README shows: the 10 images nearest to image 1, typed in the sqlite3 shell. Only the
# query's vector differs from IVF_SQL (here: a stored image's) and nprobe comes from the state row.
SHELL_SQL = """\
WITH q AS (SELECT embedding AS v FROM image_embeddings WHERE image_id = 1),
probe AS (
  SELECT list FROM index_centroids
  WHERE centroid MATCH (SELECT v FROM q) AND k = (SELECT nprobe FROM search_index)
),
knn AS (
  SELECT image_id, distance FROM image_embeddings
  WHERE embedding MATCH (SELECT v FROM q) AND k = 10 AND list IN (SELECT list FROM probe)
)
SELECT images.id, round(1 - knn.distance, 4) AS score, images.url
FROM knn JOIN images ON images.id = knn.image_id
ORDER BY knn.distance, images.id
LIMIT 10;"""


def vectors_table_sql(dim: int, name: str = TABLE) -> str:
    return (f"CREATE VIRTUAL TABLE {name} USING vec0(image_id INTEGER PRIMARY KEY, list INTEGER PARTITION KEY, "
            f"embedding float[{int(dim)}] distance_metric=cosine, chunk_size={CHUNK_SIZE})")


def centroids_table_sql(dim: int) -> str:
    return (f"CREATE VIRTUAL TABLE {CENTROIDS} USING vec0(list INTEGER PRIMARY KEY, "
            f"centroid float[{int(dim)}] distance_metric=cosine, chunk_size={CHUNK_SIZE})")


def _table_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ? AND type = 'table'", (name,)).fetchone() is not None


def _table_sql(conn, name: str) -> str | None:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE name = ? AND type = 'table'", (name,)).fetchone()
    return row[0] if row else None


def layout(conn) -> dict | None:
    """``{partitioned, chunk_size, dim}`` of ``image_embeddings`` as created, or None when absent."""
    sql = _table_sql(conn, TABLE)
    if not sql:
        return None
    chunk = _CHUNK.search(sql)
    width = re.search(r"\bfloat\[\s*(\d+)\s*\]", sql, re.I)
    return {"partitioned": bool(_PARTITION.search(sql)), "chunk_size": int(chunk.group(1)) if chunk else 1024,
            "dim": int(width.group(1)) if width else None}


def current_layout(conn) -> bool:
    lay = layout(conn)
    return lay is not None and lay["partitioned"] and lay["chunk_size"] == CHUNK_SIZE


def create_vectors_table(conn, dim: int) -> None:
    """Create ``image_embeddings`` with the current layout (store.ensure_model calls this)."""
    if not _table_exists(conn, TABLE):
        conn.execute(vectors_table_sql(dim))
        add_list_index(conn)


def add_list_index(conn) -> None:
    """Index the list column of vec0's chunks shadow table (migration 0008's Python step; also run whenever
    the table is created). vec0 looks up the chunk a new vector goes into with ``SELECT max(rowid) FROM
    image_embeddings_chunks WHERE partition00 = ?``: without this index a scan, about 0.4 ms per insert at
    1M vectors when inserts move between lists."""
    if current_layout(conn) and _table_exists(conn, f"{TABLE}_chunks"):
        conn.execute(f"CREATE INDEX IF NOT EXISTS {LIST_INDEX} ON {TABLE}_chunks (partition00)")


# ---------------------------------------------------------------- state


def state(conn) -> dict | None:
    """The trained index's state row as a dict, or None when there is no trained index."""
    if not _table_exists(conn, STATE):
        return None
    row = conn.execute("SELECT nlist, nprobe, trained_on, trained_at, seconds, generation FROM search_index "
                       "WHERE id = 1").fetchone()
    if row is None or not _table_exists(conn, CENTROIDS):
        return None
    keys = ("nlist", "nprobe", "trained_on", "trained_at", "seconds", "generation")
    return dict(zip(keys, tuple(row)))


def count_vectors(conn) -> int:
    """Vectors stored: the rowids shadow table's count (what ``SELECT count(*) FROM image_embeddings``
    answers, without vec0's row-by-row scan)."""
    if not _table_exists(conn, TABLE):
        return 0
    if _table_exists(conn, TABLE + "_rowids"):
        return int(conn.execute(f"SELECT count(*) FROM {TABLE}_rowids").fetchone()[0])
    return int(conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])  # pragma: no cover


def summary(conn, n_vectors: int | None = None) -> dict:
    """What ``stats`` shows: ``{state: none|trained, lists, nprobe, trained_on, trained_at, vectors,
    search: exact|ivf, advice (str or None), layout_ok}``."""
    n = count_vectors(conn) if n_vectors is None else int(n_vectors)
    st = state(conn)
    info = {"state": "trained" if st else "none", "vectors": n, "layout_ok": current_layout(conn),
            "search": "ivf" if st else "exact", "advice": None}
    if st:
        info.update(lists=st["nlist"], nprobe=st["nprobe"], trained_on=st["trained_on"], trained_at=st["trained_at"],
                    generation=st["generation"])
    info["advice"] = advice(st, n)
    if not info["layout_ok"] and _table_exists(conn, TABLE):
        info["advice"] = "the vector table has the old layout: run `python cli.py doctor --repair`"
    return info


def advice(st: dict | None, n: int) -> str | None:
    if st is None:
        if n >= EXACT_BELOW:
            return f"{n} vectors: build an index for fast search (python cli.py index)"
        return None
    trained = max(int(st["trained_on"]), 1)
    if n > REBUILD_GROWTH * trained or n * REBUILD_GROWTH < trained:
        return (f"trained on {st['trained_on']} vectors, now {n}: rebuild advised (python cli.py index)")
    return None


# ---------------------------------------------------------------- reading every vector


def iter_vectors(conn, batch: int = 16384, table: str = TABLE, every: int = 1):
    """Every stored vector, in batches: ``(ids int64 (n,), lists int64 (n,) or None, vectors float32 (n, D))``.

    Reads vec0's shadow tables chunk by chunk (one blob per chunk instead of one lookup per row: the old
    1,024-vector chunk layout takes ~0.2 ms per row-wise read). The validity bitmap says which slots hold
    a row. ``every`` > 1 reads one chunk in ``every`` (a sample). Falls back to ``SELECT`` when the shadow
    tables are not the ones sqlite-vec 0.1.9 writes.
    """
    chunks_sql = _table_sql(conn, f"{table}_chunks") or ""
    vec_sql = _table_sql(conn, f"{table}_vector_chunks00")
    lay = layout(conn) if table == TABLE else None
    if not chunks_sql or not vec_sql or "validity" not in chunks_sql or "rowids" not in chunks_sql:
        yield from _iter_vectors_select(conn, batch, table)  # pragma: no cover - other sqlite-vec layouts
        return
    dim = _dim_of(conn, table)
    has_partition = "partition00" in chunks_sql
    cols = "c.chunk_id, c.size, c.validity, c.rowids, v.vectors" + (", c.partition00" if has_partition else "")
    ids_buf, lists_buf, vec_buf, held = [], [], [], 0
    for row in conn.execute(f"SELECT {cols} FROM {table}_chunks AS c JOIN {table}_vector_chunks00 AS v "
                            f"ON v.rowid = c.chunk_id WHERE c.chunk_id % {int(every)} = 0 ORDER BY c.chunk_id"):
        size = int(row[1])
        valid = np.unpackbits(np.frombuffer(row[2], np.uint8), bitorder="little")[:size].astype(bool)
        if not valid.any():
            continue
        rowids = np.frombuffer(row[3], "<i8")[:size][valid]
        vecs = np.frombuffer(row[4], "<f4").reshape(size, dim)[valid]
        ids_buf.append(rowids)
        vec_buf.append(vecs)
        if has_partition:
            p = row[5]
            lists_buf.append(np.full(len(rowids), -1 if p is None else int(p), np.int64))
        held += len(rowids)
        if held >= batch:
            yield _joined(ids_buf, lists_buf, vec_buf, has_partition)
            ids_buf, lists_buf, vec_buf, held = [], [], [], 0
    if held:
        yield _joined(ids_buf, lists_buf, vec_buf, has_partition)
    del lay


def _joined(ids_buf, lists_buf, vec_buf, has_partition):
    return (np.concatenate(ids_buf), np.concatenate(lists_buf) if has_partition else None,
            np.concatenate(vec_buf).astype(np.float32, copy=False))


def _iter_vectors_select(conn, batch, table):  # pragma: no cover - fallback
    dim = _dim_of(conn, table)
    has_list = table == TABLE and (layout(conn) or {}).get("partitioned")
    cur = conn.execute(f"SELECT image_id, {'list' if has_list else 'NULL'}, embedding FROM {table}")
    while True:
        rows = cur.fetchmany(batch)
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        lists = np.fromiter((-1 if r[1] is None else r[1] for r in rows), np.int64, len(rows)) if has_list else None
        vecs = np.frombuffer(b"".join(r[2] for r in rows), "<f4").reshape(len(rows), dim)
        yield ids, lists, vecs


def _dim_of(conn, table: str) -> int:
    sql = _table_sql(conn, table) or ""
    m = re.search(r"\bfloat\[\s*(\d+)\s*\]", sql, re.I)
    if not m:
        raise ValueError(f"{table}: cannot read the vector width from {sql!r}")
    return int(m.group(1))


# ---------------------------------------------------------------- k-means and assignment


def default_nlist(n: int) -> int:
    """About sqrt(N) lists (1,000 at 1M: ~1,000 vectors per list), at least 1, at most 4,096."""
    return int(min(4096, max(1, round(math.sqrt(max(n, 1))))))


def nprobe_for(k: int, nprobe: int, nlist: int, n: int) -> int:
    """Lists probed for ``k`` results: the index's default for k <= 10, twice that for k <= 100, and
    for large k enough lists to hold about 8k vectors."""
    p = nprobe if k <= 10 else 2 * nprobe if k <= 100 else 4 * nprobe
    per_list = max(n / max(nlist, 1), 1.0)
    p = max(p, math.ceil(8 * k / per_list)) if k > 100 else p
    return int(min(max(p, 1), nlist))


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32)


def assign(centroids: np.ndarray, vectors: np.ndarray, block: int = 8192) -> np.ndarray:
    """Index of the nearest centroid (highest dot product; both sides L2-normalised) per vector."""
    out = np.empty(len(vectors), np.int64)
    ct = np.ascontiguousarray(centroids.T, dtype=np.float32)
    for s in range(0, len(vectors), block):
        out[s:s + block] = np.argmax(vectors[s:s + block].astype(np.float32, copy=False) @ ct, axis=1)
    return out


def kmeans(sample: np.ndarray, nlist: int, iters: int = KMEANS_ITERS, seed: int = 0, progress=None) -> np.ndarray:
    """Spherical k-means (cosine): ``nlist`` unit centroids (nlist, D) float32 from ``sample`` (n, D).

    Starts from ``nlist`` distinct sample vectors; each iteration assigns every sample to its nearest
    centroid and replaces each centroid by the normalised mean of its members. An empty list is
    re-seeded with the sample worst served by its centroid."""
    rng = np.random.default_rng(seed)
    x = _normalise(np.asarray(sample, np.float32))
    n = len(x)
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    nlist = int(min(nlist, n))
    cent = x[rng.choice(n, nlist, replace=False)].copy()
    for it in range(iters):
        best = np.empty(n, np.int64)
        score = np.empty(n, np.float32)
        for s in range(0, n, 8192):
            sims = x[s:s + 8192] @ cent.T
            best[s:s + 8192] = np.argmax(sims, axis=1)
            score[s:s + 8192] = sims[np.arange(len(sims)), best[s:s + 8192]]
        sums = np.zeros_like(cent)
        np.add.at(sums, best, x) if n < 4096 else _segment_sum(sums, best, x)
        counts = np.bincount(best, minlength=nlist)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            worst = np.argsort(score)[:len(empty)]
            sums[empty] = x[worst]
        cent = _normalise(sums)
        if progress:
            progress("k-means", it + 1, iters)
    return cent


def _segment_sum(sums: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sums[lab[starts]] = np.add.reduceat(x[order], starts, axis=0)


def load_centroids(conn) -> np.ndarray | None:
    """The centroids (nlist, D) float32, row i = list i; None without a trained index. Cached on the
    connection per index generation."""
    st = state(conn)
    if st is None:
        return None
    cached = getattr(conn, "_ivf_centroids", None)
    if cached is not None and cached[0] == (st["generation"], st["nlist"]):
        return cached[1]
    dim = _dim_of(conn, CENTROIDS)
    cent = np.zeros((st["nlist"], dim), np.float32)
    for lst, blob in conn.execute(f"SELECT list, centroid FROM {CENTROIDS}"):
        if 0 <= lst < st["nlist"]:
            cent[lst] = np.frombuffer(blob, "<f4")
    try:
        conn._ivf_centroids = ((st["generation"], st["nlist"]), cent)
    except AttributeError:  # a plain driver connection: no cache
        pass
    return cent


# ---------------------------------------------------------------- writing rows


def list_of(conn, vector) -> int:
    """The list a vector belongs to: its nearest centroid, or 0 without a trained index."""
    cent = load_centroids(conn)
    if cent is None:
        return 0
    v = np.frombuffer(vector, "<f4") if isinstance(vector, (bytes, bytearray, memoryview)) else np.asarray(vector, np.float32)
    return int(np.argmax(cent @ v))


def insert(conn, image_id: int, blob: bytes) -> int:
    """Insert one vector (float32 bytes) with its list, inside the caller's transaction; returns the list.
    The row must not exist (callers DELETE first: vec0 has no upsert)."""
    lst = list_of(conn, blob)
    conn.execute(f"INSERT INTO {TABLE} (image_id, list, embedding) VALUES (?, ?, ?)", (int(image_id), lst, blob))
    return lst


def insert_many(conn, rows) -> None:
    """Insert ``(image_id, float32 bytes)`` pairs, each with its list (one matrix product for all of them,
    one executemany), inside the caller's transaction. The rows must not exist."""
    rows = list(rows)
    if rows:
        insert_array(conn, [i for i, _ in rows], np.stack([np.frombuffer(blob, "<f4") for _, blob in rows]))


def insert_array(conn, image_ids, vectors: np.ndarray) -> None:
    """Insert the rows of ``vectors`` (n, D) float32 under ``image_ids`` (n,), each with its list, inside
    the caller's transaction (as :func:`insert_many`, without a bytes object per vector)."""
    if not len(image_ids):
        return
    vectors = np.ascontiguousarray(vectors, dtype="<f4")  # (n, D); each row is bound as a blob
    cent = load_centroids(conn)
    if cent is None:
        rows = zip(map(int, image_ids), [0] * len(vectors), vectors)
    else:
        # grouped by list: vec0 appends to a list's last chunk, whose blob each insert reopens; one list after
        # another keeps that chunk's pages at hand (in random list order an insert into a 1M gallery costs
        # about 0.45 ms, in list order about 0.04 ms)
        lists = assign(cent, vectors)  # (n,)
        order = np.argsort(lists, kind="stable")
        ids = np.asarray(image_ids, dtype=np.int64)
        rows = zip(ids[order].tolist(), lists[order].tolist(), vectors[order])
    conn.executemany(f"INSERT INTO {TABLE} (image_id, list, embedding) VALUES (?, ?, ?)", rows)


def delete(conn, image_ids) -> int:
    """Delete the vectors of ``image_ids`` (vec0 DELETE by rowid: each leaves its list; the index stays
    consistent). Run it in the same transaction as the deletion of the images rows. Returns how many
    vectors there were."""
    if not _table_exists(conn, TABLE):
        return 0
    n = 0
    for i in image_ids:
        cur = conn.execute(f"DELETE FROM {TABLE} WHERE image_id = ?", (int(i),))
        n += max(cur.rowcount, 0)
    return n


# ---------------------------------------------------------------- building


def _transaction(conn):
    from .store import transaction

    return transaction(conn)


def _now() -> str:
    from .store import _now as now

    return now()


def _gallery_dim(conn) -> int:
    row = conn.execute("SELECT dim FROM model WHERE id = 1").fetchone() if _table_exists(conn, "model") else None
    if row is not None:
        return int(row[0])
    return _dim_of(conn, TABLE)


def _sample(conn, n_total: int, size: int, seed: int, progress=None) -> np.ndarray:
    """``size`` vectors drawn uniformly from the table (one pass over the shadow tables)."""
    rng = np.random.default_rng(seed)
    size = min(size, n_total)
    pick = np.sort(rng.choice(n_total, size, replace=False)) if size < n_total else np.arange(n_total)
    out, seen, taken = [], 0, 0
    for _, _, vecs in iter_vectors(conn):
        lo, hi = np.searchsorted(pick, [seen, seen + len(vecs)])
        if hi > lo:
            out.append(vecs[pick[lo:hi] - seen].copy())
            taken += hi - lo
        seen += len(vecs)
        if progress:
            progress("sample", seen, n_total)
    return np.concatenate(out) if out else np.zeros((0, _gallery_dim(conn)), np.float32)


def build(conn, nlist: int | None = None, nprobe: int | None = None, sample: int | None = None, seed: int = 0,
          progress=None) -> dict:
    """Train (k-means on a sample) and rebuild the index: every vector re-assigned to its nearest
    centroid, the table rewritten sorted by list. One transaction: readers see the old index or the new
    one. Returns the new state plus timings."""
    t0 = time.perf_counter()
    n = count_vectors(conn)
    if n == 0:
        raise ValueError("the gallery holds no vectors: nothing to index")
    nlist = int(nlist or default_nlist(n))
    if nlist < 1:
        raise ValueError(f"nlist must be positive, not {nlist}")
    nlist = min(nlist, n)
    size = int(sample or min(max(MIN_SAMPLE_PER_LIST * nlist, 10_000), MAX_SAMPLE))
    with _transaction(conn):
        x = _sample(conn, n, size, seed, progress)
        t_sample = time.perf_counter()
        cent = kmeans(x, nlist, seed=seed, progress=progress)
        del x
        t_train = time.perf_counter()
        _rewrite(conn, _gallery_dim(conn), cent, progress)
        seconds = time.perf_counter() - t0
        old = conn.execute("SELECT generation FROM search_index WHERE id = 1").fetchone()
        generation = (int(old[0]) if old else 0) + 1
        conn.execute("DELETE FROM search_index")
        conn.execute("INSERT INTO search_index (id, nlist, nprobe, trained_on, trained_at, seconds, generation) "
                     "VALUES (1, ?, ?, ?, ?, ?, ?)",
                     (len(cent), int(nprobe or min(DEFAULT_NPROBE, len(cent))), n, _now(), seconds, generation))
    return {**state(conn), "sample": size, "sample_seconds": t_sample - t0, "train_seconds": t_train - t_sample,
            "write_seconds": time.perf_counter() - t_train}


def drop(conn) -> None:
    """Forget the trained index (search becomes exact); every vector's list becomes 0."""
    with _transaction(conn):
        if _table_exists(conn, TABLE):
            _rewrite(conn, _gallery_dim(conn), None)
        conn.execute(f"DROP TABLE IF EXISTS {CENTROIDS}")
        if _table_exists(conn, STATE):
            conn.execute("DELETE FROM search_index")


def relayout(conn, progress=None) -> None:
    """Rewrite ``image_embeddings`` in the current layout, keeping every vector's bytes and (when an
    index is trained) re-assigning lists. Migration 0003 and ``doctor --repair`` use it."""
    with _transaction(conn):
        if not _table_exists(conn, TABLE):
            return
        cent = load_centroids(conn) if _table_exists(conn, STATE) else None
        _rewrite(conn, _gallery_dim(conn), cent, progress)


def _rewrite(conn, dim: int, centroids: np.ndarray | None, progress=None) -> None:
    """Stage every vector with its list in a TEMP table, drop and recreate ``image_embeddings`` (and the
    centroids table when ``centroids`` is given), copy back sorted by list. Caller holds the transaction."""
    n = count_vectors(conn)
    conn.execute("DROP TABLE IF EXISTS temp.index_stage")
    conn.execute("CREATE TEMP TABLE index_stage (image_id INTEGER PRIMARY KEY, list INTEGER NOT NULL, embedding BLOB NOT NULL)")
    done = 0
    for ids, _, vecs in iter_vectors(conn):
        lists = assign(centroids, vecs) if centroids is not None else np.zeros(len(ids), np.int64)
        conn.executemany("INSERT INTO temp.index_stage (image_id, list, embedding) VALUES (?, ?, ?)",
                         zip(ids.tolist(), lists.tolist(), (v.tobytes() for v in vecs)))
        done += len(ids)
        if progress:
            progress("assign", done, n)
    staged = conn.execute("SELECT count(*) FROM temp.index_stage").fetchone()[0]
    if staged != n:  # the shadow-table reader missed rows: refuse rather than lose vectors
        raise RuntimeError(f"index rebuild: read {staged} vectors but the table holds {n}; nothing changed")
    conn.execute(f"DROP TABLE {TABLE}")
    conn.execute(vectors_table_sql(dim))
    add_list_index(conn)
    if centroids is not None:
        conn.execute(f"DROP TABLE IF EXISTS {CENTROIDS}")
        conn.execute(centroids_table_sql(dim))
        conn.executemany(f"INSERT INTO {CENTROIDS} (list, centroid) VALUES (?, ?)",
                         ((i, c.astype("<f4").tobytes()) for i, c in enumerate(centroids)))
    cur = conn.execute("SELECT image_id, list, embedding FROM temp.index_stage ORDER BY list, image_id")
    done = 0
    while True:
        rows = cur.fetchmany(8192)
        if not rows:
            break
        conn.executemany(f"INSERT INTO {TABLE} (image_id, list, embedding) VALUES (?, ?, ?)", rows)
        done += len(rows)
        if progress:
            progress("write", done, n)
    conn.execute("DROP TABLE temp.index_stage")
    if hasattr(conn, "_ivf_centroids"):
        conn._ivf_centroids = None


def upgrade(conn) -> None:
    """Migration 0003's Python step: an ``image_embeddings`` made by an older version (no partition key,
    vec0's default chunk of 1,024 vectors) is rewritten in the current layout, vectors bytes unchanged."""
    if _table_exists(conn, TABLE) and not current_layout(conn):
        _rewrite(conn, _gallery_dim(conn), None)


# ---------------------------------------------------------------- search


def search_sql(conn, k: int, exact: bool | None = None, nprobe: int | None = None) -> tuple[str, dict]:
    """The statement :func:`search` runs and its parameters besides ``query``."""
    st = state(conn)
    use_ivf = st is not None and not exact
    if use_ivf:
        n = max(int(st["trained_on"]), count_vectors(conn) if k > 100 else 0)
        p = int(nprobe) if nprobe else nprobe_for(k, int(st["nprobe"]), int(st["nlist"]), n)
        return IVF_SQL, {"k": k, "kk": min(k, KNN_MAX_K), "nprobe": max(1, min(p, int(st["nlist"])))}
    if k <= KNN_MAX_K:
        return EXACT_SQL, {"k": k}
    if st is not None and _largest_list(conn) <= KNN_MAX_K:
        return EXACT_ALL_LISTS_SQL, {"k": k, "kk": KNN_MAX_K}
    return SCAN_SQL, {"k": k}


def _largest_list(conn) -> int:
    row = conn.execute(f"SELECT max(n) FROM (SELECT sum(size) AS n FROM (SELECT partition00, "
                       f"length(validity) AS size FROM {TABLE}_chunks) GROUP BY partition00)").fetchone()
    # an upper bound: 8 slots per validity byte
    return int(row[0] or 0) * 8


def search(conn, query: np.ndarray, k: int, exact: bool | None = None, nprobe: int | None = None):
    """Rows of the nearest ``k`` (the cursor's rows: id, url, path, score, width, height, meta)."""
    if not getattr(conn, "_ivf_mmap", False):
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}").fetchall()
        try:
            conn._ivf_mmap = True
        except AttributeError:  # a plain driver connection: set again next time (cheap)
            pass
    sql, params = search_sql(conn, k, exact, nprobe)
    return conn.execute(sql, {"query": np.asarray(query, "<f4").tobytes(), **params}).fetchall()


# ---------------------------------------------------------------- checks and repair


def check(conn, limit: int = 5) -> dict:
    """The index's consistency: ``{status: ok|problem|skipped, detail, count, examples, misplaced (ids),
    layout_ok, vectors}``. With a trained index every vector's list must be its nearest centroid (a
    vector in another list, or without a list, is found by exact search only)."""
    if not _table_exists(conn, TABLE):
        return {"status": "skipped", "detail": "no image_embeddings table", "count": 0, "examples": [], "misplaced": []}
    lay = layout(conn)
    if not current_layout(conn):
        return {"status": "problem", "count": 1, "examples": [], "misplaced": [], "layout": False,
                "detail": f"image_embeddings has the old layout (partition key: {lay['partitioned']}, "
                          f"chunk_size {lay['chunk_size']}): row-wise reads are slow and no index can be used"}
    st = state(conn)
    if st is None:  # exact search reads every list: the lists do not matter
        n = count_vectors(conn)
        adv = advice(None, n)
        return {"status": "ok", "count": 0, "examples": [], "misplaced": [],
                "detail": f"no index: exact search over {n} vectors" + (f" ({adv})" if adv else "")}
    cent = load_centroids(conn)
    n_cent = conn.execute(f"SELECT count(*) FROM {CENTROIDS}").fetchone()[0]
    if n_cent != st["nlist"] or _dim_of(conn, CENTROIDS) != _gallery_dim(conn):
        return {"status": "problem", "count": 1, "examples": [], "misplaced": [], "centroids": True,
                "detail": f"the index records {st['nlist']} lists but index_centroids holds {n_cent} "
                          f"float[{_dim_of(conn, CENTROIDS)}] centroids"}
    # every vector in a list that exists (cheap: the chunks' partition values, no vector read)
    stray = []
    for p, validity, rowids in conn.execute(f"SELECT partition00, validity, rowids FROM {TABLE}_chunks "
                                            "WHERE partition00 IS NULL OR partition00 < 0 OR partition00 >= ?",
                                            (st["nlist"],)):
        bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little").astype(bool)
        ids = np.frombuffer(rowids, "<i8")
        stray.extend(ids[:len(bits)][bits[:len(ids)]].tolist())
    # every vector in its nearest centroid's list: all of them, or a sample of chunks in a large gallery
    n = count_vectors(conn)
    every = 1 if n <= FULL_CHECK_MAX else max(1, round(n / FULL_CHECK_MAX))
    ct = np.ascontiguousarray(cent.T)
    misplaced = set(stray)
    checked = 0
    for ids, lists, vecs in iter_vectors(conn, every=every):
        checked += len(ids)
        for s in range(0, len(ids), 8192):
            sims = vecs[s:s + 8192] @ ct
            lst = lists[s:s + 8192]
            best = sims.max(axis=1)
            inside = (lst >= 0) & (lst < st["nlist"])
            own = np.where(inside, sims[np.arange(len(lst)), np.clip(lst, 0, st["nlist"] - 1)], -np.inf)
            bad = ~(own >= best - ASSIGN_TOLERANCE)
            if bad.any():
                misplaced.update(ids[s:s + 8192][bad].tolist())
    misplaced = sorted(misplaced)
    scope = "every vector" if every == 1 else f"{checked} vectors (one chunk in {every}; every vector's list exists)"
    detail = (f"{st['nlist']} lists trained on {st['trained_on']} vectors, {n} now, probing {st['nprobe']}; "
              f"checked {scope}")
    adv = advice(st, n)
    if misplaced:
        return {"status": "problem", "count": len(misplaced), "examples": misplaced[:limit], "misplaced": misplaced,
                "detail": f"{len(misplaced)} vectors not in their nearest centroid's list (IVF search misses "
                          f"them): image_ids {', '.join(map(str, misplaced[:limit]))}{', ...' if len(misplaced) > limit else ''}; {detail}"}
    return {"status": "ok", "count": 0, "examples": [], "misplaced": [],
            "detail": f"every vector is in its nearest centroid's list; {detail}" + (f"; {adv}" if adv else "")}


def repair(conn, found: dict | None = None) -> str | None:
    """Fix what :func:`check` found (inside the caller's transaction); returns what was done, or None."""
    found = found or check(conn)
    if found["status"] != "problem":
        return None
    if found.get("layout") is False:
        relayout(conn)
        return "rewrote image_embeddings in the current layout (partition key, chunk_size 128), vectors unchanged"
    if found.get("centroids"):
        drop(conn)
        return "dropped the inconsistent index (search is exact until `python cli.py index` rebuilds it)"
    ids = found["misplaced"]
    for i in ids:
        row = conn.execute(f"SELECT embedding FROM {TABLE} WHERE image_id = ?", (int(i),)).fetchone()
        conn.execute(f"DELETE FROM {TABLE} WHERE image_id = ?", (int(i),))
        insert(conn, int(i), bytes(row[0]))
    return f"moved {len(ids)} vectors into their nearest centroid's list"
