"""``cli.py doctor``: real SQLite galleries built with retrieval.store, broken by raw SQL, checked and repaired
through the command line (subprocesses), plus a few in-process checks of retrieval.doctor."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import doctor as D
from retrieval import ingest as I
from retrieval import store

ROOT = Path(__file__).resolve().parent.parent
DIM = 16
MODEL = dict(variant="small", weights_sha256="ab" * 32, preprocess="resize-short", interpolation="hf",
             pooling="cls", dim=DIM)
N_OK = 8
HOST = "http://127.0.0.1:9"  # never contacted


# ---------------------------------------------------------------- helpers


@pytest.fixture
def weights_env() -> dict:
    """The environment for CLI subprocesses that must not download anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env.update(DINOV2_OFFLINE="1", DINOV2_ALLOW_PRIVATE="1")
    return env


def unit(rng) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def sha(i) -> str:
    return hashlib.sha256(f"content {i}".encode()).hexdigest()


def build_gallery(folder: Path) -> Path:
    """A healthy gallery: ids 1..8 ok (stored originals on disk), 9 and 10 duplicates of 1 and 2, 11 failed,
    one completed run."""
    db = folder / "gallery.db"
    conn = store.connect(db)
    store.ensure_model(conn, MODEL)
    rng = np.random.default_rng(0)
    outcomes = []
    for i in range(N_OK):
        f = folder / "gallery_images" / sha(i)[:2] / f"{sha(i)}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"original %d" % i)
        outcomes.append(dict(status="ok", url=f"{HOST}/{i}.jpg", content_sha256=sha(i),
                             path=str(f.relative_to(folder)), vector=unit(rng)))
    for i in range(2):
        outcomes.append(dict(status="duplicate", url=f"{HOST}/copy{i}.jpg", content_sha256=sha(i),
                             path=outcomes[i]["path"]))
    outcomes.append(dict(status="failed", url=f"{HOST}/gone.jpg", error="http-404: Not Found", http_status=404))
    run_id = store.start_run(conn, "test.csv")
    results = store.commit_batch(conn, outcomes)
    store.finish_run(conn, run_id, {"new": N_OK, "duplicate": 2, "failed": 1})
    conn.close()
    assert [r[0] for r in results] == list(range(1, 12))
    assert [r[1] for r in results] == ["ok"] * N_OK + ["duplicate"] * 2 + ["failed"]
    return db


def raw(db: Path):
    """A connection for breaking things: autocommit, foreign keys off."""
    conn = store.connect(db, apply_migrations=False)
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def ok_vectors(db: Path) -> dict:
    """{id: vector bytes} of the ok rows that have a vector."""
    conn = store.connect(db, apply_migrations=False)
    try:
        return {r[0]: bytes(r[1]) for r in conn.execute(
            "SELECT i.id, e.embedding FROM images AS i JOIN image_embeddings AS e ON e.image_id = i.id "
            "WHERE i.status = 'ok'")}
    finally:
        conn.close()


def row(db: Path, image_id: int) -> dict:
    conn = store.connect(db, apply_migrations=False)
    try:
        return store.get_image(conn, image_id)
    finally:
        conn.close()


def vector(db: Path, image_id: int):
    conn = store.connect(db, apply_migrations=False)
    try:
        return store.get_vector(conn, image_id)
    finally:
        conn.close()


def doctor(db: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "doctor", "--db", str(db), *args],
                          cwd=db.parent, capture_output=True, text=True, timeout=60)


def line_of(out: str, name: str) -> str:
    """The check's line in the text output."""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == name:
            return line
    raise AssertionError(f"no line for {name} in:\n{out}")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def refetched_by_plain_ingest(db: Path, image_id: int) -> bool:
    """Whether the next `ingest` without --retry-failed would fetch this row again."""
    conn = store.connect(db)
    try:
        r = store.get_image(conn, image_id)
        known = store.known(conn, [r["url_hash"]])[r["url_hash"]]
        return not I._skip(known, I.IngestOptions())
    finally:
        conn.close()


# ---------------------------------------------------------------- breakages repaired by --repair
# each: break the gallery at db; return (ids whose vector may legitimately change, check after repair)


