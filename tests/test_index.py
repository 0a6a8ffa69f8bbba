"""The search index (retrieval/index.py): IVF lists in a vec0 partition key, kept in step with the gallery.

Real SQLite files with sqlite-vec loaded, small clustered galleries (a few thousand 48-d vectors, a few
dozen lists), the CLI in subprocesses and the SQL statement in /usr/bin/sqlite3.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlite_vec

from retrieval import index, store

ROOT = Path(__file__).resolve().parent.parent
SQLITE3 = shutil.which("sqlite3") or "/usr/bin/sqlite3"
DIM = 48
N = 3000
LISTS = 24
RECORD = {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short", "interpolation": "hf",
          "pooling": "cls", "dim": DIM}


def clustered(n, seed, centres=40):
    """Vectors around ``centres`` fixed centres (the same centres for every seed)."""
    c = np.random.default_rng(12345).standard_normal((centres, DIM))
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def outcomes(vectors, start=0):
    return [{"status": "ok", "url": f"http://127.0.0.1/{start + i}.jpg", "content_sha256": f"{start + i:064x}",
             "vector": v} for i, v in enumerate(vectors)]


def make_gallery(path, n=N):
    conn = store.connect(path)
    store.ensure_model(conn, RECORD)
    vectors = clustered(n, seed=1)
    store.commit_batch(conn, outcomes(vectors))
    return conn, vectors


@pytest.fixture
def gallery(tmp_path):
    conn, vectors = make_gallery(tmp_path / "gallery.db")
    yield conn, vectors, tmp_path / "gallery.db"
    conn.close()


@pytest.fixture
def indexed(gallery):
    conn, vectors, path = gallery
    index.build(conn, nlist=LISTS, nprobe=4)
    return conn, vectors, path


def exact_ids(vectors, ids, q, k):
    """Ids of the exact top-k by NumPy (float64), ties by id."""
    s = vectors.astype(np.float64) @ q.astype(np.float64)
    order = np.lexsort((ids, -s))[:k]
    return [int(ids[i]) for i in order]


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def lists_of(conn):
    return dict(conn.execute("SELECT image_id, list FROM image_embeddings").fetchall())


# ---------------------------------------------------------------- layout and search


def test_new_gallery_has_the_partitioned_small_chunk_layout(gallery):
    conn, _, _ = gallery
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'image_embeddings'").fetchone()[0]
    assert "list INTEGER PARTITION KEY" in sql and "chunk_size=128" in sql
    assert index.current_layout(conn)
    assert index.state(conn) is None  # no index yet: exact search, every vector in list 0
    assert set(lists_of(conn).values()) == {0}


def test_without_an_index_search_is_exact(gallery):
    conn, vectors, _ = gallery
    ids = np.arange(1, len(vectors) + 1)
    for q in clustered(5, seed=7):
        assert [r["id"] for r in store.search(conn, q, 10)] == exact_ids(vectors, ids, q, 10)


def test_ivf_recall_against_exact(indexed):
    conn, vectors, _ = indexed
    ids = np.arange(1, len(vectors) + 1)
    queries = clustered(30, seed=99)  # not in the gallery
    hits10 = hits100 = 0
    for q in queries:
        got = store.search(conn, q, 10)
        assert [r["rank"] for r in got] == list(range(1, 11))
        assert all(got[i]["score"] >= got[i + 1]["score"] for i in range(9))
        hits10 += len({r["id"] for r in got} & set(exact_ids(vectors, ids, q, 10)))
        hits100 += len({r["id"] for r in store.search(conn, q, 100)} & set(exact_ids(vectors, ids, q, 100)))
        assert [r["id"] for r in store.search(conn, q, 10, exact=True)] == exact_ids(vectors, ids, q, 10)
    assert hits10 / (10 * len(queries)) >= 0.95
    assert hits100 / (100 * len(queries)) >= 0.95
    # probing every list is exact; probing one list is not (the index really restricts the search)
    one = sum(len({r["id"] for r in store.search(conn, q, 100, nprobe=1)} & set(exact_ids(vectors, ids, q, 100)))
              for q in queries)
    assert one / (100 * len(queries)) < 0.9
    q = queries[0]
    assert [r["id"] for r in store.search(conn, q, 50, nprobe=LISTS)] == exact_ids(vectors, ids, q, 50)


def test_ivf_statement_reads_only_the_probed_lists(indexed):
    """Each result is in one of the nprobe lists whose centroids are nearest to the query."""
    conn, vectors, _ = indexed
    cent = index.load_centroids(conn)
    lists = lists_of(conn)
    for q in clustered(5, seed=5):
        probed = set(np.argsort(-(cent @ q))[:2].tolist())
        got = store.search(conn, q, 20, nprobe=2)
        assert got and {lists[r["id"]] for r in got} <= probed


def test_more_than_4096_results_with_an_index(indexed):
    conn, vectors, _ = indexed
    q = clustered(1, seed=3)[0]
    got = store.search(conn, q, 4500)  # here: every list probed, so the answer is exact
    assert len(got) == min(4500, len(vectors)) and len({r["id"] for r in got}) == len(got)
    exact = np.sort(vectors.astype(np.float64) @ q)[::-1]
    assert [r["score"] for r in got] == pytest.approx(exact[:len(got)], abs=1e-5)
    assert [r["id"] for r in got[:100]] == exact_ids(vectors, np.arange(1, len(vectors) + 1), q, 100)
    sql, _ = index.search_sql(conn, 4500, exact=True)
    assert sql == index.EXACT_ALL_LISTS_SQL  # every list's best 4096: exact while no list is larger
    assert [r["id"] for r in store.search(conn, q, 4500, exact=True)] == [r["id"] for r in got]


# ---------------------------------------------------------------- the index follows the gallery


def test_rows_ingested_after_the_build_go_to_their_nearest_list(indexed):
    conn, vectors, _ = indexed
    new = clustered(200, seed=2)
    results = store.commit_batch(conn, outcomes(new, start=10_000))
    cent = index.load_centroids(conn)
    lists = lists_of(conn)
    for (image_id, status), v in zip(results, new):
        assert status == "ok"
        assert lists[image_id] == int(np.argmax(cent @ v))
        assert store.search(conn, v, 1)[0]["id"] == image_id  # searchable at once, through the index
    assert index.check(conn)["status"] == "ok"


def test_replacing_and_promoting_vectors_keeps_lists(indexed):
    """record_ok replacing a row's content and the promotion of its duplicate keep every vector in its list."""
    conn, vectors, _ = indexed
    store.record_duplicate(conn, {"url": "http://127.0.0.1/dup.jpg", "content_sha256": f"{5:064x}"}, 6)
    other = clustered(1, seed=8)[0]
    store.record_ok(conn, {"url": "http://127.0.0.1/5.jpg", "content_sha256": "f" * 64}, other)
    assert index.check(conn)["status"] == "ok"


