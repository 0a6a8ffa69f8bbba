"""The gallery database (retrieval/store.py): real SQLite files in tmp_path, sqlite-vec loaded."""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import sqlite_vec

from retrieval import store
from retrieval.errors import DatabaseError, ModelMismatchError

SMALL = dict(
    variant="small", weights_sha256="ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1",
    preprocess="resize-256-crop-224", interpolation="bicubic", pooling="cls", dim=384,
)
BASE = dict(SMALL, variant="base", weights_sha256="d73036b56966966d07975d696bde331762f37297e2f095de8cea0040c3aa0841",
            dim=768)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def model(dim):
    return dict(SMALL, dim=dim)


@pytest.fixture
def db(tmp_path):
    conn = store.connect(tmp_path / "gallery.db")
    yield conn
    conn.close()


def tables(conn):
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def ok(url, vector, sha=None, **row):
    return dict(status="ok", url=url, vector=vector, content_sha256=sha or store.url_hash(url), **row)


# ---------------------------------------------------------------- schema and migrations


def test_blank_database_reaches_current_schema(db):
    names = [name for name, _ in store.available_migrations()]
    assert names and names[0].startswith("0001_")
    assert store.applied_migrations(db) == names
    assert {"images", "model", "runs", "migrations"} <= tables(db)
    assert "image_embeddings" not in tables(db)  # created with the model, not by a migration
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert db.execute("SELECT vec_version()").fetchone()[0] == "v0.1.9"
    assert store.migrate(db) == []  # nothing pending
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"images_status", "images_content_sha256", "images_ok_content"} <= indexes


@pytest.mark.parametrize("upto", range(len(store.available_migrations())))
def test_database_at_every_earlier_migration_upgrades(tmp_path, upto):
    path = tmp_path / "old.db"
    conn = store.connect(path, apply_migrations=False)
    names = [name for name, _ in store.available_migrations()]
    assert store.migrate(conn, upto=upto) == names[:upto]
    if upto >= 1:  # the images table exists: put a row in it, it must survive the upgrade
        conn.execute("INSERT INTO images (url, url_hash, status) VALUES ('u', 'h', 'failed')")
    conn.close()
    conn = store.connect(path)
    assert store.applied_migrations(conn) == names
    assert {"images", "model", "runs"} <= tables(conn)
    if upto >= 1:
        assert [tuple(r) for r in conn.execute("SELECT url FROM images")] == [("u",)]
    conn.close()


def test_unknown_migration_refused(tmp_path):
    path = tmp_path / "newer.db"
    store.connect(path).execute(
        "INSERT INTO migrations (name, applied_at) VALUES ('0999_from_the_future', 'x')"
    ).connection.close()
    with pytest.raises(DatabaseError) as err:
        store.connect(path)
    assert str(path) in str(err.value) and "0999_from_the_future" in str(err.value)
    assert "newer" in str(err.value)


def test_not_a_database_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are not the pages you are looking for\n" * 200)
    with pytest.raises(DatabaseError, match="not a SQLite database") as err:
        store.connect(path)
    assert str(path) in str(err.value)
    with pytest.raises(DatabaseError, match="cannot open") as err:
        store.connect(tmp_path / "no-such-dir" / "g.db")
    assert "no-such-dir" in str(err.value)


