"""End-to-end: ``cli.py ingest`` / ``query`` / ``stats`` driven as subprocesses against a local HTTP server,
real image files (Pillow) and real SQLite galleries. Random weights of the real shapes (small, depth 1)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from httpserver import hang
from retrieval import store

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=0), path)
    return path


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> Path:
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    path = tmp_path_factory.mktemp("weights2") / "w2.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=1), path)
    return path


@pytest.fixture(scope="session")
def env(weights, tmp_path_factory) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("DINOV2_")}
    e.update(DINOV2_OFFLINE="1", DINOV2_WEIGHTS=str(weights), DINOV2_CACHE=str(tmp_path_factory.mktemp("cache")),
             DINOV2_ALLOW_PRIVATE="1",  # the test servers are on 127.0.0.1 (see conftest.py)
             NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="session")
def cli(env):
    """Run ``python cli.py ARGS`` in the repository root; returns the CompletedProcess."""

    def run(*args, timeout: float = 60, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def ingest(cli):
    """``cli.py ingest ... --json -q``: asserts exit 0, returns the parsed summary."""

    def run(*args, timeout: float = 60) -> dict:
        p = cli("ingest", *args, "--json", "-q", timeout=timeout)
        assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        return json.loads(p.stdout)

    return run


def picture(seed: int, size=(64, 48)) -> Image.Image:
    """A distinct small RGB picture: a coloured gradient plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    a, b = rng.uniform(0, 255, (2, 3))
    arr = a * x + b * y + rng.normal(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "PNG")
    return buf.getvalue()


