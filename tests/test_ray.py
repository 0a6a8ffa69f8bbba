"""``cli.py ingest --engine ray``: a real local Ray instance on 127.0.0.1 (started once for this module), a CSV
served by a real HTTP server on 127.0.0.1, real SQLite galleries. The Ray gallery is compared with a local
ingest of the same CSV row by row and vector by vector; an encoder actor is killed mid-run; the driver is
killed (SIGKILL) and the run resumed; the shards are merged twice. Random weights of the real shapes
(small, depth 1)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# Ray kept light (no dashboard, a small object store, no usage stats) and on 127.0.0.1 only; Ray reads some of
# these when it is first imported, so they are set before anything imports it
RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
    pytest.skip("Ray and pyarrow are not installed (pip install -e '.[ray]')", allow_module_level=True)

from httpserver import LocalHTTPServer  # noqa: E402
from test_ingest import jpeg, png  # noqa: E402

from retrieval import ingest as I  # noqa: E402
from retrieval import shards as S  # noqa: E402
from retrieval import store  # noqa: E402
from retrieval.encoder import EncoderSettings, load_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

ENCODER_ACTOR = "MapWorker(MapBatches(_Encode))"


class Gate:
    """Handlers of the ``gated`` images wait until the gate is open (or the server closes)."""

    def __init__(self):
        self.event = threading.Event()
        self.event.set()

    def handler(self, body: bytes):
        def handle(req):
            while not self.event.wait(0.05):
                if req.server.owner.closing.is_set():
                    req.close_connection = True
                    return
            req.send_response(200)
            req.send_header("Content-Type", "image/jpeg")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            try:
                req.wfile.write(body)
            except OSError:
                pass

        return handle


@pytest.fixture(scope="module")
def ray_cluster():
    from retrieval import raypath

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    ray = raypath.start(None, num_cpus=2, object_store_memory=100 * 2**20, _temp_dir=temp)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    try:
        yield address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The served CSV: good images of two shapes (JPEG and PNG), the same bytes at other URLs, failures, a
    repeated URL, and last four images behind a gate (to stop a run half-way)."""
    tmp = tmp_path_factory.mktemp("raydata")
    server = LocalHTTPServer()
    gate = Gate()
    urls = []
    for i in range(10):
        size = (64, 48) if i % 2 else (48, 64)
        urls.append(server.add(f"/img{i}.{'png' if i % 3 == 0 else 'jpg'}", body=png(i, size) if i % 3 == 0 else jpeg(i, size)))
    urls.append(server.add("/copy-of-2.jpg", body=jpeg(2, (48, 64))))
    urls.append(server.add("/copy-of-5.jpg", body=jpeg(5, (64, 48))))
    urls.append(server.url("/missing.jpg"))
    urls.append(server.add("/page.html", body=b"<html><body>not an image</body></html>", headers={"Content-Type": "text/html"}))
    urls.append(server.add("/empty.jpg", body=b""))
    urls.append("not a url")
    urls.append(urls[0])
    for i in range(4):
        urls.append(server.add(f"/gated{i}.jpg", handler=gate.handler(jpeg(100 + i, (64, 48)))))
    csv = tmp / "data.csv"
    csv.write_text("url,title\n" + "".join(f"{u},row {i}\n" for i, u in enumerate(urls)), encoding="utf-8")
    weights = tmp / "w.safetensors"
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    save_params(random_params(official_config("small", depth=1), seed=0), weights)
    # the reference: a local ingest of the same CSV at batch size 1
    (tmp / "local").mkdir()
    local_db = tmp / "local" / "gallery.db"
    conn = store.connect(local_db)
    s = I.ingest_csv(conn, local_db, csv, load_encoder(weights, EncoderSettings(batch_size=1)), I.IngestOptions())
    conn.close()
    assert (s.new, s.duplicate, s.failed, s.skipped) == (14, 2, 4, 1), s.as_dict()
    try:
        yield {"csv": csv, "weights": weights, "server": server, "gate": gate, "local": local_db, "tmp": tmp,
               "urls": urls}
    finally:
        gate.event.set()
        server.close()


def gallery(db) -> tuple[dict, dict]:
    """({url: row without ids and times}, {content_sha256: vector of its ok row})."""
    conn = store.connect(db)
    rows, vectors = {}, {}
    for r in conn.execute("SELECT * FROM images"):
        r = dict(r)
        if r["status"] == "ok":
            vectors[r["content_sha256"]] = store.get_vector(conn, r["id"])
        for k in ("id", "duplicate_of", "created_at", "updated_at"):
            r.pop(k)
        rows[r["url"]] = r
    problems = store.check(conn)
    conn.close()
    assert problems == []
    return rows, vectors