def test_failing_migration_leaves_nothing(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_a.sql").write_text("CREATE TABLE a (x); -- a comment; with semicolons\nINSERT INTO a VALUES (';');\n")
    (migrations / "0002_b.sql").write_text("CREATE TABLE b (x);\nINSERT INTO nowhere VALUES (1);\n")
    conn = store.connect(tmp_path / "m.db", apply_migrations=False)
    with pytest.raises(DatabaseError, match="0002_b"):
        store.migrate(conn, directory=migrations)
    assert store.applied_migrations(conn) == ["0001_a"]
    assert "a" in tables(conn) and "b" not in tables(conn)
    assert [tuple(r) for r in conn.execute("SELECT x FROM a")] == [(";",)]
    assert not conn.in_transaction


def test_missing_migration_files_are_an_error_not_an_empty_schema(tmp_path):
    empty = tmp_path / "migrations"
    empty.mkdir()
    conn = store.connect(tmp_path / "m.db", apply_migrations=False)
    with pytest.raises(DatabaseError, match="no migration files in .*migrations.*reinstall"):
        store.migrate(conn, directory=empty)
    assert "migrations" not in tables(conn)


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url, expected",
    [
        ("HTTP://Example.COM/Path/IMG.jpg", "http://example.com/Path/IMG.jpg"),
        ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
        ("https://example.com:80/a.jpg", "https://example.com:80/a.jpg"),
        ("http://example.com:8080/a.jpg", "http://example.com:8080/a.jpg"),
        ("http://example.com/a.jpg#frag", "http://example.com/a.jpg"),
        ("http://example.com/a.jpg?b=C&a=1#x", "http://example.com/a.jpg?b=C&a=1"),
        ("http://example.com/a%2Fb.jpg?", "http://example.com/a%2Fb.jpg?"),
        ("http://User:Pw@Example.com:80/x", "http://User:Pw@example.com/x"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://[FE80::1]:8080/x", "http://[fe80::1]:8080/x"),
        ("  http://example.com/x \n", "http://example.com/x"),
        ("/data/Photos/a#1.jpg", "/data/Photos/a#1.jpg"),  # a local path: kept as is
    ],
)
def test_normalise_url(url, expected):
    assert store.normalise_url(url) == expected


def test_url_hash():
    assert store.url_hash("HTTP://EXAMPLE.com:80/x#y") == store.url_hash("http://example.com/x")
    assert store.url_hash("http://example.com/x") != store.url_hash("http://example.com/X")
    assert len(store.url_hash("http://example.com/x")) == 64


# ---------------------------------------------------------------- image rows


def test_record_ok_failed_duplicate(db):
    store.ensure_model(db, model(4))
    v = np.array([0.6, 0.8, 0, 0], np.float32)
    a, b, c = "http://a.test/1.jpg", "http://b.test/2.jpg", "http://c.test/3.jpg"
    result = store.commit_batch(db, [
        ok(a, v, sha="s1", width=640, height=480, format="JPEG", bytes=1234, http_status=200,
           path="/tmp/x.jpg", meta={"label": "cat"}),
        dict(status="failed", url=b, error="http-404: Not Found", http_status=404),
        dict(status="duplicate", url=c, content_sha256="s1"),  # found by content, within the batch
    ])
    assert [s for _, s in result] == ["ok", "failed", "duplicate"]
    ia, ib, ic = [i for i, _ in result]
    got = store.known(db, [store.url_hash(u) for u in (a, b, c)] + ["0" * 64])
    assert set(got) == {store.url_hash(u) for u in (a, b, c)}
    assert got[store.url_hash(a)]["status"] == "ok" and got[store.url_hash(a)]["content_sha256"] == "s1"
    assert got[store.url_hash(b)] == dict(
        id=ib, url=b, status="failed", attempts=1, error="http-404: Not Found", http_status=404,
        mtime=None, content_sha256=None,
    )
    assert store.get_image(db, ic)["duplicate_of"] == ia
    assert store.get_image(db, ia)["meta"] == {"label": "cat"}
    assert store.find_by_content(db, "s1") == ia and store.find_by_content(db, "nope") is None
    np.testing.assert_array_equal(store.get_vector(db, ia), v)
    assert store.get_vector(db, ib) is None and store.get_vector(db, ic) is None

    # failing again counts attempts; then succeeding clears the error
    assert store.record_failed(db, dict(url=b, error="timeout: read timed out")) == (ib, "failed")
    row = store.get_image(db, ib)
    assert (row["attempts"], row["error"], row["http_status"]) == (2, "timeout: read timed out", 404)
    assert store.record_ok(db, dict(url=b, content_sha256="s2", http_status=200), v) == (ib, "ok")
    row = store.get_image(db, ib)
    assert (row["status"], row["error"], row["attempts"], row["http_status"]) == ("ok", None, 3, 200)

    # a failure of an ok row keeps it ok, with its vector
    assert store.record_failed(db, dict(url=a, error="http-500: oops", http_status=500)) == (ia, "ok")
    row = store.get_image(db, ia)
    assert (row["status"], row["http_status"], row["width"]) == ("ok", 200, 640)
    assert store.get_vector(db, ia) is not None

    # an ok outcome whose content another ok row holds is recorded as its duplicate
    d = "http://d.test/4.jpg"
    idd, status = store.record_ok(db, dict(url=d, content_sha256="s1"), v)
    assert status == "duplicate" and store.get_image(db, idd)["duplicate_of"] == ia
    assert store.get_vector(db, idd) is None

    # an ok row that becomes a duplicate loses its vector
    assert store.record_duplicate(db, dict(url=b, content_sha256="s1"), ia) == (ib, "duplicate")
    assert store.get_vector(db, ib) is None
    assert store.stats(db)["counts"] == dict(ok=1, failed=0, duplicate=3, total=4)
    assert store.check(db) == []


def test_bad_rows_and_vectors_refused(db):
    store.ensure_model(db, model(4))
    with pytest.raises(ValueError, match="not L2-normalised"):
        store.record_ok(db, dict(url="http://x/1"), np.array([1, 1, 0, 0], np.float32))
    with pytest.raises(ValueError, match="shape"):
        store.record_ok(db, dict(url="http://x/1"), np.ones(3, np.float32) / np.sqrt(3))
    with pytest.raises(ValueError, match="unknown image row keys: colour"):
        store.record_failed(db, dict(url="http://x/1", error="e", colour="red"))
    with pytest.raises(ValueError, match="error"):
        store.record_failed(db, dict(url="http://x/1"))
    assert db.execute("SELECT count(*) FROM images").fetchone()[0] == 0


def test_replacing_a_vector_leaves_exactly_one(db):
    store.ensure_model(db, model(4))
    url = "/data/photos/a.jpg"
    first, second = np.array([1, 0, 0, 0], np.float32), np.array([0, 0, 0.6, 0.8], np.float32)
    image_id, _ = store.record_ok(db, dict(url=url, content_sha256="old", mtime=1), first)
    assert store.record_ok(db, dict(url=url, content_sha256="new", mtime=2), second) == (image_id, "ok")
    assert db.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM images").fetchone()[0] == 1
    np.testing.assert_array_equal(store.get_vector(db, image_id), second)
    assert store.known(db, [store.url_hash(url)])[store.url_hash(url)]["mtime"] == 2


def test_batch_that_raises_midway_leaves_nothing(db):
    store.ensure_model(db, model(4))
    v = np.array([1, 0, 0, 0], np.float32)
    store.commit_batch(db, [ok("http://x/before", v)])
    bad = np.array([3, 0, 0, 0], np.float32)
    with pytest.raises(ValueError):
        store.commit_batch(db, [
            ok("http://x/1", v, sha="a"),
            dict(status="failed", url="http://x/2", error="http-404: Not Found"),
            dict(status="failed", url="http://x/before", error="timeout: slow"),
            ok("http://x/3", bad, sha="b"),
        ])
    assert not db.in_transaction
    assert [r[0] for r in db.execute("SELECT url FROM images")] == ["http://x/before"]
    assert store.known(db, [store.url_hash("http://x/before")])[store.url_hash("http://x/before")]["attempts"] == 1
    assert db.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == 1


# ---------------------------------------------------------------- model


def test_model_recorded_once_and_mismatch_refused(tmp_path):
    path = tmp_path / "gallery.db"
    conn = store.connect(path)
    assert store.get_model(conn) is None
    stored = store.ensure_model(conn, dict(BASE, image_size=224))
    assert stored["variant"] == "base" and stored["dim"] == 768 and stored["image_size"] == 224
    assert "image_embeddings" in tables(conn)
    assert store.ensure_model(conn, dict(BASE, image_size=224))["created_at"] == stored["created_at"]
    conn.close()

    conn = store.connect(path)
    with pytest.raises(ModelMismatchError) as err:
        store.ensure_model(conn, SMALL)
    message = str(err.value)
    assert message.startswith(f"{path} was built with weights sha256 d73036b56966… (base), not ae1e99fcefd5… (small)")
    assert "dim 768, not 384" in message
    with pytest.raises(ModelMismatchError, match=r"pooling 'cls', not 'mean'"):
        store.ensure_model(conn, dict(BASE, pooling="mean"))
    with pytest.raises(ModelMismatchError, match=r"image_size 224, not 448"):
        store.ensure_model(conn, dict(BASE, image_size=448))
    with pytest.raises(ModelMismatchError, match="768-d"):
        store.search(conn, np.ones(384, np.float32) / np.sqrt(384), 5)
    assert store.get_model(conn)["variant"] == "base"
    conn.close()


# ---------------------------------------------------------------- search


def test_search_matches_numpy_brute_force(db):
    rng = np.random.default_rng(0)
    store.ensure_model(db, model(384))
    x = unit(rng, 200, 384)
    ids = [i for i, _ in store.commit_batch(
        db, [ok(f"http://img.test/{i}.jpg", x[i], width=i, height=2 * i, meta={"n": i}) for i in range(200)]
    )]
    for q in unit(rng, 3, 384):
        got = store.search(db, q, 10)
        scores = x @ q
        order = np.argsort(-scores)[:10]
        assert [r["id"] for r in got] == [ids[i] for i in order]
        assert [r["rank"] for r in got] == list(range(1, 11))
        np.testing.assert_allclose([r["score"] for r in got], scores[order], atol=1e-5)
        first = got[0]
        n = int(order[0])
        assert (first["url"], first["width"], first["height"], first["meta"]) == (
            f"http://img.test/{n}.jpg", n, 2 * n, {"n": n})
    # a stored vector finds itself first with score 1
    top = store.search(db, x[7], 1)[0]
    assert top["id"] == ids[7] and top["score"] == pytest.approx(1.0, abs=1e-6)
    assert len(store.search(db, x[0], 1000)) == 200


def test_search_k_above_sqlite_vec_limit(db):
    rng = np.random.default_rng(1)
    store.ensure_model(db, model(8))
    n = 5000
    x = unit(rng, n, 8)
    store.commit_batch(db, [ok(f"http://img.test/{i}", x[i]) for i in range(n)])
    q = unit(rng, 1, 8)[0]
    got = store.search(db, q, 4500)  # beyond KNN_MAX_K: the full-scan statement
    assert len(got) == 4500
    scores = x @ q
    np.testing.assert_allclose([r["score"] for r in got], np.sort(scores)[::-1][:4500], atol=1e-5)
    assert [r["id"] for r in got[:50]] == [int(i) + 1 for i in np.argsort(-scores)[:50]]
    # both statements agree where they overlap
    knn = store.search(db, q, store.KNN_MAX_K)
    assert [r["id"] for r in knn[:100]] == [r["id"] for r in got[:100]]
    assert len(store.search(db, q, 10**6)) == n


def test_search_empty_gallery(db):
    assert store.search(db, np.ones(4, np.float32) / 2, 3) == []
    store.ensure_model(db, model(4))
    assert store.search(db, np.ones(4, np.float32) / 2, 3) == []
    with pytest.raises(ValueError):
        store.search(db, np.ones(4, np.float32) / 2, 0)


# ---------------------------------------------------------------- runs, stats, check


def test_runs_and_interrupted_runs(db, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db.execute(
        "INSERT INTO runs (started_at, source, pid, host, status) VALUES ('2020-01-01T00:00:00.000Z', 'old.csv', ?, ?, 'running')",
        (dead.pid, socket.gethostname()),
    )
    db.execute(  # another host's run: cannot tell, left alone
        "INSERT INTO runs (started_at, source, pid, host, status) VALUES ('2020-01-01T00:00:00.000Z', 'x.csv', ?, 'elsewhere', 'running')",
        (dead.pid,),
    )
    run_id = store.start_run(db, tmp_path / "images.csv")
    statuses = [r[0] for r in db.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["interrupted", "running", "running"]
    store.finish_run(db, run_id, dict(new=5, skipped=2, failed=1, duplicate=0, images_per_s=12.5), "completed")
    last = store.stats(db)["runs"][0]
    assert last["id"] == run_id and last["status"] == "completed" and last["source"] == str(tmp_path / "images.csv")
    assert (last["new"], last["skipped"], last["failed"], last["duplicate"], last["images_per_s"]) == (5, 2, 1, 0, 12.5)
    assert last["finished_at"] >= last["started_at"]
    assert store.start_run(db, "again") > run_id  # our own running run is alive: not marked
    assert [r[0] for r in db.execute("SELECT status FROM runs WHERE id = ?", (run_id + 1,))] == ["running"]


def test_stats_and_check(db):
    assert store.check(db) == ["no model record"]
    store.ensure_model(db, model(4))
    v = np.array([1, 0, 0, 0], np.float32)
    store.commit_batch(db, [ok("http://x/1", v, sha="a"), ok("http://x/2", v, sha="b"),
                            dict(status="failed", url="http://x/3", error="undecodable: bad")])
    s = store.stats(db)
    assert s["counts"] == dict(ok=2, failed=1, duplicate=0, total=3)
    assert s["vectors"] == 2 and s["model"]["dim"] == 4 and s["file_bytes"] > 0
    assert s["database"].endswith("gallery.db") and len(s["migrations"]) == len(store.available_migrations())
    assert store.check(db) == []
    db.execute("DELETE FROM image_embeddings WHERE image_id = 1")
    db.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (99, ?)", (np.float32([2, 0, 0, 0]).tobytes(),))
    problems = store.check(db)
    assert any("ok images without a vector: ids 1" in p for p in problems)
    assert any("vectors without an ok image: image_ids 99" in p for p in problems)
    assert any("not L2-normalised: image_ids 99" in p for p in problems)


# ---------------------------------------------------------------- the plain sqlite3 shell


@pytest.mark.skipif(not shutil.which("sqlite3") and not os.path.exists("/usr/bin/sqlite3"), reason="no sqlite3 shell")
def test_plain_sqlite3_shell_can_query(tmp_path):
    shell = "/usr/bin/sqlite3" if os.path.exists("/usr/bin/sqlite3") else shutil.which("sqlite3")
    path = tmp_path / "gallery.db"
    conn = store.connect(path)
    store.ensure_model(conn, model(4))
    vectors = np.float32([[1, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 1, 0, 0], [-1, 0, 0, 0]])
    store.commit_batch(conn, [ok(f"http://x/{i}.jpg", v) for i, v in enumerate(vectors)])
    conn.close()
    extension = os.path.splitext(sqlite_vec.loadable_path())[0]
    query = (
        "WITH knn AS (SELECT image_id, distance FROM image_embeddings "
        "WHERE embedding MATCH vec_f32('[1, 0, 0, 0]') AND k = 3) "
        "SELECT images.url, round(1 - knn.distance, 3) FROM knn JOIN images ON images.id = knn.image_id "
        "ORDER BY knn.distance;"
    )
    out = subprocess.run(
        [shell, str(path), f".load {extension}", query, "SELECT status, count(*) FROM images GROUP BY status;"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["http://x/0.jpg|1.0", "http://x/1.jpg|0.8", "http://x/2.jpg|0.0", "ok|4"]


# ---------------------------------------------------------------- two processes at once


def _writer(path, worker, barrier, errors):
    try:
        from retrieval import store as st

        barrier.wait(timeout=60)
        conn = st.connect(path)
        st.ensure_model(conn, model(4))
        run_id = st.start_run(conn, f"worker-{worker}")
        v = np.array([1, 0, 0, 0], np.float32)
        for batch in range(10):
            st.commit_batch(conn, [
                ok(f"http://w{worker}/{batch}/{i}", v, sha=f"{worker}-{batch}-{i}") for i in range(5)
            ] + [dict(status="failed", url=f"http://w{worker}/{batch}/bad", error="http-404: Not Found")])
            st.known(conn, [st.url_hash(f"http://w{1 - worker}/{batch}/0")])
        st.finish_run(conn, run_id, dict(new=50, failed=10), "completed")
        conn.close()
    except BaseException as exc:  # report to the parent
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.db")  # a fresh file: both processes migrate it too
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, barrier, errors)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    messages = []
    while True:
        try:
            messages.append(errors.get(timeout=0.5))
        except queue.Empty:
            break
    assert messages == [] and [p.exitcode for p in procs] == [0, 0]
    conn = store.connect(path)
    assert store.stats(conn)["counts"] == dict(ok=100, failed=20, duplicate=0, total=120)
    assert [r[0] for r in conn.execute("SELECT status FROM runs")] == ["completed", "completed"]
    assert store.check(conn) == []
    conn.close()


def test_changed_content_of_an_ok_row_promotes_its_duplicate(tmp_path):
    """A file re-encoded with new content must not leave its duplicates pointing at the wrong picture."""
    conn = store.connect(tmp_path / "g.db")
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 4})
    a_old, a_new = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    a, _ = store.record_ok(conn, {"url": "/x/a.jpg", "content_sha256": "a" * 64}, a_old)
    b, st = store.record_ok(conn, {"url": "/x/b.jpg", "content_sha256": "a" * 64}, a_old)
    c, _ = store.record_ok(conn, {"url": "/x/c.jpg", "content_sha256": "a" * 64}, a_old)
    assert st == "duplicate"
    store.record_ok(conn, {"url": "/x/a.jpg", "content_sha256": "b" * 64}, a_new)
    rows = {r["id"]: dict(r) for r in conn.execute("SELECT id, status, duplicate_of, content_sha256 FROM images")}
    assert rows[a]["status"] == "ok" and rows[a]["content_sha256"] == "b" * 64
    assert rows[b]["status"] == "ok" and rows[b]["duplicate_of"] is None
    assert rows[c]["status"] == "duplicate" and rows[c]["duplicate_of"] == b
    np.testing.assert_allclose(store.get_vector(conn, b), a_old)
    np.testing.assert_allclose(store.get_vector(conn, a), a_new)
    assert store.check(conn) == []


def test_an_ok_row_that_becomes_a_duplicate_of_other_content_hands_its_vector_to_its_duplicate(tmp_path):
    """Issue 10: a.png (X), b.png (copy of a), c.png (Y); a's file then holds Y. a becomes a duplicate of c,
    and content X keeps its vector through b (promoted to ok), not dangling at a."""
    conn = store.connect(tmp_path / "g.db")
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 4})
    x, y = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    a, _ = store.record_ok(conn, {"url": "/x/a.png", "content_sha256": "a" * 64}, x)
    b, st = store.record_ok(conn, {"url": "/x/b.png", "content_sha256": "a" * 64}, x)
    c, _ = store.record_ok(conn, {"url": "/x/c.png", "content_sha256": "c" * 64}, y)
    assert st == "duplicate"
    assert store.record_duplicate(conn, {"url": "/x/a.png", "content_sha256": "c" * 64}, c) == (a, "duplicate")
    rows = {r["id"]: dict(r) for r in conn.execute("SELECT id, status, duplicate_of, content_sha256 FROM images")}
    assert rows[a]["status"] == "duplicate" and rows[a]["duplicate_of"] == c
    assert rows[b]["status"] == "ok" and rows[b]["duplicate_of"] is None and rows[b]["content_sha256"] == "a" * 64
    np.testing.assert_allclose(store.get_vector(conn, b), x)
    assert store.get_vector(conn, a) is None
    assert [r["id"] for r in store.search(conn, x, 1)] == [b]
    assert store.check(conn) == []
    conn.close()