def test_delete_keeps_the_index_consistent(indexed):
    conn, vectors, _ = indexed
    gone = list(range(1, 3000, 7))
    with store.transaction(conn):
        assert index.delete(conn, gone) == len(gone)
        conn.execute(f"DELETE FROM images WHERE id IN ({','.join(map(str, gone))})")
    assert index.count_vectors(conn) == len(vectors) - len(gone)
    assert index.check(conn)["status"] == "ok"
    assert store.check(conn) == []
    for i in gone[:20]:
        assert gone[0] not in [r["id"] for r in store.search(conn, vectors[i - 1], 10)]
        assert store.get_vector(conn, i) is None
    keep = np.setdiff1d(np.arange(1, len(vectors) + 1), gone)
    q = clustered(1, seed=4)[0]
    assert [r["id"] for r in store.search(conn, q, 10, exact=True)] == exact_ids(vectors[keep - 1], keep, q, 10)


def test_rebuild_keeps_every_vector_bit_for_bit(indexed):
    conn, vectors, _ = indexed
    before = {i: store.get_vector(conn, i).tobytes() for i in range(1, len(vectors) + 1)}
    st = index.build(conn, nlist=12)
    assert st["nlist"] == 12 and st["generation"] == 2
    assert {i: store.get_vector(conn, i).tobytes() for i in before} == before
    assert index.check(conn)["status"] == "ok"
    index.drop(conn)
    assert index.state(conn) is None and set(lists_of(conn).values()) == {0}
    assert {i: store.get_vector(conn, i).tobytes() for i in before} == before


# ---------------------------------------------------------------- doctor