def assert_same_gallery(local_db, ray_db, exact: bool):
    lrows, lvecs = gallery(local_db)
    rrows, rvecs = gallery(ray_db)
    assert sorted(lrows) == sorted(rrows)
    for url, lr in lrows.items():
        rr = rrows[url]
        if lr["status"] == "duplicate" or rr["status"] == "duplicate":
            # which URL of the same bytes is the ok one depends on arrival order; both galleries hold one
            assert lr["status"] in ("ok", "duplicate") and rr["status"] in ("ok", "duplicate"), url
            keys = ("url_hash", "error", "http_status", "content_sha256", "bytes", "meta", "attempts")
        else:
            keys = tuple(lr)
        assert {k: rr[k] for k in keys} == {k: lr[k] for k in keys}, url
    assert sorted(lvecs) == sorted(rvecs)  # one ok row per content, the same contents
    for sha, lv in lvecs.items():
        rv = rvecs[sha]
        if exact:
            assert np.array_equal(lv, rv), sha
        else:
            assert float(lv @ rv) >= 0.999999, sha


def ingest_ray(data, db, *, batch_size: int, block_rows: int = 2, shards=None, progress=None):
    from retrieval import raypath

    conn = store.connect(db)
    try:
        return raypath.ingest_csv(conn, db, data["csv"], data["weights"], EncoderSettings(batch_size=batch_size),
                                  I.IngestOptions(), raypath.RayOptions(block_rows=block_rows, shards_dir=shards),
                                  progress=progress)
    finally:
        conn.close()


# ---------------------------------------------------------------- the same result as a local ingest


@pytest.fixture(scope="module")
def ray_gallery(ray_cluster, data):
    """A Ray ingest of the CSV at batch size 1 (the local reference's batch composition)."""
    d = data["tmp"] / "ray"
    d.mkdir()
    db = d / "gallery.db"
    summary = ingest_ray(data, db, batch_size=1, shards=d / "shards")
    return db, d / "shards", summary


def test_ray_ingest_gives_the_local_ingests_gallery_bit_for_bit(data, ray_gallery):
    db, shards_dir, summary = ray_gallery
    assert (summary.new, summary.duplicate, summary.failed, summary.skipped, summary.status) == \
        (14, 2, 4, 1, "completed"), summary.as_dict()
    assert summary.reasons == {"empty": 1, "http-404": 1, "invalid-url": 1, "not-an-image": 1}
    assert_same_gallery(data["local"], db, exact=True)
    # one shard per block of 2 work items (20 rows need work: the repeated URL was skipped by the driver)
    files = S.shard_files(shards_dir)
    assert len(files) == 10
    tables = [S.read_shard(f)[1] for f in files]
    assert sum(t.num_rows for t in tables) == 20
    statuses = [s for t in tables for s in t.column("status").to_pylist()]
    assert statuses.count("failed") == 4  # failures are rows of the shards


def test_a_rerun_ships_nothing(data, ray_gallery):
    db, shards_dir, _ = ray_gallery
    before = data["server"].count()
    n_shards = len(S.shard_files(shards_dir))
    summary = ingest_ray(data, db, batch_size=1, shards=shards_dir)
    assert (summary.new, summary.skipped, summary.failed, summary.duplicate) == (0, 21, 0, 0)
    assert data["server"].count() == before  # no request: every row was known
    assert len(S.shard_files(shards_dir)) == n_shards