def break_vector_missing(db):
    raw(db).execute("DELETE FROM image_embeddings WHERE image_id = 3")

    def after():
        r = row(db, 3)
        assert r["status"] == "failed" and r["error"].startswith("incomplete: doctor --repair")
        assert I.is_transient(r["error"]) and r["attempts"] == 0
        assert refetched_by_plain_ingest(db, 3)
    return {3}, after


def break_vector_orphan(db):
    conn = raw(db)
    v = unit(np.random.default_rng(5)).tobytes()
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (999, ?)", (v,))
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (11, ?)", (v,))  # a failed row
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (9, ?)", (v,))  # a duplicate

    def after():
        assert vector(db, 999) is None and vector(db, 11) is None and vector(db, 9) is None
        assert row(db, 11)["status"] == "failed" and row(db, 9)["status"] == "duplicate"
    return set(), after


def break_vector_norms(db):
    conn = raw(db)
    original = store.get_vector(conn, 4)
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 4")
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (4, ?)", ((3 * original).tobytes(),))

    def after():
        assert row(db, 4)["status"] == "ok"
        np.testing.assert_allclose(vector(db, 4), original, atol=1e-6)
    return {4}, after


def break_vector_zero(db):
    conn = raw(db)
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 5")
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (5, ?)", (np.zeros(DIM, "<f4").tobytes(),))
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 6")
    nan = np.full(DIM, np.nan, "<f4").tobytes()
    conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (6, ?)", (nan,))

    def after():
        for i in (5, 6):
            assert vector(db, i) is None
            assert row(db, i)["status"] == "failed" and refetched_by_plain_ingest(db, i)
    return {5, 6}, after


def break_duplicates(db):
    conn = raw(db)
    conn.execute("UPDATE images SET duplicate_of = 999 WHERE id = 9")  # its content is held by ok row 1
    conn.execute("UPDATE images SET duplicate_of = 11, content_sha256 = ? WHERE id = 10", ("f" * 64,))  # a failed row

    def after():
        assert row(db, 9)["status"] == "duplicate" and row(db, 9)["duplicate_of"] == 1
        r = row(db, 10)
        assert r["status"] == "failed" and r["duplicate_of"] is None and refetched_by_plain_ingest(db, 10)
    return set(), after


def break_runs(db):
    conn = raw(db)
    pid = dead_pid()
    conn.execute("INSERT INTO runs (source, pid, host, status) VALUES ('x.csv', ?, ?, 'running')",
                 (pid, socket.gethostname()))
    conn.execute("INSERT INTO runs (source, pid, host, status) VALUES ('live.csv', ?, ?, 'running')",
                 (os.getpid(), socket.gethostname()))  # this test process: alive, in progress, not a problem

    def after():
        conn = store.connect(db)
        statuses = {r[0]: r[1] for r in conn.execute("SELECT source, status FROM runs")}
        conn.close()
        assert statuses == {"test.csv": "completed", "x.csv": "interrupted", "live.csv": "running"}
    return set(), after


def break_migrations(db):
    conn = raw(db)
    conn.execute("DROP TABLE runs")
    conn.execute("DELETE FROM migrations WHERE name = '0002_runs'")

    def after():
        conn = store.connect(db, apply_migrations=False)
        assert store.applied_migrations(conn) == [n for n, _ in store.available_migrations()]
        conn.close()
    return set(), after


def break_vectors_table(db):
    raw(db).execute("DROP TABLE image_embeddings")

    def after():
        for i in range(1, N_OK + 1):
            assert row(db, i)["status"] == "failed" and refetched_by_plain_ingest(db, i)
        assert row(db, 9)["status"] == "failed"  # its original (1) is no longer ok
    return set(range(1, N_OK + 1)), after


REPAIRABLE = {
    "vectors_missing": break_vector_missing,
    "vectors_orphan": break_vector_orphan,
    "vector_norms": break_vector_norms,
    "vector_norms ": break_vector_zero,  # same check, zero and NaN vectors
    "duplicates": break_duplicates,
    "runs": break_runs,
    "migrations": break_migrations,
    "model": break_vectors_table,
}


