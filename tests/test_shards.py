"""Parquet shards and their merge into a gallery (retrieval/shards.py, migration 0007, ``cli.py merge``).

Real SQLite files with sqlite-vec, real Parquet files written by pyarrow. No Ray here: tests/test_ray.py
makes shards with a real local Ray instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from retrieval import shards as S  # noqa: E402
from retrieval import store  # noqa: E402
from retrieval.errors import InputError, ModelMismatchError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIM = 8
RECORD = {"variant": "small", "weights_sha256": "a" * 64, "preprocess": "resize-short", "interpolation": "hf",
          "pooling": "cls", "dim": DIM}


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def shard(directory: Path, name: str, rows: list[dict], record: dict = RECORD) -> Path:
    """A shard of ``rows``: dicts with url, status and any other column; ok rows carry ``vector``."""
    cols = {c: [] for c in S.COLUMNS if c != "vector"}
    vecs = np.zeros((len(rows), record["dim"]), np.float32)
    for i, r in enumerate(rows):
        for c in cols:
            if c == "seq":
                cols[c].append(r.get("seq", i))
            elif c == "url_hash":
                cols[c].append(store.url_hash(r["url"]))
            else:
                cols[c].append(r.get(c))
        if r.get("vector") is not None:
            vecs[i] = r["vector"]
    table = S.make_table(cols, vecs, S.new_info(record, "test"))
    return S.write_shard(directory, name, table)


def ok(i: int, content: str | None = None, **kw) -> dict:
    return {"url": f"http://127.0.0.1/{i}.jpg", "status": "ok", "content_sha256": content or f"{i:064x}",
            "vector": unit(i), "width": 10 + i, "height": 20, "format": "JPEG", "bytes": 100 + i, "http_status": 200,
            "meta": json.dumps({"title": f"row {i}"}), **kw}


def failed(i: int, error: str = "http-404: Not Found", status: int | None = 404) -> dict:
    return {"url": f"http://127.0.0.1/f{i}.jpg", "status": "failed", "error": error, "http_status": status}


def dump(conn) -> dict:
    """Everything a merge could change: every images row (all columns), every vector, the shards merged."""
    images = [tuple(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]
    vectors = [(r[0], bytes(r[1])) for r in conn.execute("SELECT image_id, embedding FROM image_embeddings "
                                                         "ORDER BY image_id")] \
        if store._table_exists(conn, "image_embeddings") else []
    merged = [tuple(r) for r in conn.execute("SELECT * FROM merged_shards ORDER BY shard_id")]
    return {"images": images, "vectors": vectors, "merged": merged}


def by_url(conn) -> dict:
    return {r["url"]: dict(r) for r in conn.execute("SELECT * FROM images")}


# ---------------------------------------------------------------- migration 0007


def test_migration_on_a_blank_database(tmp_path):
    conn = store.connect(tmp_path / "g.db")
    assert "0007_shards" in store.applied_migrations(conn)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(merged_shards)")]
    assert cols == ["shard_id", "name", "rows", "merged_at"]


def test_migration_on_a_gallery_made_by_the_previous_schema(tmp_path):
    path = tmp_path / "old.db"
    conn = store.connect(path, apply_migrations=False)
    store.migrate(conn, upto=2)  # 0001 + 0002: today's schema before this slice
    assert "merged_shards" not in [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    store.ensure_model(conn, RECORD)
    store.commit_batch(conn, [{**{k: v for k, v in ok(1).items() if k != "status"}, "status": "ok"},
                              {**failed(1), "status": "failed"}])
    before = [tuple(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]
    conn.close()
    conn = store.connect(path)  # applies 0007
    assert "0007_shards" in store.applied_migrations(conn)
    assert [tuple(r) for r in conn.execute("SELECT * FROM images ORDER BY id")] == before
    # and a merge works on it
    m = S.merge(conn, [shard(tmp_path / "s", "a", [ok(2)])])
    assert (m.new, m.shards) == (1, 1)
    assert store.check(conn) == []


# ---------------------------------------------------------------- merge


@pytest.fixture
def gallery(tmp_path):
    """A gallery with one ok image (content 1), one permanent failure, one transient failure."""
    conn = store.connect(tmp_path / "gallery.db")
    store.ensure_model(conn, RECORD)
    store.commit_batch(conn, [
        {**ok(1), "status": "ok"},
        {**failed(1), "status": "failed"},
        {**failed(2, "deadline: took too long", None), "status": "failed"},
    ])
    yield conn
    conn.close()


def test_merge_applies_the_ingest_rules(gallery, tmp_path):
    rows = [
        ok(1),  # the gallery has this URL as ok: skipped, nothing changes
        ok(2),  # new
        ok(3, content=f"{1:064x}"),  # bytes the gallery holds (image 1) at a new URL: duplicate of it, no vector
        ok(4),
        {**ok(5, content=f"{4:064x}"), "status": "duplicate", "vector": None},  # a duplicate inside the shard
        ok(6, content=f"{2:064x}"),  # the same bytes as row 2 of this shard: a duplicate of it
        failed(3, "not-an-image: cannot identify image file", 200),
        {**ok(7), "url": "http://127.0.0.1/f2.jpg"},  # a transient failure in the gallery, now ok
        ok(2),  # the same URL twice: the first wins
    ]
    d = tmp_path / "shards"
    path = shard(d, "s-000001", rows)
    before = by_url(gallery)
    m = S.merge(gallery, d)
    assert (m.shards, m.already, m.rows) == (1, 0, len(rows))
    assert (m.new, m.duplicate, m.failed, m.skipped) == (3, 3, 1, 2)
    assert m.reasons == {"not-an-image": 1}
    after = by_url(gallery)
    u = "http://127.0.0.1/{}.jpg".format
    assert after[u(1)] == before[u(1)]
    assert after[u(2)]["status"] == "ok" and after[u(4)]["status"] == "ok"
    assert after[u(3)]["status"] == "duplicate" and after[u(3)]["duplicate_of"] == after[u(1)]["id"]
    assert after[u(5)]["duplicate_of"] == after[u(4)]["id"] and after[u(6)]["duplicate_of"] == after[u(2)]["id"]
    f3 = after[u("f3")]
    assert (f3["status"], f3["error"], f3["http_status"], f3["attempts"]) == \
        ("failed", "not-an-image: cannot identify image file", 200, 1)
    f2 = after[u("f2")]
    assert (f2["status"], f2["error"], f2["attempts"]) == ("ok", None, 2)  # the store's own upsert rules
    assert after[u(2)]["meta"] == json.dumps({"title": "row 2"})
    assert (after[u(2)]["width"], after[u(2)]["bytes"], after[u(2)]["http_status"]) == (12, 102, 200)
    for url, seed in ((u(2), 2), (u(4), 4), (u("f2"), 7)):
        assert np.array_equal(store.get_vector(gallery, after[url]["id"]), unit(seed))
    assert store.get_vector(gallery, after[u(3)]["id"]) is None
    assert store.check(gallery) == []
    # the same shard again, by directory or by file: nothing changes
    state = dump(gallery)
    again = S.merge(gallery, d)
    assert (again.shards, again.already, again.rows, again.new) == (0, 1, 0, 0)
    S.merge(gallery, [path, path])
    assert dump(gallery) == state


def test_merge_twice_changes_nothing_even_for_transient_failures(gallery, tmp_path):
    d = tmp_path / "shards"
    shard(d, "a", [failed(9, "http-503: Service Unavailable", 503), ok(10)])
    shard(d, "b", [failed(2, "deadline: took too long", None), ok(11)])  # f2: attempts 1 -> 2, once only
    S.merge(gallery, d)
    state = dump(gallery)
    assert by_url(gallery)["http://127.0.0.1/f2.jpg"]["attempts"] == 2
    m = S.merge(gallery, d)
    assert (m.already, m.shards) == (2, 0)
    assert dump(gallery) == state


def test_merge_into_a_fresh_gallery_records_the_model(tmp_path):
    conn = store.connect(tmp_path / "fresh.db")
    S.merge(conn, [shard(tmp_path / "s", "a", [ok(1), ok(2)])])
    assert {k: store.get_model(conn)[k] for k in RECORD} == RECORD
    assert store.stats(conn)["vectors"] == 2


def test_a_shard_of_another_model_is_refused_before_anything_is_written(gallery, tmp_path):
    good = shard(tmp_path / "s", "a", [ok(20)])
    other = shard(tmp_path / "s", "b", [ok(21)], record={**RECORD, "weights_sha256": "b" * 64})
    state = dump(gallery)
    with pytest.raises(ModelMismatchError, match="weights sha256"):
        S.merge(gallery, [other, good])
    assert dump(gallery) == state


def test_bad_shards_are_refused_naming_the_file(gallery, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    state = dump(gallery)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"url": ["x"]}), plain)
    with pytest.raises(InputError, match="plain.parquet: a Parquet file without shard metadata"):
        S.merge(gallery, [plain])
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="junk.parquet: not a Parquet shard"):
        S.merge(gallery, [junk])
    bad = shard(tmp_path / "s", "bad", [ok(30), {**ok(31), "vector": unit(31) * 3}])
    with pytest.raises(InputError, match="bad.parquet: a vector that is not L2-normalised"):
        S.merge(gallery, [bad])
    # an ok row whose vector has a null element (Parquet can hold one): refused, not stored as zeros
    good = S.read_shard(shard(tmp_path / "s", "holes", [ok(32), ok(33)]))[1]
    values = [None if k == 5 else float(x) for k, x in enumerate(unit(33))]
    column = pa.array([list(map(float, unit(32))), values], type=good.schema.field("vector").type)
    holes = tmp_path / "s" / "holes.parquet"
    pq.write_table(good.set_column(good.schema.get_field_index("vector"), good.schema.field("vector"), column), holes)
    with pytest.raises(InputError, match="holes.parquet: a vector with non-finite values"):
        S.merge(gallery, [holes])
    with pytest.raises(InputError, match="no such shard directory"):
        S.merge(gallery, tmp_path / "nowhere")
    assert dump(gallery) == state


def _bulk_rows(start: int) -> list[dict]:
    return [ok(start), ok(start + 1), ok(start + 2, content=f"{start:064x}"), failed(start)]


def test_bulk_merge_writes_what_a_wal_merge_writes_and_leaves_the_gallery_in_wal(tmp_path):
    d = tmp_path / "shards"
    for k in range(3):
        shard(d, f"s{k}", _bulk_rows(10 * k + 10))
    results = {}
    for bulk in (False, True):
        conn = store.connect(tmp_path / f"g-{bulk}.db")
        modes = []
        m = S.merge(conn, d, transaction_rows=4, bulk=bulk,  # several transactions
                    progress=lambda _: modes.append(conn.execute("PRAGMA journal_mode").fetchone()[0]))
        assert modes == ["delete" if bulk else "wal"] * 3
        assert (m.shards, m.new, m.duplicate, m.failed) == (3, 6, 3, 3)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again
        assert store.check(conn) == []
        results[bulk] = {k: v for k, v in dump(conn).items() if k != "merged"}
        results[bulk]["images"] = [r[:-2] for r in results[bulk]["images"]]  # created_at, updated_at
        conn.close()
        assert not Path(f"{tmp_path}/g-{bulk}.db-journal").exists()
    assert results[True] == results[False]


def test_bulk_merge_keeps_the_wal_while_another_connection_reads(gallery, tmp_path):
    reader = store.connect(gallery.path, readonly=True)
    try:
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 3
        assert S._bulk_journal(gallery) is None  # SQLite refuses to leave WAL mode while the reader is open
        m = S.merge(gallery, [shard(tmp_path / "s", "a", _bulk_rows(40))], bulk=True)
        assert m.new == 2
        assert gallery.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 7  # read through the WAL
    finally:
        reader.close()


def test_a_refused_bulk_merge_changes_nothing(gallery, tmp_path):
    d = tmp_path / "s"
    shard(d, "a", _bulk_rows(50))
    bad = shard(d, "b", [ok(60), {**ok(61), "vector": unit(61) * 3}])
    state = dump(gallery)
    with pytest.raises(InputError, match=f"{bad.name}: a vector that is not L2-normalised"):
        S.merge(gallery, d, bulk=True)  # a and b in one transaction: neither is merged
    assert dump(gallery) == state
    assert gallery.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_shards_are_written_atomically_and_hidden_files_are_ignored(tmp_path):
    d = tmp_path / "s"
    shard(d, "b", [ok(1)])
    shard(d, "a", [ok(2)])
    (d / ".c.123.tmp").write_bytes(b"half a shard")
    assert [p.name for p in S.shard_files(d)] == ["a.parquet", "b.parquet"]
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp") and p.name != ".c.123.tmp"]
    info, table = S.read_shard(d / "a.parquet")
    assert info["model"] == RECORD and len(info["shard_id"]) == 32
    assert table.schema.field("vector").type.list_size == DIM


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env["DINOV2_ALLOW_PRIVATE"] = "1"
    return env


def test_cli_merge_twice(tmp_path):
    d = tmp_path / "shards"
    shard(d, "a", [ok(1), failed(1), ok(2, content=f"{1:064x}")])
    shard(d, "b", [ok(3), failed(2, "deadline: took too long", None)])
    db = tmp_path / "g.db"

    def run(*args):
        p = subprocess.run([sys.executable, "cli.py", "merge", *map(str, args)], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p

    first = json.loads(run(d, "--db", db, "--json").stdout)
    assert {k: first[k] for k in ("shards", "already_merged", "rows", "new", "duplicate", "failed")} == \
        {"shards": 2, "already_merged": 0, "rows": 5, "new": 2, "duplicate": 1, "failed": 2}
    conn = store.connect(db)
    state = dump(conn)
    conn.close()
    line = run(d, "--db", db).stdout
    assert line.startswith("merged 0 shards (2 already merged): 0 rows, 0 new"), line
    conn = store.connect(db)
    assert dump(conn) == state
    runs = [dict(r) for r in conn.execute("SELECT source, status, new FROM runs ORDER BY id")]
    assert runs == [{"source": str(d), "status": "completed", "new": 2},
                    {"source": str(d), "status": "completed", "new": 0}]


CRASH_IN_A_BULK_WRITE = """
import os, signal, sys
from retrieval import store
conn = store.connect(sys.argv[1])
assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"  # as a bulk merge runs
conn.execute("PRAGMA cache_size = 10")  # modified pages spill into the database file before the commit
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE images SET meta = hex(randomblob(1500))")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_bulk_write_killed_mid_transaction_is_named_then_rolled_back(tmp_path):
    d = tmp_path / "shards"
    shard(d, "a", [ok(i) for i in range(1, 400)])
    db = tmp_path / "g.db"
    conn = store.connect(db)
    S.merge(conn, d, bulk=True)
    state = dump(conn)
    conn.close()
    killed = subprocess.run([sys.executable, "-c", CRASH_IN_A_BULK_WRITE, str(db)], cwd=ROOT, timeout=60)
    assert killed.returncode == -9
    assert Path(f"{db}-journal").stat().st_size > 0

    def cli(*args):
        return subprocess.run([sys.executable, "cli.py", *args, "--db", str(db)], cwd=ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=120)

    stats = cli("stats")  # a reader cannot roll the journal back: one line naming it and the fix
    assert stats.returncode != 0
    assert stats.stderr.strip().splitlines() == [
        f"Error: {db}: an interrupted write left g.db-journal, which only a writer can roll back: run "
        f"python cli.py doctor --db {db} --repair (or re-run the interrupted command)"], stats.stderr
    assert cli("doctor", "--repair").returncode == 0
    assert cli("stats").returncode == 0
    conn = store.connect(db)
    assert dump(conn) == state
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cli_merge_names_a_missing_folder_and_creates_nothing(tmp_path):
    p = subprocess.run([sys.executable, "cli.py", "merge", str(tmp_path / "nope"), "--db", str(tmp_path / "g.db")],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nope'}: no such shard directory or file"]
    assert not (tmp_path / "g.db").exists()


def test_without_pyarrow_merge_says_how_to_install_it(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    code = ("import sys; sys.modules['pyarrow'] = None; import cli; "
            f"sys.argv = ['cli.py', 'merge', {str(d)!r}, '--db', {str(tmp_path / 'g.db')!r}]; cli.main()")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["Error: shards need pyarrow, which is not installed: pip install -e '.[ray]'"]
    assert not (tmp_path / "g.db").exists()