def test_doctor_finds_and_repairs_vectors_outside_their_list(indexed):
    conn, vectors, path = indexed
    cent = index.load_centroids(conn)
    v = vectors[10]
    wrong = int(np.argsort(-(cent @ v))[-1])  # the farthest list
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 11")
    conn.execute("INSERT INTO image_embeddings (image_id, list, embedding) VALUES (11, ?, ?)", (wrong, v.tobytes()))
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 12")  # as the sqlite3 shell would: no list
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (12, ?)", (vectors[11].tobytes(),))
    assert store.search(conn, v, 1, nprobe=1)[0]["id"] != 11  # invisible to the index
    found = index.check(conn)
    assert found["status"] == "problem" and found["misplaced"] == [11, 12]
    proc = cli("doctor", "--db", path, check=False)
    assert proc.returncode == 1
    assert re.search(r"problem\s+search_index\s+2 vectors not in their nearest centroid's list", proc.stdout), proc.stdout
    proc = cli("doctor", "--repair", "--db", path)
    assert re.search(r"fixed\s+search_index", proc.stdout) and "moved 2 vectors" in proc.stdout, proc.stdout
    assert index.check(conn)["status"] == "ok"
    assert store.search(conn, v, 1, nprobe=1)[0]["id"] == 11
    assert store.get_vector(conn, 11).tobytes() == v.tobytes()


def test_doctor_repairs_a_broken_centroids_table(indexed):
    conn, vectors, path = indexed
    conn.execute("DELETE FROM index_centroids WHERE list = 3")
    proc = cli("doctor", "--db", path, check=False)
    assert proc.returncode == 1 and "index_centroids holds 23" in proc.stdout, proc.stdout
    cli("doctor", "--repair", "--db", path)
    assert index.state(conn) is None  # dropped: exact search, nothing missed
    q = clustered(1, seed=6)[0]
    assert [r["id"] for r in store.search(conn, q, 10)] == exact_ids(vectors, np.arange(1, N + 1), q, 10)
    assert cli("doctor", "--db", path).returncode == 0


def test_renormalised_vector_goes_into_its_list(indexed):
    conn, vectors, path = indexed
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 4")
    conn.execute("INSERT INTO image_embeddings (image_id, list, embedding) VALUES (4, 0, ?)", ((3 * vectors[3]).tobytes(),))
    cli("doctor", "--repair", "--db", path)
    assert index.check(conn)["status"] == "ok"
    assert lists_of(conn)[4] == int(np.argmax(index.load_centroids(conn) @ vectors[3]))


# ---------------------------------------------------------------- upgrade from the previous schema


def old_gallery(path, vectors):
    """A gallery as the code before migration 0003 made it: 0001 + 0002, vec0's default layout."""
    conn = store.connect(path, apply_migrations=False)
    store.migrate(conn, upto=2)
    with store.transaction(conn):
        conn.execute("INSERT INTO model (id, variant, weights_sha256, preprocess, interpolation, pooling, dim, created_at) "
                     "VALUES (1, 'small', ?, 'resize-short', 'hf', 'cls', ?, '2025-01-01T00:00:00.000Z')", ("0" * 64, DIM))
        conn.execute(f"CREATE VIRTUAL TABLE image_embeddings USING vec0(image_id INTEGER PRIMARY KEY, "
                     f"embedding float[{DIM}] distance_metric=cosine)")
        for i, v in enumerate(vectors, start=1):
            conn.execute("INSERT INTO images (id, url, url_hash, status, content_sha256) VALUES (?, ?, ?, 'ok', ?)",
                         (i, f"http://127.0.0.1/{i}.jpg", f"{i:064x}", f"{i:064x}"))
            conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (?, ?)", (i, v.tobytes()))
        conn.execute("INSERT INTO images (url, url_hash, status, error) VALUES ('http://127.0.0.1/x', 'x', 'failed', 'http-404: x')")
        conn.execute("DELETE FROM image_embeddings WHERE image_id = 7")  # a hole in a chunk
        conn.execute("DELETE FROM images WHERE id = 7")
    return conn