def noise_png(seed: int, side: int) -> bytes:
    """An incompressible PNG: about 3 * side**2 bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def slow(body: bytes, delay: float, content_type: str = "image/jpeg"):
    """A handler that waits ``delay`` seconds, then answers 200 with ``body``."""

    def handler(req):
        if req.server.owner.closing.wait(delay):
            req.close_connection = True
            return
        req.send_response(200)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        try:
            req.wfile.write(body)
        except OSError:
            pass

    return handler


def write_csv(path: Path, urls, header: str = "url,title") -> Path:
    lines = [header] + [f"{u},row {i}" for i, u in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def append_csv(path: Path, urls) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for u in urls:
            f.write(f"{u},appended\n")


def rows_by_url(db) -> dict:
    conn = store.connect(db)
    try:
        return {r["url"]: dict(r) for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()


def vector_count(conn, image_id) -> int:
    return conn.execute("SELECT count(*) FROM image_embeddings WHERE image_id = ?", (image_id,)).fetchone()[0]


def assert_consistent(db) -> dict:
    """integrity_check ok, store.check clean, and (own SQL) every ok row has exactly one vector and every vector
    an ok row. Returns {status: count}."""
    conn = store.connect(db)
    try:
        assert [r[0] for r in conn.execute("PRAGMA integrity_check")] == ["ok"]
        assert store.check(conn) == []
        ok_ids = [r[0] for r in conn.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id")]
        vec_ids = sorted(r[0] for r in conn.execute("SELECT image_id FROM image_embeddings"))
        assert vec_ids == ok_ids  # one vector per ok row (vec0 keys are unique), none for other rows
        counts = dict(conn.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
        return counts
    finally:
        conn.close()


def wait_until(predicate, timeout: float, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def one_error_line(p: subprocess.CompletedProcess, *names: str):
    assert p.returncode == 2, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("Error:"), p.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


# ---------------------------------------------------------------- the acceptance


def test_ingest_csv_records_every_outcome(http_server, ingest, tmp_path):
    good = [jpeg(i) for i in range(4)]
    urls = {f"good{i}": http_server.add(f"/good/{i}.jpg", body=b, headers={"Content-Type": "image/jpeg"})
            for i, b in enumerate(good)}
    # the same bytes as good0 at a second URL, served a little later so that good0 is committed first
    urls["dup"] = http_server.add("/copy/of-good0.jpg", handler=slow(good[0], 0.5))
    urls["missing"] = http_server.url("/missing.jpg")  # no route: 404
    urls["error"] = http_server.add("/error.jpg", body=b"oops", status=500, headers={"Content-Type": "text/plain"})
    urls["hang"] = http_server.add("/hang.jpg", handler=hang)
    urls["garbage"] = http_server.add("/garbage.jpg", body=bytes(range(256)) * 4, headers={"Content-Type": "image/jpeg"})
    whole = jpeg(99, (200, 150))
    urls["truncated"] = http_server.add("/truncated.jpg", body=whole[: len(whole) // 2],
                                        headers={"Content-Type": "image/jpeg"})
    urls["page"] = http_server.add("/page.jpg", body=b"<!doctype html><html><body>nope</body></html>",
                                   headers={"Content-Type": "text/html; charset=utf-8"})
    big = noise_png(5, 160)
    assert len(big) > 0.05 * 1024 * 1024
    urls["big"] = http_server.add("/big.png", body=big, headers={"Content-Type": "image/png"})
    urls["redirect"] = http_server.add("/redirect.jpg", status=302, headers={"Location": "ftp://127.0.0.1/x.jpg"})
    urls["invalid"] = "http://127.0.0.1:99999/x.jpg"
    order = ["good0", "good1", "good2", "good3", "dup", "missing", "error", "hang", "garbage", "truncated", "page",
             "big", "redirect", "invalid", "good1"]  # good1 twice
    csv = write_csv(tmp_path / "data.csv", [urls[k] for k in order])
    db = tmp_path / "gallery.db"

    t0 = time.monotonic()
    s = ingest("--csv", csv, "--db", db, "--timeout", "2", "--max-mb", "0.05", "--batch-size", "2", timeout=60)
    assert time.monotonic() - t0 < 20  # the hang ends at --timeout, the 500 gives up within it

    assert s["status"] == "completed"
    assert (s["new"], s["duplicate"], s["skipped"], s["failed"]) == (4, 1, 1, 9), s
    reasons = dict(s["failure_reasons"])
    timeout_tag = "deadline" if "deadline" in reasons else "timeout"
    assert reasons == {"http-404": 1, "http-500": 1, timeout_tag: 1, "not-an-image": 2, "truncated": 1,
                       "too-large": 1, "redirect": 1, "invalid-url": 1}, reasons

    rows = rows_by_url(db)
    assert len(rows) == 14  # the repeated URL is stored once
    assert http_server.count("/good/1.jpg") == 1
    conn = store.connect(db)
    try:
        for i in range(4):
            r = rows[urls[f"good{i}"]]
            assert r["status"] == "ok" and r["error"] is None and r["http_status"] == 200
            assert vector_count(conn, r["id"]) == 1
            assert r["content_sha256"] == hashlib.sha256(good[i]).hexdigest()
            stored = db.parent / r["path"]  # the original, stored beside the db
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == r["content_sha256"]
            assert json.loads(r["meta"]) == {"title": f"row {order.index(f'good{i}')}"}
        dup = rows[urls["dup"]]
        assert dup["status"] == "duplicate" and dup["duplicate_of"] == rows[urls["good0"]]["id"]
        assert vector_count(conn, dup["id"]) == 0
        assert conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == 4
    finally:
        conn.close()

    def err(key):
        r = rows[urls[key]]
        assert r["status"] == "failed", r
        assert vector_count_db(db, r["id"]) == 0
        return r["error"]

    assert err("missing").startswith("http-404")
    assert err("error").startswith("http-500") and "gave up" in err("error")
    assert err("hang").split(":")[0] in ("timeout", "deadline")
    assert err("garbage").startswith("not-an-image")
    assert err("truncated").startswith("truncated")
    assert err("page").startswith("not-an-image")
    assert err("big").startswith("too-large")
    assert err("redirect").startswith("redirect") and "ftp" in err("redirect")
    assert err("invalid").startswith("invalid-url")
    assert http_server.count("/redirect.jpg") == 1  # no retry of a permanent failure
    assert not any(p == "/x.jpg" for _, p, _ in http_server.requests)
    assert assert_consistent(db) == {"ok": 4, "duplicate": 1, "failed": 9}


def test_oversized_image_is_one_failure_without_pillow_warning(http_server, cli, tmp_path):
    """An image declaring 100 MP (above Pillow's own warning threshold, below its hard limit) fails as
    too-large in the database, and the run's output carries no Pillow DecompressionBombWarning."""
    from test_decode import png_declaring

    url = http_server.add("/huge.png", body=png_declaring(10_000, 10_000), headers={"Content-Type": "image/png"})
    good = http_server.add("/good.jpg", body=jpeg(1), headers={"Content-Type": "image/jpeg"})
    csv, db = write_csv(tmp_path / "data.csv", [url, good]), tmp_path / "gallery.db"
    p = cli("ingest", "--csv", csv, "--db", db, "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["new"], s["failed"], dict(s["failure_reasons"])) == (1, 1, {"too-large": 1}), s
    error = rows_by_url(db)[url]["error"]
    assert error.startswith("too-large") and "10000x10000" in error, error
    assert "Warning" not in p.stderr and "Warning" not in p.stdout, p.stderr


@pytest.mark.parametrize("batch_size", [8, 1])
def test_same_bytes_at_several_urls_in_the_pipeline_are_encoded_once(http_server, weights, tmp_path, monkeypatch,
                                                                     batch_size):
    """Three URLs serving the same bytes, fetched at once: one is encoded and stored ok, the others are
    recorded as its duplicates without being encoded (a spy counts what the encoder is given), whether
    they wait in the same batch (8) or arrive once the first is committed (1)."""
    from retrieval import ingest as I
    from retrieval.encoder import EncoderSettings, load_encoder

    given = []
    real = I.encode_pixels
    monkeypatch.setattr(I, "encode_pixels", lambda encoder, arrays: given.append(len(arrays)) or real(encoder, arrays))
    same, other = jpeg(7), jpeg(8)
    mirrors = [http_server.add(f"/mirror/{i}.jpg", body=same, headers={"Content-Type": "image/jpeg"}) for i in range(3)]
    urls = mirrors + [http_server.add("/other.jpg", body=other, headers={"Content-Type": "image/jpeg"})]
    csv, db = write_csv(tmp_path / "data.csv", urls), tmp_path / "gallery.db"
    conn = store.connect(db)
    try:
        s = I.ingest_csv(conn, db, csv, load_encoder(weights, EncoderSettings(batch_size=batch_size)), I.IngestOptions(workers=4))
    finally:
        conn.close()
    assert (s.new, s.duplicate, s.failed, s.status) == (2, 2, 0, "completed"), s
    assert sum(given) == 2, given
    rows = rows_by_url(db)
    holder = next(rows[u] for u in mirrors if rows[u]["status"] == "ok")
    assert sorted(rows[u]["status"] for u in mirrors) == ["duplicate", "duplicate", "ok"]
    assert all(rows[u]["duplicate_of"] == holder["id"] for u in mirrors if rows[u] is not holder)
    assert all(rows[u]["content_sha256"] == hashlib.sha256(same).hexdigest() for u in mirrors)
    assert assert_consistent(db) == {"ok": 2, "duplicate": 2}


def vector_count_db(db, image_id) -> int:
    conn = store.connect(db)
    try:
        return vector_count(conn, image_id)
    finally:
        conn.close()


def test_rerun_makes_no_requests_and_fetches_only_appended_rows(http_server, ingest, tmp_path):
    urls = [http_server.add(f"/img/{i}.jpg", body=jpeg(10 + i), headers={"Content-Type": "image/jpeg"}) for i in range(3)]
    urls.append(http_server.url("/gone.jpg"))  # 404: permanent
    urls.append(http_server.add("/text.jpg", body=b"just text", headers={"Content-Type": "text/plain"}))
    csv = write_csv(tmp_path / "data.csv", urls)
    db = tmp_path / "g.db"

    s1 = ingest("--csv", csv, "--db", db)
    assert (s1["new"], s1["failed"], s1["skipped"]) == (3, 2, 0), s1
    n = http_server.count()
    assert n == 5

    s2 = ingest("--csv", csv, "--db", db)
    assert http_server.count() == n, http_server.requests[n:]  # not one request
    assert (s2["new"], s2["failed"], s2["duplicate"], s2["skipped"]) == (0, 0, 0, 5), s2

    new = [http_server.add(f"/new/{i}.jpg", body=jpeg(20 + i), headers={"Content-Type": "image/jpeg"}) for i in range(2)]
    append_csv(csv, new)
    s3 = ingest("--csv", csv, "--db", db)
    assert (s3["new"], s3["failed"], s3["skipped"]) == (2, 0, 5), s3
    assert sorted(p for _, p, _ in http_server.requests[n:]) == ["/new/0.jpg", "/new/1.jpg"]
    assert assert_consistent(db) == {"ok": 5, "failed": 2}
    conn = store.connect(db)
    try:
        runs = [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        conn.close()
    assert [r["status"] for r in runs] == ["completed"] * 3
    assert [(r["new"], r["skipped"], r["failed"]) for r in runs] == [(3, 0, 2), (0, 5, 0), (2, 5, 0)]

    # a later run: a new URL serving bytes the gallery already holds is a duplicate (no second vector)
    mirror = http_server.add("/mirror/0.jpg", body=jpeg(10), headers={"Content-Type": "image/jpeg"})
    append_csv(csv, [mirror])
    s4 = ingest("--csv", csv, "--db", db)
    assert (s4["new"], s4["duplicate"], s4["skipped"]) == (0, 1, 7), s4
    assert assert_consistent(db) == {"ok": 5, "failed": 2, "duplicate": 1}


def test_transient_failures_retried_until_max_attempts_permanent_never(http_server, ingest, tmp_path):
    ok = http_server.add("/ok.jpg", body=jpeg(30), headers={"Content-Type": "image/jpeg"})
    missing = http_server.url("/missing.jpg")
    error = http_server.add("/error.jpg", body=b"down", status=500)
    stuck = http_server.add("/hang.jpg", handler=hang)
    csv = write_csv(tmp_path / "data.csv", [ok, missing, error, stuck])
    db = tmp_path / "g.db"
    args = ("--csv", csv, "--db", db, "--timeout", "1", "--max-attempts", "2")

    def requested(since):
        return {p for _, p, _ in http_server.requests[since:]}

    s1 = ingest(*args)
    assert (s1["new"], s1["failed"]) == (1, 3), s1
    assert requested(0) == {"/ok.jpg", "/missing.jpg", "/error.jpg", "/hang.jpg"}

    n = http_server.count()
    s2 = ingest(*args)  # second attempt for the transient ones only
    assert requested(n) == {"/error.jpg", "/hang.jpg"}
    assert (s2["new"], s2["failed"], s2["skipped"]) == (0, 2, 2), s2
    rows = rows_by_url(tmp_path / "g.db")
    assert rows[error]["attempts"] == 2 and rows[stuck]["attempts"] == 2 and rows[missing]["attempts"] == 1

    n = http_server.count()
    s3 = ingest(*args)  # --max-attempts 2 reached: nothing is fetched
    assert http_server.count() == n
    assert (s3["new"], s3["failed"], s3["skipped"]) == (0, 0, 4), s3

    # the servers recover; --retry-failed retries every failed row, the permanent one too, never the ok one
    http_server.add("/error.jpg", body=jpeg(31), headers={"Content-Type": "image/jpeg"})
    http_server.add("/missing.jpg", body=jpeg(32), headers={"Content-Type": "image/jpeg"})
    n = http_server.count()
    s4 = ingest(*args, "--retry-failed")
    assert requested(n) == {"/error.jpg", "/missing.jpg", "/hang.jpg"}
    assert (s4["new"], s4["failed"], s4["skipped"]) == (2, 1, 1), s4
    rows = rows_by_url(db)
    assert rows[error]["status"] == "ok" and rows[error]["error"] is None
    assert rows[missing]["status"] == "ok"
    assert rows[stuck]["status"] == "failed" and rows[stuck]["attempts"] == 3
    assert assert_consistent(db) == {"ok": 3, "failed": 1}


# ---------------------------------------------------------------- interrupted runs


def _slow_gallery(http_server, tmp_path, n=40, delay=0.15):
    urls = [http_server.add(f"/slow/{i}.jpg", handler=slow(jpeg(100 + i), delay)) for i in range(n)]
    return write_csv(tmp_path / "data.csv", urls), tmp_path / "g.db"


def _start_ingest(env, csv, db):
    return subprocess.Popen(
        [sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--batch-size", "2",
         "--workers", "4", "--json", "-q"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a child started from a shell's background job may inherit SIGINT ignored: restore the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _ok_count(db) -> int:
    if not Path(db).exists():
        return 0
    try:
        conn = store.connect(db, apply_migrations=False)
    except Exception:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchall()[0][0]
    except store.SQLITE_ERRORS:
        return 0  # the schema is not there yet
    finally:
        conn.close()


def _runs(db):
    conn = store.connect(db)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        conn.close()


def test_sigkill_mid_run_leaves_a_consistent_db_and_rerun_completes(http_server, env, ingest, tmp_path):
    csv, db = _slow_gallery(http_server, tmp_path)
    proc = _start_ingest(env, csv, db)
    try:
        wait_until(lambda: _ok_count(db) >= 4 or proc.poll() is not None, timeout=30)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    counts = assert_consistent(db)
    before = counts.get("ok", 0)
    assert 4 <= before < 40, counts
    assert _runs(db)[0]["status"] == "running"  # nobody could record the end

    n = http_server.count()
    s = ingest("--csv", csv, "--db", db)
    assert s["status"] == "completed"
    assert s["new"] + s["skipped"] == 40 and s["skipped"] == before and s["failed"] == s["duplicate"] == 0, s
    assert http_server.count() - n == 40 - before  # committed rows are never fetched again
    assert assert_consistent(db) == {"ok": 40}
    runs = _runs(db)
    assert [r["status"] for r in runs] == ["interrupted", "completed"]


def test_sigint_exits_130_and_records_the_run_interrupted(http_server, env, ingest, tmp_path):
    csv, db = _slow_gallery(http_server, tmp_path)
    proc = _start_ingest(env, csv, db)
    try:
        wait_until(lambda: _ok_count(db) >= 4 or proc.poll() is not None, timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "Interrupted.", err  # typer would exit 130 silently
    counts = assert_consistent(db)
    assert 4 <= counts.get("ok", 0) < 40, counts
    (run,) = _runs(db)
    assert run["status"] == "interrupted" and run["finished_at"] is not None
    # the committed batches were counted (the signal may land between a commit and its counting: one batch)
    assert counts["ok"] - 2 <= run["new"] <= counts["ok"]

    s = ingest("--csv", csv, "--db", db)
    assert s["new"] + s["skipped"] == 40 and s["skipped"] == counts["ok"], s
    assert assert_consistent(db) == {"ok": 40}


def test_sigint_during_a_hung_download_exits_promptly(http_server, env, tmp_path):
    """Ctrl-C must not wait for a hung server's deadline (--timeout, 60 s by default)."""
    urls = [http_server.add(f"/ok/{i}.jpg", body=jpeg(60 + i), headers={"Content-Type": "image/jpeg"}) for i in range(2)]
    urls.append(http_server.add("/hang.jpg", handler=hang))
    csv = write_csv(tmp_path / "data.csv", urls)
    db = tmp_path / "g.db"
    proc = _start_ingest(env, csv, db)
    try:
        wait_until(lambda: http_server.count("/hang.jpg") >= 1 or proc.poll() is not None, timeout=30)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    (run,) = _runs(db)
    assert run["status"] == "interrupted"
    rows = rows_by_url(db)
    assert urls[2] not in rows  # the aborted download is not recorded as a failure ("cancelled")
    assert_consistent(db)


# ---------------------------------------------------------------- query


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, weights):
    """A folder of 3 images ingested with --dir; returns (folder, db, {name: id})."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env.update(DINOV2_OFFLINE="1", DINOV2_WEIGHTS=str(weights))
    root = tmp_path_factory.mktemp("gallery")
    folder = root / "pics"
    folder.mkdir()
    names = ["a.jpg", "b.png", "c.jpg"]
    (folder / "a.jpg").write_bytes(jpeg(40, (80, 60)))
    (folder / "b.png").write_bytes(png(41, (60, 80)))
    (folder / "c.jpg").write_bytes(jpeg(42, (70, 70)))
    db = root / "g.db"
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--dir", str(folder), "--db", str(db), "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = rows_by_url(db)
    ids = {n: rows[str((folder / n).resolve())]["id"] for n in names}
    return folder, db, ids


def query_json(cli, *args):
    p = cli("query", *args, "--json")
    assert p.returncode == 0, f"exit {p.returncode}\nstderr: {p.stderr}"
    return json.loads(p.stdout)


def test_query_by_file_finds_it_first(cli, gallery):
    folder, db, ids = gallery
    for name in ("a.jpg", "b.png"):
        res = query_json(cli, folder / name, "--db", db)
        assert len(res) == 3
        assert res[0]["id"] == ids[name] and res[0]["rank"] == 1
        assert res[0]["score"] >= 0.9999
        assert [r["rank"] for r in res] == [1, 2, 3]
        assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
        for r in res:
            assert {"rank", "id", "url", "path", "score"} <= set(r)
        assert Path(res[0]["url"]) == (folder / name).resolve()
    p = cli("query", folder / "c.jpg", "--db", db)  # the table too
    assert p.returncode == 0 and str(folder / "c.jpg") in p.stdout.splitlines()[1]


def test_query_by_id_url_and_large_k(cli, gallery, http_server):
    folder, db, ids = gallery
    res = query_json(cli, "--id", ids["c.jpg"], "--db", db)
    assert res[0]["id"] == ids["c.jpg"] and res[0]["score"] >= 0.9999 and len(res) == 3

    url = http_server.add("/query.png", body=(folder / "b.png").read_bytes(), headers={"Content-Type": "image/png"})
    res = query_json(cli, "--url", url, "--db", db, "-k", "2")
    assert len(res) == 2 and res[0]["id"] == ids["b.png"] and res[0]["score"] >= 0.9999
    assert http_server.count("/query.png") == 1

    res = query_json(cli, folder / "a.jpg", "--db", db, "-k", "5000")  # above sqlite-vec's KNN limit
    assert sorted(r["id"] for r in res) == sorted(ids.values()) and res[0]["id"] == ids["a.jpg"]

    p = cli("query", "--id", "999", "--db", db)
    one_error_line(p, "999")


def test_query_refuses_other_weights_and_missing_db(cli, gallery, other_weights, tmp_path):
    folder, db, _ = gallery
    p = cli("query", folder / "a.jpg", "--db", db, "--weights", other_weights)
    one_error_line(p, db)
    missing = tmp_path / "nope.db"
    p = cli("query", folder / "a.jpg", "--db", missing)
    one_error_line(p, missing)
    assert not missing.exists()
    p = cli("stats", "--db", missing)
    one_error_line(p, missing)


def test_stats_json(cli, gallery):
    _, db, _ = gallery
    p = cli("stats", "--db", db, "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["counts"]["ok"] == 3 and s["vectors"] == 3 and s["model"]["variant"] == "small"
    assert s["runs"][0]["status"] == "completed"
    p = cli("stats", "--db", db)
    assert p.returncode == 0 and "3 ok" in p.stdout


# ---------------------------------------------------------------- --dir


def test_ingest_dir_recursive_rerun_and_changed_file(ingest, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "a.jpg").write_bytes(jpeg(50))
    (folder / "sub" / "b.png").write_bytes(png(51))
    (folder / "sub" / "deeper" / "c.JPEG").write_bytes(jpeg(52))
    (folder / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden" / "d.jpg").write_bytes(jpeg(53))
    db = tmp_path / "g.db"

    s1 = ingest("--dir", folder, "--db", db)
    assert (s1["new"], s1["failed"], s1["skipped"]) == (3, 1, 0), s1
    rows = rows_by_url(db)
    want = {str((folder / p).resolve()) for p in ("a.jpg", "sub/b.png", "sub/deeper/c.JPEG", "sub/broken.jpg")}
    assert set(rows) == want  # keyed by absolute path; .txt and hidden entries ignored
    broken = rows[str((folder / "sub" / "broken.jpg").resolve())]
    assert broken["status"] == "failed" and broken["error"].startswith("not-an-image")
    assert json.loads(rows[str((folder / "sub/b.png").resolve())]["meta"]) == {"relative_path": "sub/b.png"}

    s2 = ingest("--dir", folder, "--db", db)
    assert (s2["new"], s2["failed"], s2["skipped"]) == (0, 0, 4), s2

    a = str((folder / "a.jpg").resolve())
    a_id = rows[a]["id"]
    conn = store.connect(db)
    old = store.get_vector(conn, a_id)
    conn.close()
    st = os.stat(a)
    (folder / "a.jpg").write_bytes(jpeg(54, (90, 50)))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    s3 = ingest("--dir", folder, "--db", db)
    assert (s3["new"], s3["failed"], s3["skipped"]) == (1, 0, 3), s3
    conn = store.connect(db)
    try:
        new = store.get_vector(conn, a_id)
        assert vector_count(conn, a_id) == 1
        row = store.get_image(conn, a_id)
    finally:
        conn.close()
    assert float(old @ new) < 0.999999 or not np.allclose(old, new)
    assert row["status"] == "ok" and row["width"] == 90 and row["mtime"] == st.st_mtime_ns + 5_000_000_000
    assert row["content_sha256"] == hashlib.sha256((folder / "a.jpg").read_bytes()).hexdigest()
    assert assert_consistent(db) == {"ok": 3, "failed": 1}


def test_changed_local_file_keeps_its_duplicate_chain(cli, ingest, tmp_path):
    """Issue 10: a.png (X), b.png (copy of a), c.png (Y); then `cp c.png a.png` and ingest --dir again: content X
    keeps its vector through b, a is a duplicate of c, search by b's picture finds b, doctor is clean."""
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(60))
    shutil.copy(folder / "a.png", folder / "b.png")
    (folder / "c.png").write_bytes(png(61))
    db = tmp_path / "g.db"
    s = ingest("--dir", folder, "--db", db)
    assert (s["new"], s["duplicate"]) == (2, 1), s
    st = os.stat(folder / "a.png")
    shutil.copy(folder / "c.png", folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    s = ingest("--dir", folder, "--db", db)
    assert s["duplicate"] == 1 and s["skipped"] == 2, s
    rows = {Path(u).name: r for u, r in rows_by_url(db).items()}
    a, b, c = rows["a.png"], rows["b.png"], rows["c.png"]
    assert a["status"] == "duplicate" and a["duplicate_of"] == c["id"]
    assert b["status"] == "ok" and b["duplicate_of"] is None
    assert b["content_sha256"] == hashlib.sha256(png(60)).hexdigest()
    assert assert_consistent(db) == {"ok": 2, "duplicate": 1}
    (tmp_path / "query.png").write_bytes(png(60))
    p = cli("query", tmp_path / "query.png", "--db", db, "-k", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["id"] == b["id"]
    p = cli("doctor", "--db", db)
    assert p.returncode == 0, p.stdout


# ---------------------------------------------------------------- rough edges (issue 10)


def _stored_files(db) -> tuple[set, set]:
    """(files in the gallery's images folder, the files its rows refer to)."""
    folder = Path(db).with_name(Path(db).stem + "_images")
    files = {str(p) for p in folder.rglob("*") if p.is_file()}
    conn = store.connect(db)
    try:
        named = {str(Path(db).parent / r[0]) for r in conn.execute("SELECT path FROM images WHERE path IS NOT NULL")}
    finally:
        conn.close()
    return files, named


def test_sigterm_records_the_run_interrupted_and_leaves_no_orphan_originals(http_server, env, tmp_path):
    """SIGTERM (a service manager, `kill`): the same clean stop as Ctrl-C -- the run is recorded 'interrupted'
    (not left 'running'), one line, exit 143 -- and the originals stored for rows that were never committed (the
    batch waiting for the encoder) are removed, so doctor finds no orphan file."""
    csv, db = _slow_gallery(http_server, tmp_path, n=40, delay=0.05)
    proc = subprocess.Popen([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--batch-size",
                             "8", "--workers", "8", "-q"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _ok_count(db) >= 8 or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip() == "Interrupted (SIGTERM).", err
    (run,) = _runs(db)
    assert run["status"] == "interrupted" and run["finished_at"] is not None
    counts = assert_consistent(db)
    assert counts["ok"] < 40, counts
    files, named = _stored_files(db)
    assert files and files <= named, sorted(files - named)
    p = subprocess.run([sys.executable, "cli.py", "doctor", "--db", str(db)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout
    assert " orphan_files " in p.stdout


def test_plain_progress_lines_when_stderr_is_not_a_terminal(http_server, env, tmp_path):
    csv, db = _slow_gallery(http_server, tmp_path, n=16, delay=0.3)
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--workers", "2",
                        "--progress-every", "0.5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("progress ")]
    assert len(lines) >= 2, p.stderr
    assert "\r" not in p.stderr and "\033" not in p.stderr  # plain lines, no terminal control
    assert all("/16" in ln and "img/s" in ln for ln in lines), lines
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "-q",
                        "--retry-failed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_rerun_with_nothing_new_does_not_load_or_read_the_weights(weights, tmp_path, monkeypatch):
    """In process, counting: the first run loads the model once; a re-run over the same folder neither loads nor
    hashes the weights (the sha256 is remembered); a re-run with one new file loads it once."""
    from typer.testing import CliRunner

    import cli as C
    from retrieval import encoder as E
    from retrieval import lazyencoder as L

    loads, hashes = [], []
    real_load, real_hash = E.load_params, L.file_sha256
    monkeypatch.setattr(E, "load_params", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(L, "file_sha256", lambda *a, **k: hashes.append(a) or real_hash(*a, **k))
    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DINOV2_OFFLINE", "1")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(70 + i))
    db = tmp_path / "g.db"
    args = ["ingest", "--dir", str(folder), "--db", str(db), "--weights", str(weights), "--json", "-q"]
    runner = CliRunner()
    r = runner.invoke(C.app, args)
    assert r.exit_code == 0, r.output
    assert (len(loads), len(hashes)) == (1, 1)
    r = runner.invoke(C.app, args)
    assert r.exit_code == 0 and json.loads(r.output)["skipped"] == 3, r.output
    assert (len(loads), len(hashes)) == (1, 1)  # nothing new: the weights were not touched
    (folder / "new.png").write_bytes(png(80))
    r = runner.invoke(C.app, args)
    assert r.exit_code == 0 and json.loads(r.output)["new"] == 1, r.output
    assert (len(loads), len(hashes)) == (2, 1)
    assert assert_consistent(db) == {"ok": 4}


def test_a_database_locked_by_another_program_is_reported_as_locked(weights, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli as C

    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(90))
    db = tmp_path / "g.db"
    args = ["ingest", "--dir", str(folder), "--db", str(db), "--weights", str(weights), "-q"]
    assert CliRunner().invoke(C.app, args).exit_code == 0
    (folder / "b.png").write_bytes(png(91))
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.5)
    other = store.connect(db)
    other.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    try:
        r = CliRunner().invoke(C.app, args)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert isinstance(r.exception, store.DatabaseError), r.output
    message = str(r.exception)
    assert "locked by another program" in message and str(db) in message and "disk full" not in message, message


def test_embed_checks_the_output_folder_before_encoding(cli, tmp_path):
    (tmp_path / "a.png").write_bytes(png(92))
    missing = tmp_path / "missing_dir" / "x.npy"
    t0 = time.monotonic()
    p = cli("embed", tmp_path / "a.png", "--out", missing, "--weights", tmp_path / "no-weights-here.safetensors")
    one_error_line(p, "--out", "missing_dir")  # before the weights are even looked for
    assert not missing.parent.exists()


def test_failed_weights_download_says_what_to_do_and_leaves_no_gallery(tmp_path):
    """No weights anywhere and the hub unreachable: one line naming --weights, DINOV2_WEIGHTS, DINOV2_HUB_URL and
    --offline, not cut mid-word, and no empty gallery.db left in the working directory."""
    import socket as S

    s = S.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: the download fails at once
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(DINOV2_CACHE=str(tmp_path / "cache"), DINOV2_HUB_URL=f"http://127.0.0.1:{port}",
               DINOV2_ALLOW_PRIVATE="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    work = tmp_path / "work"
    work.mkdir()
    csv = write_csv(work / "data.csv", ["http://127.0.0.1:9/a.jpg"])
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ingest", "--csv", str(csv), "-q"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]  # (after the download's own notes)
    assert len(errors) == 1 and p.stderr.rstrip().endswith(errors[0]) and "Traceback" not in p.stderr, p.stderr
    for words in ("--weights", "DINOV2_WEIGHTS", "DINOV2_HUB_URL", "--offline"):
        assert words in errors[0], (words, errors[0])
    import re

    assert not re.search(r"\w\.\.\.", p.stderr), p.stderr  # a shortened reason ends at a word, then " ..."
    assert sorted(os.listdir(work)) == ["data.csv"]  # no gallery.db, no images folder


# ---------------------------------------------------------------- the demo


def test_demo(cli, ingest, tmp_path):
    db = tmp_path / "x.db"
    s = ingest("--csv", "demo_data/demo.csv", "--db", db)
    assert (s["new"], s["failed"], s["duplicate"]) == (4, 0, 0), s
    res = query_json(cli, "demo_data/query_cat.jpg", "--db", db)
    assert len(res) == 4
    assert all(Path(r["url"]).is_absolute() and Path(r["url"]).is_file() for r in res)
    assert assert_consistent(db) == {"ok": 4}


# ---------------------------------------------------------------- bad input


def test_bad_input_one_liners(cli, tmp_path):
    db = tmp_path / "g.db"
    missing = tmp_path / "missing.csv"
    one_error_line(cli("ingest", "--csv", missing, "--db", db), missing)
    assert not db.exists()  # a typo in the CSV's name creates no gallery

    csv = write_csv(tmp_path / "data.csv", ["http://127.0.0.1:9/x.jpg"])
    one_error_line(cli("ingest", "--csv", csv, "--dir", tmp_path, "--db", db), "--csv", "--dir")
    one_error_line(cli("ingest", "--db", db), "--csv", "--dir")

    one_error_line(cli("ingest", "--csv", csv, "--db", tmp_path), tmp_path)  # a directory as --db

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, just some text that is long enough " * 20)
    one_error_line(cli("ingest", "--csv", csv, "--db", junk), junk)
    one_error_line(cli("query", "--id", "1", "--db", junk), junk)
    one_error_line(cli("stats", "--db", junk), junk)

    one_error_line(cli("ingest", "--dir", tmp_path / "no-such-folder", "--db", db), "no-such-folder")
    one_error_line(cli("ingest", "--csv", csv, "--db", db, "--timeout", "0"), "--timeout")
    for bad in ("0", "nan"):
        one_error_line(cli("ingest", "--csv", csv, "--db", db, "--max-mb", bad), "--max-mb")
    one_error_line(cli("ingest", "--csv", csv, "--db", db, "--workers", "0"), "--workers")
    assert not db.exists()


def test_ingest_into_a_gallery_of_other_weights_or_settings_refused(cli, ingest, other_weights, tmp_path):
    db = tmp_path / "x.db"
    ingest("--csv", "demo_data/demo.csv", "--db", db)
    p = cli("ingest", "--csv", "demo_data/demo.csv", "--db", db, "--weights", other_weights)
    one_error_line(p, db)
    p = cli("ingest", "--csv", "demo_data/demo.csv", "--db", db, "--pooling", "mean")
    one_error_line(p, db, "pooling")
    assert [r["status"] for r in _runs(db)] == ["completed"]  # refused before a run started
    assert assert_consistent(db) == {"ok": 4}


def test_query_url_failures_are_one_liners(cli, gallery, http_server):
    _, db, _ = gallery
    url = http_server.url("/absent.jpg")
    one_error_line(cli("query", "--url", url, "--db", db), url, "http-404")
    page = http_server.add("/page.html", body=b"<html></html>", headers={"Content-Type": "text/html"})
    one_error_line(cli("query", "--url", page, "--db", db), page, "not an image")
    one_error_line(cli("query", "--db", db), "--url", "--id")
    one_error_line(cli("query", "--id", "1", "--db", db, "-k", "0"), "-k")