# ---------------------------------------------------------------- read-only readers (issue 10)

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _cli(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env.update(DINOV2_OFFLINE="1", DINOV2_ALLOW_PRIVATE="1")
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _digest(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _not_a_gallery(kind, path):
    """Write a file that is not a gallery; returns the words the refusal must hold."""
    import sqlite3

    if kind == "zero-bytes":
        path.write_bytes(b"")
        return "empty file"
    if kind == "text":
        path.write_text("hello, not a database\n" * 20)
        return "not a SQLite database"
    conn = sqlite3.connect(path)
    if kind == "unrelated-sqlite":
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
        words = "tables notes"
    elif kind == "foreign-images-table":
        conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, name TEXT, data BLOB)")
        conn.execute("INSERT INTO images (name) VALUES ('holiday.jpg')")
        words = "images table is not a gallery's"
    else:  # a SQLite file in WAL mode without tables
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA user_version = 7")
        words = "empty SQLite database"
    conn.commit()
    conn.close()
    return words


@pytest.mark.parametrize("kind", ["zero-bytes", "text", "unrelated-sqlite", "foreign-images-table", "empty-sqlite"])
def test_readers_refuse_what_is_not_a_gallery_in_one_line_and_leave_it_unchanged(tmp_path, kind):
    path = tmp_path / "other.db"
    words = _not_a_gallery(kind, path)
    digest = _digest(path)
    listing = sorted(os.listdir(tmp_path))
    commands = [("stats",), ("doctor",)]
    if kind in ("unrelated-sqlite", "foreign-images-table"):  # (a blank file may become a gallery: writers)
        commands += [("query", "--id", "1"), ("doctor", "--repair"), ("ingest", "--csv", ROOT / "demo_data" / "demo.csv")]
    for args in commands:
        p = _cli(*args, "--db", path)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and "Traceback" not in p.stderr, p.stderr
        assert str(path) in p.stderr and words in p.stderr, (args, p.stderr)
        assert _digest(path) == digest, args
        assert sorted(os.listdir(tmp_path)) == listing, args  # no -wal, -shm, journal or images folder either
    with pytest.raises(DatabaseError, match=words):
        store.connect(path, readonly=True)
    assert _digest(path) == digest


def _wal_gallery(path, n=5):
    """A gallery whose last n rows are only in its -wal (a writer holds it open, checkpoints off). Returns the
    writer connection."""
    conn = store.connect(path)
    store.ensure_model(conn, model(8))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    store.commit_batch(conn, [dict(status="failed", url=f"http://h/{i}", error="http-404: x") for i in range(n)])
    return conn


def test_read_only_open_reads_the_wal_and_writes_nothing(tmp_path):
    path = tmp_path / "g.db"
    writer = _wal_gallery(path)
    try:
        main, wal = _digest(path), _digest(str(path) + "-wal")
        conn = store.connect(path, readonly=True)
        assert store.stats(conn)["counts"]["failed"] == 5  # rows only in the -wal are seen
        with pytest.raises(store.SQLITE_ERRORS):
            conn.execute("DELETE FROM images")
        conn.close()
        assert (_digest(path), _digest(str(path) + "-wal")) == (main, wal)
        # the same files where the -shm cannot be created (a directory in its place): still readable, unchanged
        other = tmp_path / "copy"
        other.mkdir()
        shutil.copy(path, other / "g.db")
        shutil.copy(str(path) + "-wal", other / "g.db-wal")
        (other / "g.db-shm").mkdir()
        conn = store.connect(other / "g.db", readonly=True)
        assert store.stats(conn)["counts"]["failed"] == 5
        conn.close()
        assert (_digest(other / "g.db"), _digest(other / "g.db-wal")) == (main, wal)
        p = _cli("stats", "--json", "--db", other / "g.db")
        assert p.returncode == 0, p.stderr
        assert __import__("json").loads(p.stdout)["counts"]["failed"] == 5
    finally:
        writer.close()
    # a gallery closed cleanly (no -wal): the CLI's stats reads it; the database file is unchanged
    digest = _digest(path)
    p = _cli("stats", "--db", path)
    assert p.returncode == 0 and "5 failed" in p.stdout, p.stdout + p.stderr
    assert _digest(path) == digest


def test_older_schema_is_read_as_it_is_or_refused_naming_the_upgrade(tmp_path, monkeypatch):
    # a gallery of the 0001 schema only (no runs table): stats needs runs -> one line naming the upgrade command
    path = tmp_path / "old.db"
    conn = store.connect(path, apply_migrations=False)
    store.migrate(conn, upto=1)
    store.ensure_model(conn, model(8))
    store.record_failed(conn, dict(url="http://h/x", error="http-404: x"))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    digest = _digest(path)
    p = _cli("stats", "--db", path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "older" in p.stderr and f"python cli.py doctor --db {path} --repair" in p.stderr, p.stderr
    assert _digest(path) == digest
    # following the advice upgrades it; then stats works
    p = _cli("doctor", "--db", path, "--repair")
    assert "applied migrations" in p.stdout, p.stdout + p.stderr
    p = _cli("stats", "--db", path)
    assert p.returncode == 0 and "1 failed" in p.stdout, p.stderr
    # a gallery missing a migration this code adds later (here: one more file) is read as it is, not migrated
    extra = tmp_path / "migrations"
    shutil.copytree(store.MIGRATIONS_DIR, extra)
    (extra / "0099_later.sql").write_text("CREATE TABLE later (x);\n")
    monkeypatch.setattr(store, "MIGRATIONS_DIR", extra)
    digest = _digest(path)
    conn = store.connect(path, readonly=True)
    assert conn.pending_migrations == ["0099_later"]
    assert store.stats(conn)["counts"]["failed"] == 1
    conn.close()
    assert _digest(path) == digest and "later" not in tables(store.connect(path, apply_migrations=False))