def test_upgrade_from_the_previous_schema_keeps_rows_vectors_and_answers(tmp_path):
    path = tmp_path / "old.db"
    vectors = clustered(2500, seed=1)  # more than one 1,024-vector chunk of the old layout
    conn = old_gallery(path, vectors)
    queries = clustered(5, seed=9)
    old_sql = ("SELECT image_id, distance FROM image_embeddings WHERE embedding MATCH ? AND k = 20 "
               "ORDER BY distance")
    answers = [conn.execute(old_sql, (q.tobytes(),)).fetchall() for q in queries]
    rows = conn.execute("SELECT * FROM images ORDER BY id").fetchall()
    blobs = dict(conn.execute("SELECT image_id, embedding FROM image_embeddings").fetchall())
    assert "partition" not in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'image_embeddings'").fetchone()[0]
    conn.close()

    conn = store.connect(path)  # applies 0003 and its Python step
    assert "0003_search_index" in store.applied_migrations(conn)
    assert index.current_layout(conn)
    assert conn.execute("SELECT * FROM images ORDER BY id").fetchall() == rows
    assert dict(conn.execute("SELECT image_id, embedding FROM image_embeddings").fetchall()) == blobs
    assert len(blobs) == 2499
    for q, before in zip(queries, answers):
        got = store.search(conn, q, 20)
        assert [(r["id"], 1 - r["score"]) for r in got] == [(i, pytest.approx(d, abs=1e-6)) for i, d in before]
    assert store.check(conn) == []
    # the upgraded gallery takes an index like a new one
    index.build(conn, nlist=16)
    assert index.check(conn)["status"] == "ok"
    conn.close()
    assert cli("doctor", "--db", path).returncode == 0


def test_doctor_repair_upgrades_an_old_gallery(tmp_path):
    path = tmp_path / "old.db"
    vectors = clustered(300, seed=1)
    old_gallery(path, vectors).close()
    proc = cli("doctor", "--db", path, check=False)
    assert proc.returncode == 1 and "0003_search_index" in proc.stdout and "old layout" in proc.stdout, proc.stdout
    proc = cli("doctor", "--repair", "--db", path)
    assert "healthy" in proc.stdout
    conn = store.connect(path)
    assert index.current_layout(conn)
    assert {i: store.get_vector(conn, i).tobytes() for i in range(1, 301) if i != 7} == \
        {i: vectors[i - 1].tobytes() for i in range(1, 301) if i != 7}


def uses_list_index(conn) -> bool:
    """Whether vec0's lookup of a list's last chunk goes through migration 0008's index."""
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT max(rowid) FROM image_embeddings_chunks WHERE partition00 = ?",
                        (3,)).fetchall()
    return any(index.LIST_INDEX in str(tuple(r)) for r in plan)


def test_migration_0008_on_a_blank_gallery_and_every_new_vectors_table(tmp_path):
    conn = store.connect(tmp_path / "blank.db")
    assert "0008_list_index" in store.applied_migrations(conn)  # no vectors table yet: nothing to index
    store.ensure_model(conn, RECORD)
    assert uses_list_index(conn)
    store.commit_batch(conn, outcomes(clustered(600, seed=1)))
    index.build(conn, nlist=8)  # drops and recreates image_embeddings
    assert uses_list_index(conn)
    assert index.check(conn)["status"] == "ok"


def test_migration_0008_on_a_gallery_made_by_the_previous_schema(tmp_path):
    path = tmp_path / "g7.db"
    conn = store.connect(path, apply_migrations=False)
    store.migrate(conn, upto=7)
    store.ensure_model(conn, RECORD)
    conn.execute(f"DROP INDEX {index.LIST_INDEX}")  # as 0001-0007 made it: no index on the shadow table
    vectors = clustered(800, seed=1)
    store.commit_batch(conn, outcomes(vectors))
    index.build(conn, nlist=8)
    conn.execute(f"DROP INDEX {index.LIST_INDEX}")
    conn.execute("DELETE FROM migrations WHERE name = '0008_list_index'")
    assert not uses_list_index(conn)
    rows = conn.execute("SELECT * FROM images ORDER BY id").fetchall()
    blobs = dict(conn.execute("SELECT image_id, embedding FROM image_embeddings").fetchall())
    before = lists_of(conn)
    q = clustered(1, seed=5)[0]
    answer = [(r["id"], r["score"]) for r in store.search(conn, q, 10)]
    conn.close()
    conn = store.connect(path)  # applies 0008
    assert "0008_list_index" in store.applied_migrations(conn)
    assert uses_list_index(conn)
    assert conn.execute("SELECT * FROM images ORDER BY id").fetchall() == rows
    assert dict(conn.execute("SELECT image_id, embedding FROM image_embeddings").fetchall()) == blobs
    assert lists_of(conn) == before
    assert [(r["id"], r["score"]) for r in store.search(conn, q, 10)] == answer
    store.commit_batch(conn, outcomes(clustered(50, seed=3), start=10_000))  # new rows into their lists
    assert index.check(conn)["status"] == "ok"
    conn.close()
    assert cli("doctor", "--db", path).returncode == 0