def test_merging_the_shards_again_or_elsewhere_gives_the_same_gallery(data, ray_gallery, tmp_path):
    db, shards_dir, _ = ray_gallery
    from test_shards import dump

    conn = store.connect(db)
    state = dump(conn)
    m = S.merge(conn, shards_dir)  # into the gallery that already merged them: nothing changes
    assert (m.shards, m.already) == (0, 10)
    assert dump(conn) == state
    conn.close()
    # into a fresh gallery, by the CLI, twice
    fresh = tmp_path / "gallery.db"
    env = {**os.environ, "DINOV2_ALLOW_PRIVATE": "1"}
    for n in (10, 0):
        p = subprocess.run([sys.executable, "cli.py", "merge", str(shards_dir), "--db", str(fresh), "--json"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["shards"] == n
    rows, vectors = gallery(fresh)
    rrows, rvectors = gallery(db)
    assert rows.keys() == rrows.keys()
    assert {u: r["status"] for u, r in rows.items()} == {u: r["status"] for u, r in rrows.items()}
    assert all(np.array_equal(vectors[s], rvectors[s]) for s in rvectors) and vectors.keys() == rvectors.keys()


# ---------------------------------------------------------------- faults


def encoder_actors(ray) -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == ENCODER_ACTOR and a["State"] == "ALIVE"]


def test_an_encoder_actor_killed_mid_run_is_restarted_and_nothing_is_lost(ray_cluster, data, tmp_path):
    import ray

    shards_dir = tmp_path / "shards"
    data["gate"].event.clear()  # the last four images wait: the run is half done when the actor dies
    killed = {}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            alive = encoder_actors(ray)
            if alive and shards_dir.is_dir() and len(S.shard_files(shards_dir)) >= 3:
                killed.update(alive[0])
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                break
            time.sleep(0.1)
        data["gate"].event.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = ingest_ray(data, tmp_path / "gallery.db", batch_size=8, shards=shards_dir)
    finally:
        data["gate"].event.set()
        t.join()
    assert killed, "no encoder actor was found to kill"
    assert summary.status == "completed" and (summary.new, summary.failed) == (14, 4)
    from ray._private import state

    restarted = state.actors()[killed["ActorID"]]
    assert restarted["NumRestarts"] >= 1  # Ray restarted it (max_restarts=-1) and retried its work
    assert_same_gallery(data["local"], tmp_path / "gallery.db", exact=False)


def test_a_killed_driver_leaves_its_shards_and_the_rerun_does_only_the_rest(ray_cluster, data, tmp_path):
    db, shards_dir = tmp_path / "gallery.db", tmp_path / "shards"
    env = {**os.environ, "DINOV2_ALLOW_PRIVATE": "1", "DINOV2_OFFLINE": "1", "DINOV2_WEIGHTS": str(data["weights"]),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    cmd = [sys.executable, "cli.py", "ingest", "--csv", str(data["csv"]), "--db", str(db), "--engine", "ray",
           "--ray-address", ray_cluster, "--shards", str(shards_dir), "--block-rows", "2", "--json", "-q",
           "--images-dir", str(tmp_path / "gallery_images")]  # with an address, originals are kept only if asked
    server = data["server"]
    data["gate"].event.clear()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        # every block before the gated images has come back as a shard: 8 of the 10
        while time.monotonic() < deadline and proc.poll() is None:
            if shards_dir.is_dir() and len(S.shard_files(shards_dir)) >= 8:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        data["gate"].event.set()
    written = S.shard_files(shards_dir)
    done_urls = {u for f in written for u in S.read_shard(f)[1].column("url").to_pylist()}
    assert len(written) >= 8 and not any(u.endswith(".jpg") and "gated" in u for u in done_urls)
    time.sleep(1.0)  # the dead driver's tasks are stopped by Ray
    counts = {u: server.count(u.split(str(server.port), 1)[1]) for u in done_urls if u.startswith("http")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    # the rows of the shards left behind were merged, not fetched again; the rest was done
    assert {u: server.count(u.split(str(server.port), 1)[1]) for u in counts} == counts
    assert summary["status"] == "completed" and 4 <= summary["new"] < 14  # at least the gated ones
    assert_same_gallery(data["local"], db, exact=False)
    conn = store.connect(db)
    runs = [r["status"] for r in conn.execute("SELECT status FROM runs ORDER BY id")]
    conn.close()
    assert runs == ["interrupted", "completed"]


# ---------------------------------------------------------------- without Ray


def test_without_ray_the_ray_engine_says_how_to_install_it(data, tmp_path):
    db = tmp_path / "g.db"
    code = ("import sys; sys.modules['ray'] = None; import cli; sys.argv = ['cli.py', 'ingest', '--csv', "
            f"{str(data['csv'])!r}, '--db', {str(db)!r}, '--engine', 'ray']; cli.main()")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DINOV2_ALLOW_PRIVATE": "1"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "Error: the ray engine needs Ray and pyarrow, which are not installed: pip install -e '.[ray]'"]
    assert not db.exists()


def test_the_local_ingest_does_not_import_ray(data, tmp_path):
    db = tmp_path / "g.db"
    code = ("import sys, cli; sys.argv = ['cli.py', 'ingest', '--csv', "
            f"{str(data['csv'])!r}, '--db', {str(db)!r}, '-q', '--weights', {str(data['weights'])!r}]\n"
            "try:\n    cli.main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DINOV2_ALLOW_PRIVATE": "1", "DINOV2_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "14 new" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "[]"