@pytest.mark.parametrize("case", list(REPAIRABLE))
def test_problem_found_then_repaired(tmp_path, case):
    db = build_gallery(tmp_path)
    before = ok_vectors(db)
    touched, after = REPAIRABLE[case](db)
    check = case.strip()

    p = doctor(db)
    assert p.returncode == 1, p.stdout + p.stderr
    assert line_of(p.stdout, check).startswith("problem")
    assert "repair: --repair" in p.stdout

    p = doctor(db, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    assert line_of(p.stdout, check).startswith("fixed")
    assert p.stdout.rstrip().splitlines()[-1].startswith("healthy")

    p = doctor(db)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not any(line.startswith("problem") for line in p.stdout.splitlines())

    now = ok_vectors(db)
    for image_id, blob in before.items():  # no ok row with a (usable) vector was lost or changed
        if image_id not in touched:
            assert now.get(image_id) == blob, image_id
    after()


def test_everything_broken_at_once(tmp_path):
    db = build_gallery(tmp_path)
    before = ok_vectors(db)
    touched = set()
    checks = []
    for case, fn in REPAIRABLE.items():
        if case in ("model", "migrations"):
            continue
        ids, _ = fn(db)
        touched |= ids
        checks.append(case.strip())
    raw(db).execute("DELETE FROM image_embeddings WHERE image_id = 2")  # row 2 has a duplicate (10: broken above)
    touched.add(2)

    p = doctor(db, "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert not report["healthy"]
    by_name = {c["name"]: c for c in report["checks"]}
    for name in checks:
        assert by_name[name]["status"] == "problem" and by_name[name]["count"] > 0 and by_name[name]["repair"]
    assert by_name["vectors_missing"]["examples"] == [2, 3]
    assert by_name["vectors_orphan"]["count"] == 3

    p = doctor(db, "--repair", "--json")
    assert p.returncode == 0, p.stdout
    report = json.loads(p.stdout)
    assert report["healthy"] and report["problems"] == 0
    assert {c["name"] for c in report["checks"] if c["status"] == "fixed"} == set(checks)
    assert any(a.startswith("checkpointed the WAL") for a in report["actions"])
    assert doctor(db).returncode == 0
    now = ok_vectors(db)
    assert all(now.get(i) == b for i, b in before.items() if i not in touched)
    assert set(now) == set(range(1, N_OK + 1)) - {2, 3, 5, 6}  # 4 renormalised, kept


def test_healthy_gallery(tmp_path):
    db = build_gallery(tmp_path)
    p = doctor(db)
    assert p.returncode == 0, p.stdout + p.stderr
    names = [line.split()[1] for line in p.stdout.splitlines()[1:-1]]
    assert names == ["versions", "quick_check", "integrity_check", "migrations", "model", "vectors_missing",
                     "vectors_orphan", "vector_norms", "search_index", "duplicates", "runs", "originals",
                     "orphan_files", "wal"]
    assert all(line.startswith("ok") for line in p.stdout.splitlines()[1:-1])
    assert p.stdout.rstrip().endswith("healthy")
    assert "sqlite-vec v0.1.9" in line_of(p.stdout, "versions")
    assert "present (10 rows)" in line_of(p.stdout, "originals")  # 8 ok + 2 duplicates sharing their files
    assert p.stderr == ""

    report = json.loads(doctor(db, "--json").stdout)
    assert report["healthy"] is True and report["problems"] == 0
    assert report["versions"]["sqlite_vec"] == "v0.1.9" and report["versions"]["sqlite"].startswith("3.")
    assert {c["status"] for c in report["checks"]} == {"ok"}

    before = ok_vectors(db)
    p = doctor(db, "--repair")  # nothing to fix: still exit 0, only the checkpoint
    assert p.returncode == 0 and "checkpointed the WAL" in p.stdout
    assert ok_vectors(db) == before


def test_orphan_files_are_reported_and_deleted_by_repair(tmp_path):
    """Originals stored by a run killed before it committed their rows: found, and deleted by --repair (the
    files rows refer to stay)."""
    db = build_gallery(tmp_path)
    folder = tmp_path / "gallery_images"
    orphans = [folder / "ee" / ("ee" * 32 + ".jpg"), folder / "ab" / ".partial.123.tmp"]
    for f in orphans:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"never committed")
    kept = sorted(p for p in folder.rglob("*") if p.is_file() and p not in orphans)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    p = doctor(db)
    assert p.returncode == 1
    line = line_of(p.stdout, "orphan_files")
    assert line.startswith("problem") and "2 files" in line, line
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # doctor without --repair wrote nothing
    p = doctor(db, "--repair")
    assert p.returncode == 0, p.stdout
    assert "deleted 2 orphan files" in p.stdout
    assert not any(f.exists() for f in orphans)
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == kept and len(kept) == N_OK


def test_empty_gallery_is_healthy(tmp_path):
    db = tmp_path / "empty.db"
    store.connect(db).close()
    p = doctor(db)
    assert p.returncode == 0, p.stdout
    assert "none recorded yet" in line_of(p.stdout, "model")


# ---------------------------------------------------------------- problems with a manual repair


def test_missing_originals_are_manual(tmp_path):
    db = build_gallery(tmp_path)
    conn = raw(db)
    stored = tmp_path / row(db, 2)["path"]
    stored.unlink()  # rows 2 and 10 (its duplicate) point at it
    local = tmp_path / "local.jpg"
    local.write_bytes(b"x")
    conn.execute("UPDATE images SET url = ?, path = ? WHERE id = 7", (str(local), str(local)))
    local.unlink()
    before = ok_vectors(db)

    p = doctor(db)
    assert p.returncode == 1
    line = line_of(p.stdout, "originals")
    assert line.startswith("problem") and "2 stored originals missing (ids 2, 10)" in line
    assert "1 local source file gone (ids 7)" in line
    assert "restore" in p.stdout

    p = doctor(db, "--repair")
    assert p.returncode == 1  # not something --repair can do
    assert line_of(p.stdout, "originals").startswith("problem")
    assert ok_vectors(db) == before and row(db, 2)["status"] == "ok"


def test_model_dim_mismatch_is_manual(tmp_path):
    db = build_gallery(tmp_path)
    raw(db).execute("UPDATE model SET dim = 32")
    p = doctor(db)
    assert p.returncode == 1
    assert "float[16]" in line_of(p.stdout, "model") and "rebuild" in p.stdout
    before = ok_vectors(db)
    assert doctor(db, "--repair").returncode == 1
    assert ok_vectors(db) == before


def test_vectors_without_model_record_is_manual(tmp_path):
    db = build_gallery(tmp_path)
    raw(db).execute("DELETE FROM model")
    p = doctor(db)
    assert p.returncode == 1
    assert "no model record" in line_of(p.stdout, "model")
    assert doctor(db, "--repair").returncode == 1


def test_newer_database_is_not_repaired(tmp_path):
    db = build_gallery(tmp_path)
    conn = raw(db)
    conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_future', 'now')")
    conn.execute("DELETE FROM image_embeddings WHERE image_id = 3")
    p = doctor(db, "--repair")
    assert p.returncode == 1
    assert "9999_future" in line_of(p.stdout, "migrations") and "upgrade" in p.stdout
    assert "nothing repaired" in p.stdout
    assert row(db, 3)["status"] == "ok"  # left alone


def corrupt(db: Path) -> None:
    """Overwrite the cell pointers and content of the images table's root page (a b-tree page, not page 1)."""
    conn = store.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'images'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    assert root > 1
    with open(db, "r+b") as f:
        f.seek((root - 1) * page + 12)
        f.write(b"\xff" * (page - 12))


def test_corrupt_database_is_reported_not_repaired(tmp_path):
    db = build_gallery(tmp_path)
    conn = raw(db)  # enough rows that images spans several pages
    store.commit_batch(conn, [dict(status="failed", url=f"{HOST}/more{i}.jpg", error="http-404: x" + "y" * 300)
                              for i in range(200)])
    conn.close()
    corrupt(db)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()

    p = doctor(db)
    assert p.returncode == 1, p.stdout + p.stderr
    assert line_of(p.stdout, "quick_check").startswith("problem")
    assert f"python cli.py doctor --db {db} --recover {tmp_path / 'gallery-recovered.db'}" in p.stdout

    p = doctor(db, "--repair", "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["actions"] == ["nothing repaired: the database is corrupt (see quick_check, integrity_check)"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


# ---------------------------------------------------------------- damage, then doctor's recovery route


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """SQLite's big-endian varint at buf[i:]: (value, next index)."""
    v = 0
    for k in range(9):
        b = buf[i + k]
        if k == 8:
            return (v << 8) | b, i + 9
        v = (v << 7) | (b & 0x7F)
        if b < 0x80:
            return v, i + k + 1
    raise AssertionError("unreachable")


def table_leaves(db: Path, table: str) -> list[tuple[int, list[int]]]:
    """[(page number, [rowids on it])] of the table's b-tree leaf pages, in key order, read from the file."""
    conn = store.connect(db, apply_migrations=False)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = db.read_bytes()
    leaves = []

    def walk(page):
        buf = data[(page - 1) * size: page * size]
        h = 100 if page == 1 else 0
        kind, n = buf[h], int.from_bytes(buf[h + 3:h + 5], "big")
        if kind == 0x05:  # interior table page: left children, then the right-most pointer
            ptrs = [int.from_bytes(buf[h + 12 + 2 * k: h + 14 + 2 * k], "big") for k in range(n)]
            for p in ptrs:
                walk(int.from_bytes(buf[p:p + 4], "big"))
            walk(int.from_bytes(buf[h + 8:h + 12], "big"))
        elif kind == 0x0D:
            ptrs = [int.from_bytes(buf[h + 8 + 2 * k: h + 10 + 2 * k], "big") for k in range(n)]
            rowids = []
            for p in ptrs:
                _, j = _varint(buf, p)
                rowids.append(_varint(buf, j)[0])
            leaves.append((page, rowids))
        else:
            raise AssertionError(f"page {page}: type {kind}")

    walk(root)
    return leaves


def overwrite_pages(db: Path, pages, seed=0) -> None:
    size = 4096
    rng = np.random.default_rng(seed)
    with open(db, "r+b") as f:
        for page in pages:
            junk = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            junk[0] = 0xFF  # never a valid page type
            f.seek((page - 1) * size)
            f.write(bytes(junk))


def big_gallery(folder: Path, n_ok=300) -> Path:
    """build_gallery plus n_ok more ok rows with vectors, their duplicates and failures: images spans ~40 pages."""
    db = build_gallery(folder)
    conn = store.connect(db)
    rng = np.random.default_rng(5)
    outcomes = []
    for i in range(100, 100 + n_ok):
        outcomes.append(dict(status="ok", url=f"{HOST}/big/{i}.jpg", content_sha256=sha(i), vector=unit(rng),
                             meta={"title": f"picture {i}"}))
        if i % 10 == 0:
            outcomes.append(dict(status="duplicate", url=f"{HOST}/mirror/{i}.jpg", content_sha256=sha(i)))
        if i % 7 == 0:
            outcomes.append(dict(status="failed", url=f"{HOST}/gone/{i}.jpg", error="http-404: Not Found",
                                 http_status=404))
    store.commit_batch(conn, outcomes)
    conn.close()
    return db


def all_rows(db: Path) -> dict:
    conn = store.connect(db, apply_migrations=False)
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()


def test_damaged_gallery_every_command_one_line_ingest_refuses_and_doctors_advice_recovers_it(tmp_path, weights_env):
    """Pages of garbage in the middle of a gallery: stats, query and ingest each give one line (ingest writes
    nothing); doctor's printed advice, followed word for word, gives a healthy gallery holding exactly the rows
    that were not on a damaged page, each with its vector, and search works on it."""
    import shlex

    db = big_gallery(tmp_path)
    before_rows, before_vecs = all_rows(db), ok_vectors(db)
    leaves = table_leaves(db, "images")
    assert len(leaves) >= 10, len(leaves)
    hit = [leaves[len(leaves) // 3], leaves[2 * len(leaves) // 3]]  # two leaf pages in the middle
    lost = {rid for _, rids in hit for rid in rids}
    index_pages = [p for p, _ in table_leaves_index(db, "images_status")][1:2]
    overwrite_pages(db, [p for p, _ in hit] + index_pages)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()

    env = weights_env
    kept_ok = sorted(i for i in before_vecs if i not in lost)
    for args in (["stats"], ["query", "--id", str(kept_ok[len(kept_ok) // 2])], ["query", "--id", str(min(lost))]):
        p = subprocess.run([sys.executable, "cli.py", *args, "--db", str(db)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        if p.returncode == 0:  # a query that never reads a damaged page is answered
            continue
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and "damaged" in p.stderr and "--recover" in p.stderr, p.stderr
    csv = tmp_path / "more.csv"
    csv.write_text("url\nhttp://127.0.0.1:9/new.jpg\n")
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "damaged" in p.stderr, p.stderr
    assert "nothing was written" in p.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest

    p = doctor(db)
    assert p.returncode == 1 and hashlib.sha256(db.read_bytes()).hexdigest() == digest
    advice = line_of(p.stdout, "quick_check")
    repair = next(ln for ln in p.stdout.splitlines() if "repair:" in ln and "--recover" in ln)
    command = repair[repair.index("python cli.py"):].split(" (")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "cli.py"], (advice, command)
    p = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # the damaged file was only read
    step = p.stdout.strip().splitlines()[-1]
    shell = step[step.index("rm -f "):]
    subprocess.run(["bash", "-c", shell], check=True, cwd=ROOT)

    assert doctor(db).returncode == 0
    after = all_rows(db)
    assert set(after) == set(before_rows) - lost
    vecs = ok_vectors(db)
    for i, r in after.items():
        was = before_rows[i]
        if was["status"] == "duplicate" and was["duplicate_of"] in lost:  # its ok row was lost
            assert r["status"] == "failed" and r["error"].startswith("incomplete:"), r
            continue
        assert r == was, (i, r, was)
        if r["status"] == "ok":
            assert vecs[i] == before_vecs[i]
    assert {i for i in before_vecs if i not in lost} == set(vecs)
    p = subprocess.run([sys.executable, "cli.py", "stats", "--json", "--db", str(db)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["vectors"] == len(vecs)
    conn = store.connect(db)
    try:
        some = sorted(vecs)[len(vecs) // 2]
        res = store.search(conn, np.frombuffer(vecs[some], "<f4"), 3)
        assert res[0]["id"] == some and res[0]["score"] > 0.9999
    finally:
        conn.close()


def table_leaves_index(db: Path, index: str) -> list[tuple[int, list]]:
    """[(page, [])] of an index b-tree's pages (interior 0x02 and leaf 0x0A), in walk order."""
    conn = store.connect(db, apply_migrations=False)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()[0]
    conn.close()
    data, size, pages = db.read_bytes(), 4096, []

    def walk(page):
        buf = data[(page - 1) * size: page * size]
        kind, n = buf[0], int.from_bytes(buf[3:5], "big")
        pages.append((page, []))
        if kind == 0x02:
            for k in range(n):
                p = int.from_bytes(buf[12 + 2 * k: 14 + 2 * k], "big")
                walk(int.from_bytes(buf[p:p + 4], "big"))
            walk(int.from_bytes(buf[8:12], "big"))

    walk(root)
    return pages


def test_recover_keeps_only_usable_vectors_and_marks_the_others_for_fetching_again(tmp_path):
    """Garbage inside one stored vector (the page structure intact: SQLite reads it without complaint): recovery
    copies every other vector bit for bit and marks that row to be fetched again by the next plain ingest."""
    from retrieval.recover import recover

    db = build_gallery(tmp_path)
    vecs = ok_vectors(db)
    conn = store.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = db.read_bytes()
    assert data.count(vecs[3]) == 1
    at = data.index(vecs[3])
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * len(vecs[3]))  # NaNs
    result = recover(db, tmp_path / "new.db")
    assert result.vectors_lost == [3] and result.vectors_copied == N_OK - 1
    new = tmp_path / "new.db"
    now = ok_vectors(new)
    assert now == {i: v for i, v in vecs.items() if i != 3}
    r3 = row(new, 3)
    assert r3["status"] == "failed" and r3["error"] == D.VECTOR_MISSING and refetched_by_plain_ingest(new, 3)
    assert all(row(new, i) == row(db, i) for i in range(4, 12))
    assert D.examine(new).healthy


def test_recover_refuses_an_existing_target_and_a_file_with_an_unreadable_schema(tmp_path):
    db = build_gallery(tmp_path)
    (tmp_path / "taken.db").write_bytes(b"keep me")
    p = doctor(db, "--recover", str(tmp_path / "taken.db"))
    assert p.returncode == 2 and "already exists" in p.stderr and (tmp_path / "taken.db").read_bytes() == b"keep me"
    conn = store.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(db, "r+b") as f:  # page 1 after the file header: the schema's root page
        f.seek(100)
        f.write(b"\xff" * 3900)
    p = doctor(db, "--recover", str(tmp_path / "new.db"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "schema" in p.stderr and "backup" in p.stderr
    assert not (tmp_path / "new.db").exists()


# ---------------------------------------------------------------- bad input: exit 2, one line


def test_missing_database(tmp_path):
    p = doctor(tmp_path / "nope.db")
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and "nope.db" in p.stderr
    assert not (tmp_path / "nope.db").exists()  # not created


def test_not_a_sqlite_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("hello, this is not SQLite\n" * 50)
    p = doctor(path)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and "not a SQLite database" in p.stderr


def test_unreadable_gallery_names_the_recovery(tmp_path):
    db = build_gallery(tmp_path)
    conn = store.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(db, "r+b") as f:  # page 1 after the file header: the schema's root page
        f.seek(100)
        f.write(b"\xff" * 3900)
    p = doctor(db)
    assert p.returncode in (1, 2), p.stdout + p.stderr
    if p.returncode == 2:  # cannot even be opened
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ")
    assert "schema" in p.stdout + p.stderr and "backup" in p.stdout + p.stderr


def test_foreign_sqlite_database_is_left_alone(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    p = doctor(path, "--repair")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "not a gallery database" in p.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


# ---------------------------------------------------------------- in process


def test_large_wal_is_checkpointed(tmp_path, monkeypatch):
    db = build_gallery(tmp_path)
    writer = store.connect(db)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    store.commit_batch(writer, [dict(status="failed", url=f"{HOST}/w{i}.jpg", error="http-404: x") for i in range(50)])
    wal = Path(str(db) + "-wal")
    assert wal.stat().st_size > 0
    monkeypatch.setattr(D, "WAL_LIMIT", 1000)
    report = D.examine(db)
    assert [c.name for c in report.problems] == ["wal"]
    report = D.examine(db, repair_it=True)
    assert report.healthy and {c.name: c.status for c in report.checks}["wal"] == "fixed"
    assert wal.stat().st_size == 0  # TRUNCATE, while the writer's connection is still open
    writer.close()


def test_repairs_are_one_transaction(tmp_path, monkeypatch):
    db = build_gallery(tmp_path)
    break_vector_orphan(db)
    break_duplicates(db)

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(D.store, "find_by_content", boom)  # fails after the orphans were deleted
    with pytest.raises(RuntimeError):
        D.examine(db, repair_it=True)
    monkeypatch.undo()
    assert vector(db, 999) is not None  # rolled back
    assert {c.name for c in D.examine(db).problems} == {"vectors_orphan", "duplicates"}


# ---------------------------------------------------------------- with a real ingest


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB").save(buf, "JPEG")
    return buf.getvalue()


def test_row_repaired_for_a_missing_vector_is_fetched_again_by_plain_ingest(tmp_path, http_server):
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    weights = save_params(random_params(official_config("small", depth=1), seed=0), tmp_path / "w.safetensors")
    urls = [http_server.add(f"/{i}.jpg", body=jpeg(i), headers={"Content-Type": "image/jpeg"}) for i in range(3)]
    csv = tmp_path / "images.csv"
    csv.write_text("url\n" + "".join(u + "\n" for u in urls))
    db = tmp_path / "gallery.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_") and "proxy" not in k.lower()}
    env.update(DINOV2_OFFLINE="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", DINOV2_ALLOW_PRIVATE="1")

    def ingest():
        p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ingest", "--csv", str(csv), "--db", str(db),
                            "--weights", str(weights), "--json", "-q"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    assert ingest()["new"] == 3
    assert doctor(db).returncode == 0
    victim = row(db, 2)
    raw(db).execute("DELETE FROM image_embeddings WHERE image_id = 2")
    assert doctor(db).returncode == 1
    assert doctor(db, "--repair").returncode == 0
    requests = http_server.count()
    summary = ingest()  # plain: no --retry-failed
    assert (summary["new"], summary["skipped"]) == (1, 2)
    assert http_server.count() == requests + 1
    assert doctor(db).returncode == 0
    assert row(db, 2)["status"] == "ok" and row(db, 2)["content_sha256"] == victim["content_sha256"]
    assert vector(db, 2) is not None