# ---------------------------------------------------------------- CLI and the sqlite3 shell


def test_cli_index_stats_and_query(gallery):
    conn, vectors, path = gallery
    proc = cli("index", "--db", path)
    assert "exact search is fast below 50,000" in proc.stdout and index.state(conn) is None
    assert "index      none: exact search over 3000 vectors" in cli("stats", "--db", path).stdout
    proc = cli("index", "--db", path, "--lists", "16", "--nprobe", "3")
    assert "index of 16 lists over 3000 vectors" in proc.stdout, proc.stdout
    out = cli("stats", "--db", path).stdout
    assert "index      16 lists, probing 3; trained on 3000 vectors" in out, out
    assert cli("stats", "--json", "--db", path).stdout.count('"state": "trained"') == 1
    ivf = [line.split()[2] for line in cli("query", "--id", 1, "-k", 5, "--include-self", "--db", path).stdout.splitlines()[1:]]
    exact = [line.split()[2] for line in cli("query", "--id", 1, "-k", 5, "--exact", "--include-self", "--db", path).stdout.splitlines()[1:]]
    assert ivf[0] == exact[0] == "1" and len(exact) == 5
    assert exact == [str(i) for i in exact_ids(vectors, np.arange(1, N + 1), vectors[0], 5)]
    store.commit_batch(conn, outcomes(clustered(4000, seed=3), start=20_000))  # the gallery more than doubles
    assert "rebuild advised" in cli("stats", "--db", path).stdout
    assert "rebuild advised" in cli("doctor", "--db", path).stdout
    cli("index", "--db", path, "--drop")
    assert index.state(conn) is None


def test_query_by_id_honours_exact_and_nprobe_when_it_leaves_the_image_out(indexed):
    """``query --id N`` leaves N out of its results (the default): --exact and --nprobe still apply."""
    conn, vectors, path = indexed
    ids = np.arange(1, N + 1)
    # an image whose 20 nearest others differ between one probed list and the exact answer
    probe = next(i for i in range(1, 400)
                 if [r["id"] for r in store.search(conn, vectors[i - 1], 21, nprobe=1)]
                 != [r["id"] for r in store.search(conn, vectors[i - 1], 21, exact=True)])

    def top(*flags):
        out = cli("query", "--id", probe, "-k", 20, *flags, "--db", path).stdout.splitlines()[1:]
        return [int(line.split()[2]) for line in out if line.split() and line.split()[0].isdigit()]

    exact = [i for i in exact_ids(vectors, ids, vectors[probe - 1], 21) if i != probe][:20]
    assert top("--exact") == exact
    one_list = [r["id"] for r in store.search(conn, vectors[probe - 1], 21, nprobe=1) if r["id"] != probe][:20]
    assert top("--nprobe", "1") == one_list != exact


def readme_shell_sql() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- ivf-sql.*?-->\s*```sql\n(.*?)```", text, re.S)
    assert m, "README has no ivf-sql block"
    return m.group(1)


def test_readme_shows_the_statement_index_provides():
    assert readme_shell_sql().strip() == index.SHELL_SQL.strip()


@pytest.mark.skipif(not Path(SQLITE3).exists(), reason="no sqlite3 shell")
def test_ivf_statement_runs_in_the_sqlite3_shell(indexed):
    conn, vectors, path = indexed
    load = cli("vec-path").stdout.strip()
    assert load == sqlite_vec.loadable_path()
    proc = subprocess.run([SQLITE3, str(path), "-cmd", f".load {load}", "-cmd", ".mode list"],
                          input=readme_shell_sql(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    rows = [line.split("|") for line in proc.stdout.strip().splitlines()]
    expected = store.search(conn, vectors[0], 10)  # the nprobe recorded by the build: 4
    assert [int(r[0]) for r in rows] == [r["id"] for r in expected]
    assert [float(r[1]) for r in rows] == pytest.approx([round(r["score"], 4) for r in expected], abs=1e-4)
    assert int(rows[0][0]) == 1 and rows[0][2] == "http://127.0.0.1/0.jpg"
