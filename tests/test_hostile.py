"""Ingest against the hostile web (issue 3): every case goes through ``cli.py ingest`` as a subprocess, against
fault-injecting HTTP servers on 127.0.0.1 (tests/httpserver.py), and each row's ``status`` and error tag is
asserted in the database.

One ingest run per category covers many cases at once (server faults, image kinds, CSV quirks); the runs are
module-scoped fixtures, so any test can be run alone and the README table test (``test_readme_bad_input_table``)
compares the README's "What happens to bad input" table with what these runs observed. Then: per-host
politeness, two ingest processes on one database, an images folder that cannot be written, SIGINT/SIGKILL at
varied moments, and a 100,000-row CSV whose peak memory is compared with a 10,000-row one.

Nothing here reaches beyond 127.0.0.1: the IDN host is fetched through an HTTP proxy that is the local test
server (the client never resolves the name; ``_check_idn_goes_through_proxy`` verifies that before the run).
Every wait is bounded: subprocess timeouts, ``wait_until`` limits, and an alarm per test (``_bounded``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from httpserver import (ConcurrencyTracker, LocalHTTPServer, drip, drip_headers, gzip_bomb, hang, reset_after,
                        sequence, truncated)
from retrieval import store
# the issue-3 fixtures and helpers (random small weights, the CLI runner, CSV writers, the consistency check)
from test_ingest import (_ok_count, _runs, assert_consistent, env, jpeg, one_error_line, picture,  # noqa: F401
                         rows_by_url, slow, wait_until, weights, write_csv)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 3  # --timeout (the whole-download deadline) of the fault runs, seconds
MAX_MB = 1  # --max-mb of the fault runs
TEST_LIMIT = 150  # no test may run longer than this (seconds)


@pytest.fixture(autouse=True)
def _bounded():
    """A backstop on top of the subprocess timeouts: a test that runs past TEST_LIMIT fails instead of hanging.
    (Left to pytest-timeout or any other SIGALRM user when one is installed.)"""
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"test ran longer than {TEST_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- helpers


def run_ingest(env, csv, db, *args, timeout: float = 90, extra_env: dict | None = None):
    """``cli.py ingest --csv CSV --db DB ARGS --json -q``; returns (CompletedProcess, summary or None, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), *map(str, args),
                        "--json", "-q"], cwd=ROOT, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    elapsed = time.monotonic() - t0
    summary = json.loads(p.stdout) if p.returncode == 0 else None
    return p, summary, elapsed


def ingest_ok(env, csv, db, *args, timeout: float = 90, extra_env: dict | None = None):
    p, summary, elapsed = run_ingest(env, csv, db, *args, timeout=timeout, extra_env=extra_env)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert summary["status"] == "completed", summary
    return summary, elapsed


def outcome(row) -> str:
    """``ok``, ``duplicate``, ``failed: <tag>`` or ``missing``."""
    if row is None:
        return "missing"
    if row["status"] == "failed":
        return "failed: " + row["error"].split(":", 1)[0].strip()
    return row["status"]


def vectors(db) -> dict:
    """{url: stored vector} of the ok rows."""
    conn = store.connect(db)
    try:
        rows = conn.execute("SELECT id, url FROM images WHERE status = 'ok'").fetchall()
        return {r["url"]: store.get_vector(conn, r["id"]) for r in rows}
    finally:
        conn.close()


def free_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, depth: int, colour_type: int, scanlines: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot save 16-bit RGB, nor lie about the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines))
            + _chunk(b"IEND", b""))


def blocks(colours, size=(64, 48)) -> Image.Image:
    """Vertical bands of flat colours: survives GIF palettes and lossless WebP bit for bit."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        arr[:, i * w // len(colours):(i + 1) * w // len(colours)] = c
    return Image.fromarray(arr, "RGB")


def stream_without_length(size: int):
    """A handler that sends ``size`` bytes with no Content-Length (the end is the connection's close)."""
    def handler(req):
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Connection", "close")
        req.end_headers()
        req.close_connection = True
        try:
            for _ in range(size // 65536 + 1):
                req.wfile.write(bytes(65536))
        except OSError:
            pass
    return handler


class Timed:
    """Wrap a handler: record (monotonic arrival time, path) of every request in ``log``."""

    def __init__(self, log: list, lock: threading.Lock, inner):
        self.log, self.lock, self.inner = log, lock, inner

    def __call__(self, req):
        with self.lock:
            self.log.append((time.monotonic(), req.path))
        self.inner(req)


@pytest.fixture(scope="module")
def servers():
    """Named local servers, closed at the end of the module. (Separate servers are separate hosts for the
    per-host cap and Retry-After, so one slow case does not queue the others.)"""
    made: dict[str, LocalHTTPServer] = {}

    def get(name: str) -> LocalHTTPServer:
        if name not in made:
            made[name] = LocalHTTPServer()
        return made[name]

    yield get
    for s in made.values():
        s.close()


def png_of(img: Image.Image) -> bytes:
    return save(img, "PNG")


# ---------------------------------------------------------------- servers: one run, every fault


@pytest.fixture(scope="module")
def server_run(servers, env, tmp_path_factory):
    """One ingest of a CSV of faulty servers (--timeout 3 --max-mb 1): {cases: {case: [url]}, rows, summary, ...}."""
    fast, busy, busy2 = servers("faults"), servers("retry-after"), servers("retry-after-always")
    img = jpeg(500, (80, 60))
    body = jpeg(501, (120, 90))
    typ = {"Content-Type": "image/jpeg"}
    cases: dict[str, list[str]] = {}

    def case(name, *urls):
        cases.setdefault(name, []).extend(urls)

    case("image", fast.add("/img/plain.jpg", body=img, headers=typ))
    case("dead-link", fast.url("/gone.jpg"))
    case("html-page", fast.add("/page.jpg", body=b"<!doctype html><title>Oops</title><p>moved</p>",
                               headers={"Content-Type": "text/html; charset=utf-8"}))
    # the three that hold a connection for the whole deadline: each on its own host (per-host cap of 4)
    case("slow-drip", servers("drip").add("/drip.jpg", handler=drip(body, interval=0.05)))
    case("no-answer", servers("hang").add("/hang.jpg", handler=hang))
    case("slow-headers", servers("drip-headers").add("/headers.jpg", handler=drip_headers(0.05)))
    case("reset-mid-body", fast.add("/reset.jpg", handler=reset_after(body[:600], len(body))))
    case("short-body", fast.add("/short.jpg", handler=truncated(body[:600], len(body) + 1000)))
    case("refused", f"http://127.0.0.1:{free_port()}/nobody.jpg")
    case("too-big", fast.add("/huge.png", body=bytes(2 * 1024 * 1024), headers={"Content-Type": "image/png"}))
    case("too-big-unannounced", fast.add("/stream.jpg", handler=stream_without_length(3 * 1024 * 1024)))
    bomb = gzip_bomb(50 * 1024 * 1024)
    assert len(bomb) < 100_000
    case("gzip-bomb", fast.add("/bomb.png", body=bomb, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}))
    case("deflate-bomb", fast.add("/bomb.jpg", body=zlib.compress(bytes(50 * 1024 * 1024), 9),
                                  headers={"Content-Type": "image/jpeg", "Content-Encoding": "deflate"}))
    case("bad-encoding", fast.add("/notgzip.jpg", body=img, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}))
    case("gzip-image", fast.add("/zipped.jpg", body=gzip.compress(jpeg(502)),
                                headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}))
    fast.add("/loop/a", status=302, headers={"Location": "/loop/b"})
    case("redirect-loop", fast.add("/loop/b", status=301, headers={"Location": fast.url("/loop/a")}))
    case("redirect-scheme",
         fast.add("/to-file.jpg", status=302, headers={"Location": "file:///etc/passwd"}),
         fast.add("/to-data.jpg", status=307, headers={"Location": "data:image/png;base64,iVBORw0KGgo="}),
         fast.add("/to-js.jpg", status=301, headers={"Location": "javascript:alert(1)"}))
    fast.add("/hop/2", status=302, headers={"Location": "/img/final.jpg"})
    fast.add("/img/final.jpg", body=jpeg(503), headers=typ)
    case("redirect-ok", fast.add("/hop/1", status=301, headers={"Location": "/hop/2"}))
    case("503-burst", fast.add("/burst.jpg", handler=sequence((503, b"busy"), (503, b"busy"),
                                                              (200, jpeg(504), typ))))
    case("503-always", fast.add("/down.jpg", body=b"down for maintenance", status=503))
    # 429 + Retry-After: 1 s, then the image; the host's other requests are timed (see test_retry_after_...)
    log, lock = [], threading.Lock()
    case("429-then-ok", busy.add("/busy.jpg", handler=Timed(log, lock, sequence(
        (429, b"slow down", {"Retry-After": "1"}), (200, jpeg(505), typ)))))
    for i in range(6):
        case("429-neighbour", busy.add(f"/neighbour/{i}.jpg", handler=Timed(log, lock, slow(jpeg(510 + i), 0.05))))
    case("429-always", busy2.add("/always.jpg", body=b"no", status=429, headers={"Retry-After": "1"}))

    order = [u for urls in cases.values() for u in urls]
    root = tmp_path_factory.mktemp("servers")
    csv = write_csv(root / "servers.csv", order)
    db = root / "g.db"
    summary, elapsed = ingest_ok(env, csv, db, "--timeout", TIMEOUT, "--max-mb", MAX_MB, "--workers", 16,
                                 "--batch-size", 4, timeout=90)
    return {"cases": cases, "rows": rows_by_url(db), "summary": summary, "seconds": elapsed, "db": db,
            "retry_after_log": log, "servers": {"fast": fast, "busy": busy, "busy2": busy2}}


SERVER_EXPECTED = {
    "image": "ok",
    "dead-link": "failed: http-404",
    "html-page": "failed: not-an-image",
    "slow-drip": "failed: deadline",
    "no-answer": "failed: deadline",
    "slow-headers": "failed: deadline",
    "reset-mid-body": "failed: connection",
    "short-body": "failed: incomplete",
    "refused": "failed: connection",
    "too-big": "failed: too-large",
    "too-big-unannounced": "failed: too-large",
    "gzip-bomb": "failed: too-large",
    "deflate-bomb": "failed: too-large",
    "bad-encoding": "failed: bad-encoding",
    "gzip-image": "ok",
    "redirect-loop": "failed: too-many-redirects",
    "redirect-scheme": "failed: redirect",
    "redirect-ok": "ok",
    "503-burst": "ok",
    "503-always": "failed: http-503",
    "429-then-ok": "ok",
    "429-neighbour": "ok",
    "429-always": "failed: http-429",
}


def observed(run) -> dict:
    """{case: outcome} of a run; a case with several URLs must have one outcome for all of them."""
    result = {}
    for name, urls in run["cases"].items():
        outs = {outcome(run["rows"].get(u)) for u in urls}
        assert len(outs) == 1, (name, {u: outcome(run["rows"].get(u)) for u in urls})
        result[name] = outs.pop()
    return result


def test_server_faults_each_end_as_expected(server_run):
    rows, s = server_run["rows"], server_run["summary"]
    assert observed(server_run) == SERVER_EXPECTED
    n_urls = sum(len(u) for u in server_run["cases"].values())
    assert len(rows) == n_urls  # every row is in the database, explained
    assert s["new"] + s["failed"] + s["duplicate"] == n_urls, s

    def error(case, i=0):
        return rows[server_run["cases"][case][i]]["error"]

    # the deadline is a total: the drips sent a byte every 0.05 s, so no socket timeout (20 s) could fire
    for case in ("slow-drip", "slow-headers", "no-answer"):
        assert error(case).startswith("deadline: the download took more than 3 s"), error(case)
    assert "after decompression" in error("gzip-bomb") and "after decompression" in error("deflate-bomb")
    assert "Content-Length" in error("too-big")
    assert "gave up" in error("503-always") and "gave up" in error("429-always")
    assert "file:///etc/passwd" in error("redirect-scheme", 0)
    assert rows[server_run["cases"]["dead-link"][0]]["http_status"] == 404
    assert rows[server_run["cases"]["redirect-ok"][0]]["http_status"] == 200
    fast = server_run["servers"]["fast"]
    assert fast.count("/burst.jpg") == 3  # two 503s, then the image
    assert fast.count("/loop/a") + fast.count("/loop/b") == 6  # 5 redirects followed, then given up
    assert 2 <= fast.count("/down.jpg") <= 4  # retried with backoff within the 3 s deadline, never more
    assert fast.count("/gone.jpg") == 1 and fast.count("/page.jpg") == 1  # permanent: not retried
    # nothing hangs: the hung, dripping and throttled servers all end at the 3 s deadline
    assert server_run["seconds"] < 25, server_run["seconds"]
    assert_consistent(server_run["db"])


def test_retry_after_delays_every_request_to_that_host(server_run):
    """The 429's Retry-After (1 s) holds back the retry AND the host's other downloads (per-host politeness)."""
    log = sorted(server_run["retry_after_log"])
    busy = [t for t, p in log if p == "/busy.jpg"]
    assert len(busy) == 2, log
    first_429 = busy[0]
    assert busy[1] - first_429 >= 0.95  # the retry waited for Retry-After
    # requests already running when the 429 came back may finish; no new one starts before Retry-After
    in_flight_limit = 4  # the per-host cap: at most 3 neighbours could have started together with /busy.jpg
    started_early = [t for t, p in log if p != "/busy.jpg" and first_429 - 0.01 <= t < first_429 + 0.95]
    assert len(started_early) <= in_flight_limit - 1, (first_429, log)
    later = [t for t, p in log if t >= first_429 + 0.95]
    assert later, "the neighbours all ran before the 429"
    assert server_run["servers"]["busy2"].count("/always.jpg") <= 3  # 1 s apart within the 3 s deadline


def test_transient_failures_are_retried_by_the_next_run_and_permanent_ones_not(server_run, env, tmp_path):
    """A re-run against the same (still broken) servers asks only for the transient failures again."""
    cases = server_run["cases"]
    rows = server_run["rows"]
    transient = {"slow-drip", "no-answer", "slow-headers", "reset-mid-body", "short-body", "refused", "503-always",
                 "429-always"}
    # rebuild a small CSV of a few failures of each kind (a copy of the db keeps the fixture's untouched)
    db = tmp_path / "g.db"
    src = store.connect(server_run["db"])
    try:
        src.execute("VACUUM INTO ?", (str(db),))
    finally:
        src.close()
    pick = ["short-body", "503-always", "dead-link", "too-big", "redirect-loop", "image"]
    urls = [cases[c][0] for c in pick]
    csv = write_csv(tmp_path / "again.csv", urls)
    fast = server_run["servers"]["fast"]
    before = {p: fast.count(p) for p in ("/short.jpg", "/down.jpg", "/gone.jpg", "/huge.png", "/loop/a", "/img/plain.jpg")}
    s, _ = ingest_ok(env, csv, db, "--timeout", 1, "--max-mb", MAX_MB)
    assert s["skipped"] == 4 and s["failed"] == 2, s
    assert fast.count("/short.jpg") > before["/short.jpg"] and fast.count("/down.jpg") > before["/down.jpg"]
    for p in ("/gone.jpg", "/huge.png", "/loop/a", "/img/plain.jpg"):
        assert fast.count(p) == before[p], p
    after = rows_by_url(db)
    for c in pick:
        u = cases[c][0]
        assert after[u]["attempts"] == rows[u]["attempts"] + (1 if c in transient else 0), c
    assert_consistent(db)


def test_a_retry_cut_short_by_the_deadline_reports_the_failure_that_caused_it(http_server):
    """In-process, deterministic: 503, then a retry that hangs until the deadline -> "http-503 ... (gave up ...)",
    not "deadline" (the server's fault is the 503; in the run above a resetting server is always "connection")."""
    from retrieval.fetch import FetchConfig, Fetcher

    calls = []

    def handler(req):
        calls.append(time.monotonic())
        if len(calls) == 1:
            req.send_response(503)
            req.send_header("Content-Length", "4")
            req.end_headers()
            req.wfile.write(b"busy")
        else:
            hang(req)

    url = http_server.add("/flaky.jpg", handler=handler)
    with Fetcher(FetchConfig(deadline=1, backoff=0.01, read_timeout=5)) as f:
        r = f.fetch(url)
    assert not r.ok and r.tag == "http-503" and r.http_status == 503 and r.transient, r
    assert "deadline passed during the last one" in r.reason and r.attempts == 2, r
    assert r.elapsed < 3


# ---------------------------------------------------------------- images: one run, every kind


@pytest.fixture(scope="module")
def image_run(servers, env, tmp_path_factory):
    srv = servers("images")
    cases: dict[str, list[str]] = {}
    frames = {}

    def case(name, path, body, ctype, query=""):
        cases.setdefault(name, []).append(srv.add(path, body=body, headers={"Content-Type": ctype}) + query)

    # decompression bomb: a 300-byte PNG declaring 60000 x 60000 pixels
    bomb = raw_png(60000, 60000, 8, 2, b"\0" * 64)
    assert len(bomb) < 1000
    case("decompression-bomb", "/bomb.png", bomb, "image/png")
    case("empty-file", "/empty.jpg", b"", "image/jpeg")
    whole = save(picture(600, (160, 120)), "PNG")
    case("truncated-image", "/cut.png", whole[: len(whole) // 2], "image/png")
    whole = jpeg(601, (200, 150))
    case("truncated-image", "/cut.jpg", whole[: len(whole) // 3], "image/jpeg")
    case("svg", "/logo.svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                             b'<rect width="10" height="10" fill="red"/></svg>', "image/svg+xml")
    case("cmyk-jpeg", "/cmyk.jpg", save(picture(602).convert("CMYK"), "JPEG", quality=90), "image/jpeg")
    grey16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    case("png-16-bit", "/grey16.png", save(Image.fromarray(grey16), "PNG"), "image/png")
    rgb16 = np.random.default_rng(603).integers(0, 65536, (6, 8, 3), dtype=np.uint16).astype(">u2")
    case("png-16-bit", "/rgb16.png", raw_png(8, 6, 16, 2, b"".join(b"\0" + row.tobytes() for row in rgb16)), "image/png")
    pal = picture(604).quantize(16)
    case("palette-transparency", "/pal.png", save(pal, "PNG", transparency=0), "image/png")
    case("palette-transparency", "/pal.gif", save(pal, "GIF", transparency=3), "image/gif")
    la = np.stack([np.asarray(picture(605).convert("L")), np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))], -1)
    case("grey-alpha", "/la.png", save(Image.fromarray(la, "LA"), "PNG"), "image/png")
    first = blocks([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)])
    second = blocks([(0, 0, 0), (255, 255, 0), (0, 255, 255), (128, 0, 128)])
    case("animated-gif", "/anim.gif", save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0),
         "image/gif")
    case("animated-webp", "/anim.webp", save(first, "WEBP", save_all=True, append_images=[second], duration=100,
                                             lossless=True), "image/webp")
    frames["first"] = srv.add("/first.png", body=png_of(first), headers={"Content-Type": "image/png"})
    frames["second"] = srv.add("/second.png", body=png_of(second), headers={"Content-Type": "image/png"})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    case("exif-rotated", "/rotated.jpg", save(picture(606, (64, 48)), "JPEG", exif=exif.tobytes()), "image/jpeg")
    case("tiny", "/one-pixel.png", save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "image/png")
    case("tiny", "/two-by-three.gif", save(Image.new("RGB", (2, 3), (10, 200, 10)), "GIF"), "image/gif")
    pano = np.tile(np.linspace(0, 255, 6000, dtype=np.uint8)[None, :, None], (12, 1, 3))
    case("panorama", "/panorama.jpg", save(Image.fromarray(pano, "RGB"), "JPEG"), "image/jpeg")
    case("wrong-extension", "/actually-a-png.jpg", save(picture(607), "PNG"), "image/jpeg")
    case("wrong-extension", "/photo.txt", jpeg(608), "text/plain")
    case("wrong-content-type", "/image", jpeg(609), "text/html; charset=utf-8", query="?id=609")
    case("wrong-content-type", "/download/610", save(picture(610), "WEBP"), "application/octet-stream")

    root = tmp_path_factory.mktemp("images")
    urls = [u for us in cases.values() for u in us] + [frames["first"], frames["second"]]
    csv = write_csv(root / "images.csv", urls)
    db = root / "g.db"
    summary, elapsed = ingest_ok(env, csv, db, "--workers", 8, "--batch-size", 4, timeout=90)
    return {"cases": cases, "rows": rows_by_url(db), "summary": summary, "seconds": elapsed, "db": db,
            "frames": frames}


IMAGE_EXPECTED = {
    "decompression-bomb": "failed: too-large",
    "empty-file": "failed: empty",
    "truncated-image": "failed: truncated",
    "svg": "failed: not-an-image",
    "cmyk-jpeg": "ok",
    "png-16-bit": "ok",
    "palette-transparency": "ok",
    "grey-alpha": "ok",
    "animated-gif": "ok",
    "animated-webp": "ok",
    "exif-rotated": "ok",
    "tiny": "ok",
    "panorama": "ok",
    "wrong-extension": "ok",
    "wrong-content-type": "ok",
}


def test_image_kinds_each_end_as_expected(image_run):
    rows, cases = image_run["rows"], image_run["cases"]
    assert observed(image_run) == IMAGE_EXPECTED
    assert image_run["summary"]["failed"] == 5 and image_run["summary"]["duplicate"] == 0, image_run["summary"]

    def row(case, i=0):
        return rows[cases[case][i]]

    assert "3600000000 pixels" in row("decompression-bomb")["error"].replace("60000x60000 = ", "")
    assert row("decompression-bomb")["bytes"] < 1000
    assert (row("exif-rotated")["width"], row("exif-rotated")["height"]) == (48, 64)  # as displayed
    assert (row("panorama")["width"], row("panorama")["height"]) == (6000, 12)
    assert (row("tiny")["width"], row("tiny")["height"]) == (1, 1)
    assert row("wrong-extension")["format"] == "PNG" and row("wrong-extension")["path"].endswith(".png")
    assert row("wrong-content-type", 1)["format"] == "WEBP"
    assert row("cmyk-jpeg")["format"] == "JPEG"
    for name in ("animated-gif", "animated-webp"):  # the first frame, exactly
        assert row(name)["format"] in ("GIF", "WEBP") and (row(name)["width"], row(name)["height"]) == (64, 48)
    vecs = vectors(image_run["db"])
    first, second = vecs[image_run["frames"]["first"]], vecs[image_run["frames"]["second"]]
    assert not np.allclose(first, second, atol=1e-4)
    for name in ("animated-gif", "animated-webp"):
        v = vecs[cases[name][0]]
        assert np.allclose(v, first, atol=1e-5), name
    # every ok row's original is stored under its content hash
    for r in rows.values():
        if r["status"] == "ok":
            stored = image_run["db"].parent / r["path"]
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == r["content_sha256"]
    assert_consistent(image_run["db"])


# ---------------------------------------------------------------- CSV quirks: one run


def _check_idn_goes_through_proxy(env_vars: dict, url: str) -> None:
    """Refuse to run unless requests, under these variables, sends ``url`` to the proxy (no DNS lookup)."""
    import requests

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env_vars)
        proxies = requests.Session().merge_environment_settings(url, {}, None, None, None)["proxies"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert proxies.get("http", "").startswith("http://127.0.0.1:"), proxies


@pytest.fixture(scope="module")
def csv_run(servers, env, tmp_path_factory):
    srv = servers("csv")
    typ = {"Content-Type": "image/jpeg"}
    root = tmp_path_factory.mktemp("csv")
    base = srv.url("")
    srv.add("/plain.jpg", body=jpeg(700), headers=typ)
    srv.add("/a,b.jpg", body=jpeg(701), headers=typ)
    srv.add("/my%20photo%20(1).jpg", body=jpeg(702), headers=typ)
    srv.add("/caf%C3%A9/%C3%B1and%C3%BA.jpg", body=jpeg(703), headers=typ)
    srv.add("/padded.jpg", body=jpeg(705), headers=typ)
    # the IDN host: the test server is also the HTTP proxy, so the name is never resolved
    idn = "http://bücher.example/bild.jpg"
    srv.add("http://xn--bcher-kva.example/bild.jpg", body=jpeg(704), headers=typ)
    proxy = {"HTTP_PROXY": base, "http_proxy": base}
    _check_idn_goes_through_proxy({**env, **proxy}, idn)

    lines = [
        ("bom-crlf", f"{base}/plain.jpg,plain"),
        ("quoted-comma", f'"{base}/a,b.jpg","a title, with a comma"'),
        ("url-with-spaces", f"{base}/my photo (1).jpg,spaces"),
        ("non-ascii-path", f"{base}/café/ñandú.jpg,non-ascii"),
        ("idn-host", f"{idn},idn"),
        ("whitespace-around-url", f"  {base}/padded.jpg  ,padded"),
        ("empty-url", ",an empty url cell"),
        ("not-a-url", "just some words,nonsense"),
        ("not-a-url", "javascript:alert(1),script"),
        ("bad-idn-host", "http://bad..bücher.example/x.jpg,bad idn"),
        ("repeated-url", f"{base}/plain.jpg,again"),
        ("unclosed-quote", f'"{base}/unclosed.jpg,the quote never closes'),
        ("swallowed", f"{base}/swallowed.jpg,swallowed by the open quote"),
    ]
    csv = root / "quirks.csv"
    text = "url,title\r\n" + "".join(line + "\r\n" for _, line in lines)
    csv.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM and Windows line endings
    db = root / "g.db"
    summary, elapsed = ingest_ok(env, csv, db, "--timeout", 5, extra_env=proxy)
    rows = rows_by_url(db)
    return {"lines": lines, "rows": rows, "summary": summary, "db": db, "server": srv, "csv": csv, "base": base,
            "idn": idn}


CSV_EXPECTED = {
    "bom-crlf": "ok",
    "quoted-comma": "ok",
    "url-with-spaces": "ok",
    "non-ascii-path": "ok",
    "idn-host": "ok",
    "whitespace-around-url": "ok",
    "empty-url": "failed: empty-url",
    "not-a-url": "failed: invalid-url",
    "bad-idn-host": "failed: invalid-url",
    "repeated-url": "skipped",
    "unclosed-quote": "failed: malformed-row",
}


def csv_observed(run) -> dict:
    """{case: outcome} of the CSV run; rows are found by their title (the second column)."""
    rows, base = run["rows"], run["base"]
    by_title = {json.loads(r["meta"])["title"]: r for r in rows.values() if r["meta"]}
    outs: dict[str, set] = {}
    for name, line in run["lines"]:
        if name == "swallowed":  # part of the unclosed-quote case
            continue
        if name == "repeated-url":
            # the URL keeps one row (the first line's) and was requested once: the second line was skipped
            first = rows[f"{base}/plain.jpg"]
            skipped = (run["summary"]["skipped"] == 1 and run["server"].count("/plain.jpg") == 1
                       and json.loads(first["meta"])["title"] == "plain")
            outs.setdefault(name, set()).add("skipped" if skipped else "not skipped")
            continue
        if name == "unclosed-quote":
            r = next((r for r in rows.values() if (r["error"] or "").startswith("malformed-row")), None)
        elif name == "quoted-comma":
            r = by_title.get("a title, with a comma")
        else:
            r = by_title.get(line.rsplit(",", 1)[1].strip())
        outs.setdefault(name, set()).add(outcome(r))
    for name, o in outs.items():
        assert len(o) == 1, (name, o)
    return {name: o.pop() for name, o in outs.items()}


def test_csv_quirks_each_end_as_expected(csv_run):
    rows, base, srv = csv_run["rows"], csv_run["base"], csv_run["server"]
    assert csv_observed(csv_run) == CSV_EXPECTED
    s = csv_run["summary"]
    assert (s["new"], s["failed"], s["skipped"], s["duplicate"]) == (6, 5, 1, 0), s
    assert len(rows) == len(csv_run["lines"]) - 2  # the repeated URL is one row; the open quote swallowed a line
    assert srv.count("/swallowed.jpg") == 0 and srv.count("/unclosed.jpg") == 0
    malformed = next(r for r in rows.values() if (r["error"] or "").startswith("malformed-row"))
    assert "unclosed quote" in malformed["error"]
    # the URLs as stored and as requested
    assert json.loads(rows[f"{base}/a,b.jpg"]["meta"]) == {"title": "a title, with a comma"}
    assert f"{base}/my%20photo%20(1).jpg" in rows  # spaces percent-encoded
    assert f"{base}/café/ñandú.jpg" in rows  # the key keeps the text of the CSV
    assert f"{base}/padded.jpg" in rows
    requested = {p for _, p, _ in srv.requests}
    assert "/caf%C3%A9/%C3%B1and%C3%BA.jpg" in requested and "/my%20photo%20(1).jpg" in requested
    idn_requests = [(p, h) for _, p, h in srv.requests if "bcher" in p]
    assert idn_requests and idn_requests[0][0] == "http://xn--bcher-kva.example/bild.jpg"
    assert idn_requests[0][1].get("Host") == "xn--bcher-kva.example"
    assert rows[csv_run["idn"]]["status"] == "ok"
    # no value carries the BOM or a carriage return (but the malformed row, which keeps the text it swallowed)
    for r in rows.values():
        if r is malformed:
            continue
        assert "\ufeff" not in r["url"] and "\r" not in r["url"]
        if r["meta"]:
            assert all("\r" not in v and "\ufeff" not in v for v in json.loads(r["meta"]).values()), r["meta"]
    empty = next(r for r in rows.values() if r["error"] == "empty-url")
    assert empty["url"].startswith("csv:") and empty["url"].endswith(":8")  # keyed by its line
    assert_consistent(csv_run["db"])


# ---------------------------------------------------------------- per-host politeness


def test_per_host_cap_on_concurrent_requests(http_server, env, tmp_path):
    """16 workers, 12 URLs on one host: at most 4 (FetchConfig.per_host) requests to it at a time; a second host
    gets its own 4."""
    other = LocalHTTPServer()
    try:
        trackers = [ConcurrencyTracker(delay=0.3, body=jpeg(800)), ConcurrencyTracker(delay=0.3, body=jpeg(801))]
        urls = [http_server.add(f"/g/{i}.jpg", handler=trackers[0]) for i in range(12)]
        urls += [other.add(f"/h/{i}.jpg", handler=trackers[1]) for i in range(8)]
        csv = write_csv(tmp_path / "one-host.csv", urls)
        t0 = time.monotonic()
        s, _ = ingest_ok(env, csv, tmp_path / "g.db", "--workers", 16, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        other.close()
    assert trackers[0].total == 12 and trackers[1].total == 8
    assert 2 <= trackers[0].max_seen <= 4, trackers[0].max_seen
    assert 2 <= trackers[1].max_seen <= 4, trackers[1].max_seen
    assert (s["new"], s["duplicate"], s["failed"]) == (2, 18, 0), s  # same bytes per host: one ok each
    assert elapsed < 30
    assert_consistent(tmp_path / "g.db")


# ---------------------------------------------------------------- two processes, one database


def _popen_ingest(env, csv, db, *args):
    return subprocess.Popen(
        [sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--json", "-q", *map(str, args)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(procs, timeout=60):
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    return out


@pytest.mark.parametrize("overlap", ["same-csv", "overlapping-csvs"])
def test_two_ingests_on_one_database_at_once(http_server, env, tmp_path, overlap):
    n = 24
    urls = [http_server.add(f"/c/{i}.jpg", handler=slow(jpeg(900 + i), 0.05)) for i in range(n)]
    urls += [http_server.url(f"/c/missing-{i}.jpg") for i in range(4)]  # 404s
    # the same bytes at two URLs: one ok, one duplicate, whichever process gets there first
    urls.append(http_server.add("/c/copy.jpg", handler=slow(jpeg(900), 0.05)))
    if overlap == "same-csv":
        a = b = write_csv(tmp_path / "a.csv", urls)
    else:
        a = write_csv(tmp_path / "a.csv", urls[: 2 * len(urls) // 3])
        b = write_csv(tmp_path / "b.csv", list(reversed(urls[len(urls) // 3:])))
    db = tmp_path / "g.db"  # a fresh database: both create its schema and model record at the same time
    results = _finish([_popen_ingest(env, a, db, "--workers", 4, "--batch-size", 2),
                       _popen_ingest(env, b, db, "--workers", 4, "--batch-size", 2)])
    for code, stdout, stderr in results:
        assert code == 0, (code, stderr)
        assert "locked" not in stderr
        assert json.loads(stdout)["status"] == "completed"
    conn = store.connect(db)
    try:
        per_url = conn.execute("SELECT url, count(*) FROM images GROUP BY url").fetchall()
    finally:
        conn.close()
    assert sorted(u for u, _ in per_url) == sorted(urls)  # every URL, none lost
    assert all(c == 1 for _, c in per_url)  # none twice
    rows = rows_by_url(db)
    copies = {rows[urls[0]]["status"], rows[http_server.url("/c/copy.jpg")]["status"]}
    assert copies == {"ok", "duplicate"}, copies
    assert sum(r["status"] == "ok" for r in rows.values()) == n
    assert {outcome(rows[u]) for u in urls if "missing" in u} == {"failed: http-404"}
    assert assert_consistent(db) == {"ok": n, "duplicate": 1, "failed": 4}
    runs = _runs(db)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert runs[1]["started_at"] < runs[0]["finished_at"]  # the two runs did overlap


# ---------------------------------------------------------------- a folder or disk that cannot be written


def _file_size_limit(limit: int):
    """A preexec_fn capping the size of any file the child writes: writes past it fail with EFBIG."""
    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _unwritable(kind: str, tmp_path: Path):
    """(images_dir, preexec_fn or None) for one way of making the ingest's writes fail.

    A full disk (ENOSPC) cannot be produced without privileges (a small tmpfs needs mount rights; /dev/full
    cannot stand in for a folder), and as root permission bits stop nothing. So: a regular file where the images
    folder's parent should be (mkdir fails, root or not), and RLIMIT_FSIZE, which gives anyone, root included,
    the failure mode of a full disk -- a write that fails part-way (EFBIG; Python ignores SIGXFSZ).
    """
    if kind == "read-only":
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o555)
        probe = d / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            return d, None
        probe.rmdir()
        d.chmod(0o755)
        pytest.skip("running as root: permission bits do not stop writes (not-a-directory covers this error path)")
    if kind == "not-a-directory":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the images folder should go\n")
        return blocker / "images", None
    if kind == "full":  # above the database's size, below the one large image: only storing that image fails
        return tmp_path / "images", _file_size_limit(6 * 1024 * 1024)
    if kind == "database-full":  # below what the first batch of vectors needs: the database's commit fails
        # (the -wal file: ~140 KB after the migrations and the model record; the first vectors' vec0 chunk
        # of 128 x 384 floats takes it to ~380 KB)
        return tmp_path / "images", _file_size_limit(300 * 1024)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def noise_image():
    rng = np.random.default_rng(1000)
    data = save(Image.fromarray(rng.integers(0, 256, (1500, 1500, 3), dtype=np.uint8), "RGB"), "PNG", compress_level=0)
    assert len(data) > 6 * 1024 * 1024
    return data


OBSERVED_ERRORS: dict = {}  # README case -> "exit N", filled by unwritable_case
UNWRITABLE = {  # kind -> (README case, what the error line names, words it must hold)
    "read-only": ("images-dir-read-only", "images", ("cannot store images there", "Permission denied")),
    "not-a-directory": ("images-dir-not-a-directory", "images", ("cannot store images there", "Not a directory")),
    "full": ("images-dir-full", "images", ("cannot store images there", "File too large")),
    "database-full": ("database-full", "db", ("cannot write the database", "disk full")),
}


def unwritable_case(kind, http_server, env, tmp_path, noise_image) -> None:
    """Ingest whose writes fail: exit 2 with one line naming the folder (or database), a consistent database
    (store.check clean), the run recorded as crashed; then the same CSV with a usable folder completes."""
    images_dir, preexec = _unwritable(kind, tmp_path)
    case, named, words = UNWRITABLE[kind]
    small = [http_server.add(f"/s/{i}.jpg", body=jpeg(1100 + i), headers={"Content-Type": "image/jpeg"})
             for i in range(3)]
    big = http_server.add("/big.png", body=noise_image, headers={"Content-Type": "image/png"})
    urls = small + [http_server.url("/s/missing.jpg")] + ([big] if kind == "full" else [])
    csv = write_csv(tmp_path / "data.csv", urls)
    db = tmp_path / "g.db"
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--images-dir",
                        str(images_dir), "-q", "--batch-size", "8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60, preexec_fn=preexec)
    one_error_line(p, images_dir if named == "images" else db, *words)
    counts = assert_consistent(db)  # no ok row without its vector, no vector without its row
    (run,) = _runs(db)
    assert run["status"] == "crashed" and run["finished_at"] is not None
    assert counts.get("ok", 0) <= 3
    OBSERVED_ERRORS[case] = f"exit {p.returncode}"
    # the same command with a usable folder (and no size limit) then completes everything
    s, _ = ingest_ok(env, csv, db, "--images-dir", tmp_path / "usable", timeout=60)
    assert s["new"] + s["skipped"] + s["failed"] == len(urls), s
    assert assert_consistent(db) == {"ok": len(urls) - 1, "failed": 1}


@pytest.mark.parametrize("kind", list(UNWRITABLE))
def test_unwritable_images_dir_or_full_disk_is_a_clear_error_and_the_db_stays_consistent(
        kind, http_server, env, tmp_path, noise_image):
    unwritable_case(kind, http_server, env, tmp_path, noise_image)


# ---------------------------------------------------------------- interruptions


def _ok_files(db) -> dict:
    """{url: content_sha256} of the ok rows, after checking each stored original is on disk and intact."""
    result = {}
    for url, r in rows_by_url(db).items():
        if r["status"] == "ok":
            stored = Path(db).parent / r["path"]
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == r["content_sha256"], url
            result[url] = r["content_sha256"]
    return result


def _consistent_or_empty(db) -> bool:
    """True when the database holds data and passes assert_consistent; False when a run was killed before it
    recorded anything (no file, or a schema with no model and no rows yet)."""
    if not Path(db).exists():
        return False
    conn = store.connect(db)
    try:
        empty = store.get_model(conn) is None and conn.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    finally:
        conn.close()
    if empty:
        return False
    assert_consistent(db)
    return True


def test_sigint_and_sigkill_at_varied_moments_then_a_run_completes(http_server, env, tmp_path):
    """Six interrupted runs over one CSV -- SIGKILL and SIGINT, early (during start-up) and after N more rows
    were committed, and a double Ctrl-C --, each followed by the consistency check and a check that no ok
    image (row, vector or stored file) was lost; then one run completes everything."""
    n = 30
    urls = [http_server.add(f"/k/{i}.jpg", handler=slow(jpeg(1200 + i), 0.4)) for i in range(n)]
    urls += [http_server.url(f"/k/missing-{i}.jpg") for i in range(3)]
    csv = write_csv(tmp_path / "data.csv", urls)
    db = tmp_path / "g.db"
    # (signal, when): seconds after the start, or +N: once N more ok rows are committed; "twice": SIGINT x2
    rounds = [(signal.SIGKILL, 0.3), (signal.SIGINT, "+1"), (signal.SIGKILL, "+5"), (signal.SIGINT, 1.0),
              ("twice", "+4"), (signal.SIGKILL, "+3")]
    kept: dict = {}
    for sig, when in rounds:
        start = _ok_count(db)
        proc = _popen_ingest(env, csv, db, "--workers", 4, "--batch-size", 2)
        try:
            if isinstance(when, float):
                time.sleep(when)
            else:
                want = start + int(when)
                wait_until(lambda: _ok_count(db) >= want or proc.poll() is not None, timeout=60)
            assert proc.poll() is None, f"the run ended before {when}: {proc.communicate()}"
            if sig == "twice":
                proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
                proc.send_signal(signal.SIGINT)
            else:
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        elif sig == signal.SIGINT and isinstance(when, str):  # a run that was under way: a clean exit 130
            assert proc.returncode == 130, (sig, when, proc.returncode, err)
            assert "Traceback" not in err, err
        else:
            # at start-up (Python still importing) or a second Ctrl-C while the first one's clean-up runs (the
            # interpreter then dies of the SIGINT during its shutdown): 130 or death by SIGINT -- which a shell
            # reports as 130 too
            assert proc.returncode in (130, -signal.SIGINT), (sig, when, proc.returncode, err)
        if _consistent_or_empty(db):
            now = _ok_files(db)
            assert set(kept) <= set(now), "an ok image was lost"
            assert all(now[u] == h for u, h in kept.items())
            kept = now
    assert 13 <= len(kept) < n, len(kept)
    s, _ = ingest_ok(env, csv, db, "--workers", 4)
    assert s["skipped"] >= len(kept) and s["new"] + s["duplicate"] == n - len(kept), s
    assert assert_consistent(db) == {"ok": n, "failed": 3}
    assert set(_ok_files(db)) == set(urls[:n])
    runs = _runs(db)
    assert runs[-1]["status"] == "completed"
    assert all(r["status"] in ("interrupted", "completed") for r in runs), [r["status"] for r in runs]


# ---------------------------------------------------------------- 100,000 rows, flat memory


def _big_csv(path: Path, rows: int, base: str) -> Path:
    """Rows that cost no download but go through the whole pipeline: bad URLs and empty cells (failed rows,
    each committed), one URL repeated (skipped), and one row in 50 a distinct URL that answers 404."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("url,title\n")
        for i in range(rows):
            k = i % 50
            if k == 0:
                f.write(f"{base}/missing.jpg?row={i},row {i}\n")
            elif k % 3 == 0:
                f.write(f",empty {i}\n")
            elif k % 3 == 1:
                f.write(f"ftp://127.0.0.1/{i}.jpg,row {i}\n")
            else:
                f.write(f"{base}/same.jpg?x,row {i}\n")
    return path


def _peak_rss_kb(env, csv, db, timeout) -> tuple[int, dict]:
    """Run the ingest under a fresh small wrapper process and return the child's peak RSS (ru_maxrss)."""
    wrapper = ("import json, resource, subprocess, sys\n"
               f"p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout={timeout})\n"
               "print(json.dumps({'code': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],"
               " 'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    p = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "cli.py", "ingest", "--csv", str(csv),
                        "--db", str(db), "--workers", "16", "--timeout", "5", "--json", "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 15)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["code"] == 0, res["err"]
    return res["maxrss"], json.loads(res["out"])


@pytest.mark.slow
def test_100k_rows_memory_stays_flat(http_server, env, tmp_path):
    http_server.add("/same.jpg", body=b"not found", status=404)
    base = http_server.url("")
    peaks = {}
    for rows in (10_000, 100_000):
        csv = _big_csv(tmp_path / f"rows{rows}.csv", rows, base)
        db = tmp_path / f"g{rows}.db"
        peak, s = _peak_rss_kb(env, csv, db, timeout=60)
        peaks[rows] = peak
        assert s["status"] == "completed"
        assert s["failed"] + s["skipped"] == rows, s
        kinds = [i % 50 % 3 if i % 50 else "404" for i in range(rows)]
        repeats = kinds.count(2)
        assert s["skipped"] == repeats - 1, s  # the repeated URL: fetched once, then skipped
        assert s["failure_reasons"] == {"http-404": kinds.count("404") + 1, "empty-url": kinds.count(0),
                                        "invalid-url": kinds.count(1)}, s
        conn = store.connect(db)
        try:
            assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == s["failed"]
        finally:
            conn.close()
    print("peak RSS (KB):", peaks)
    assert peaks[100_000] <= peaks[10_000] + 30 * 1024, peaks  # KB: +30 MB at most for 10x the rows


# ---------------------------------------------------------------- local files (issue 10): confinement, only regular files


LOCAL_EXPECTED = {
    "local-file": "ok",
    "local-outside-folder": "failed: outside-folder",
    "local-fifo": "failed: not-a-file",
    "local-device": "failed: not-a-file",
    "local-huge-sparse": "failed: too-large",
}


@pytest.fixture(scope="module")
def local_run(env, tmp_path_factory):
    """A CSV naming local files (in its folder, outside it by every route, a FIFO, a sparse file of up to 16 TB), then
    ``--dir`` on the same folder with --files-root / (a FIFO and a symlink to /dev/zero named *.jpg): each run
    must end (no hang, no MemoryError) with every row recorded."""
    top = tmp_path_factory.mktemp("local")
    folder, outside = top / "data", top / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "good.png").write_bytes(png_of(picture(900)))
    (folder / "sub" / "other.png").write_bytes(png_of(picture(901)))
    (outside / "secret.png").write_bytes(png_of(picture(902)))  # an image: must not end up ok
    (outside / "secret.txt").write_text("password=hunter2\n")
    (folder / "link-out.png").symlink_to(outside / "secret.png")
    (folder / "link-in.png").symlink_to(folder / "sub" / "other.png")
    os.mkfifo(folder / "pipe.jpg")
    with open(folder / "huge.png", "wb") as f:  # sparse: as large as this file system allows, from 16 TB down
        for exp in (44, 42, 40, 38, 36, 34):
            try:
                f.truncate(2 ** exp)
                break
            except OSError:
                continue
    cases = {
        "local-file": ["good.png", "sub/other.png"],
        "local-outside-folder": ["/etc/passwd", "../outside/secret.txt", str(outside / "secret.png"),
                                 "link-out.png", "/proc/self/environ", "../../../../../../etc/hostname"],
        "local-fifo": ["pipe.jpg"],
        "local-huge-sparse": ["huge.png"],
    }
    csv = folder / "files.csv"
    csv.write_text("path,title\n" + "".join(f"{cell},{name} {i}\n" for name, cells in cases.items()
                                            for i, cell in enumerate(cells)))
    db = top / "g.db"
    summary, _ = ingest_ok(env, csv, db, "--max-mb", MAX_MB, timeout=60)
    rows = rows_by_url(db)
    # --dir over the same folder, every file allowed (--files-root /): the FIFO and the device are still refused
    (folder / "zero.jpg").symlink_to("/dev/zero")
    db2 = top / "dir.db"
    p = subprocess.run([sys.executable, "cli.py", "ingest", "--dir", str(folder), "--db", str(db2), "--files-root",
                        "/", "--max-mb", str(MAX_MB), "--json", "-q"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    dir_summary = json.loads(p.stdout)
    return {"cases": cases, "rows": rows, "summary": summary, "db": db, "folder": folder, "outside": outside,
            "dir_rows": rows_by_url(db2), "dir_summary": dir_summary}


def local_observed(run) -> dict:
    by_title = {json.loads(r["meta"])["title"]: r for r in run["rows"].values() if r["meta"]}
    outs: dict[str, set] = {}
    for name, cells in run["cases"].items():
        for i, _ in enumerate(cells):
            outs.setdefault(name, set()).add(outcome(by_title.get(f"{name} {i}")))
    dir_rows = {Path(u).name: r for u, r in run["dir_rows"].items()}
    outs.setdefault("local-fifo", set()).add(outcome(dir_rows.get("pipe.jpg")))
    outs.setdefault("local-device", set()).add(outcome(dir_rows.get("zero.jpg")))
    outs.setdefault("local-huge-sparse", set()).add(outcome(dir_rows.get("huge.png")))
    for name, o in outs.items():
        assert len(o) == 1, (name, o)
    return {name: o.pop() for name, o in outs.items()}


def test_local_files_are_confined_and_only_regular_files_are_read(local_run):
    assert local_observed(local_run) == LOCAL_EXPECTED
    by_title = {json.loads(r["meta"])["title"]: r for r in local_run["rows"].values() if r["meta"]}
    for i, cell in enumerate(local_run["cases"]["local-outside-folder"]):
        r = by_title[f"local-outside-folder {i}"]
        # nothing about the file is stored: no size, no hash, no mtime, no dimensions
        assert (r["bytes"], r["content_sha256"], r["mtime"], r["width"], r["path"]) == (None,) * 5, r
        assert "--files-root" in r["error"]
    assert not any("hunter2" in (r["error"] or "") for r in local_run["rows"].values())
    huge = by_title["local-huge-sparse 0"]
    assert huge["bytes"] is None and huge["content_sha256"] is None and "not read" in huge["error"]
    assert local_run["dir_summary"]["status"] == "completed"
    dir_rows = {Path(u).name: r for u, r in local_run["dir_rows"].items()}
    # with --files-root / the symlink out is read; the symlink in is a copy of other.png
    assert {n for n, r in dir_rows.items() if r["status"] == "ok"} == {"good.png", "link-in.png", "link-out.png"}
    assert dir_rows["other.png"]["status"] == "duplicate"
    assert "FIFO" in dir_rows["pipe.jpg"]["error"] and "device" in dir_rows["zero.jpg"]["error"]


def test_files_root_names_another_folder_to_read_from(local_run, env, tmp_path):
    folder, outside = local_run["folder"], local_run["outside"]
    csv = folder / "outside.csv"
    csv.write_text("path\n../outside/secret.png\n")
    db = tmp_path / "g.db"
    s, _ = ingest_ok(env, csv, db, "--files-root", folder.parent)
    assert s["new"] == 1, s
    (row,) = rows_by_url(db).values()
    assert row["status"] == "ok" and row["url"] == str((outside / "secret.png").resolve())


# ---------------------------------------------------------------- databases that are not (usable) galleries (issue 10)


def run_main(*args, extra_env: dict | None = None) -> tuple[int, str]:
    """``cli.main()`` in this process (so a test can shorten the busy timeout): (exit code, stderr)."""
    import contextlib

    import cli as C

    err = io.StringIO()
    saved_argv, saved_term = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["cli.py", *map(str, args)]
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
            for k, v in (extra_env or {}).items():
                mp.setenv(k, v)
            try:
                C.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, saved_term)
    return code, err.getvalue()


def _one_line_exit(code: int, err: str, *words: str) -> str:
    """``exit N`` when stderr is one "Error:" line holding every word (and no traceback), else what happened."""
    lines = err.strip().splitlines()
    if len(lines) == 1 and lines[0].startswith("Error: ") and all(w in lines[0] for w in words):
        return f"exit {code}"
    return f"exit {code}: {err!r}"


DB_EXPECTED = {"not-a-gallery": "exit 2", "damaged-database": "exit 2", "database-locked": "exit 2",
               "older-schema": "exit 2"}


@pytest.fixture(scope="module")
def db_run(weights, tmp_path_factory):
    """{case: outcome} for the database cases of the README table, each observed through cli.main()."""
    import sqlite3

    root = tmp_path_factory.mktemp("dbs")
    weights_env = {"DINOV2_WEIGHTS": str(weights), "DINOV2_OFFLINE": "1", "DINOV2_CACHE": str(root / "cache")}
    seen, digests_kept = {}, True

    # not a gallery: an unrelated SQLite file, a 0-byte file, a foreign images table -- refused, left unchanged
    outs = set()
    for name, make, words in (
            ("other.db", lambda c: c.execute("CREATE TABLE notes (body TEXT)"), "not a gallery database"),
            ("zero.db", None, "empty file"),
            ("foreign.db", lambda c: c.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, name TEXT)"),
             "images table is not a gallery's")):
        path = root / name
        if make is None:
            path.write_bytes(b"")
        else:
            conn = sqlite3.connect(path)
            make(conn)
            conn.commit()
            conn.close()
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        for command in (("stats",), ("query", "--id", "1"), ("doctor",)):
            outs.add(_one_line_exit(*run_main(*command, "--db", path), words))
        digests_kept &= hashlib.sha256(path.read_bytes()).hexdigest() == before
    seen["not-a-gallery"] = outs.pop() if len(outs) == 1 and digests_kept else f"{outs} unchanged={digests_kept}"

    # a gallery with a page of garbage in its images table: a query and ingest give one line, ingest writes nothing
    # (stats may still answer: its counts come from an index)
    folder = root / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_of(picture(950)))
    gallery = root / "damaged.db"
    code, err = run_main("ingest", "--dir", folder, "--db", gallery, "-q", extra_env=weights_env)
    assert code == 0, err
    conn = store.connect(gallery)
    store.commit_batch(conn, [dict(status="failed", url=f"http://127.0.0.1:9/{i}", error="http-404: " + "x" * 200)
                              for i in range(100)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root_page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'images'").fetchone()[0]
    conn.close()
    with open(gallery, "r+b") as f:
        f.seek((root_page - 1) * 4096 + 12)
        f.write(b"\xff" * (4096 - 12))
    before = hashlib.sha256(gallery.read_bytes()).hexdigest()
    (folder / "b.png").write_bytes(png_of(picture(951)))
    outs = {_one_line_exit(*run_main("query", "--id", "1", "--db", gallery), "damaged", "--recover"),
            _one_line_exit(*run_main("ingest", "--dir", folder, "--db", gallery, "-q", extra_env=weights_env),
                           "damaged", "nothing was written", "--recover")}
    kept = hashlib.sha256(gallery.read_bytes()).hexdigest() == before
    seen["damaged-database"] = outs.pop() if len(outs) == 1 and kept else f"{outs} unchanged={kept}"

    # locked by another program for longer than the busy timeout (shortened here from 30 s)
    locked = root / "locked.db"
    code, err = run_main("ingest", "--dir", folder, "--db", locked, "-q", extra_env=weights_env)
    assert code == 0, err
    (folder / "c.png").write_bytes(png_of(picture(952)))
    other = store.connect(locked)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(store, "BUSY_TIMEOUT_S", 0.5)
            seen["database-locked"] = _one_line_exit(
                *run_main("ingest", "--dir", folder, "--db", locked, "-q", extra_env=weights_env),
                "locked by another program")
    finally:
        other.execute("ROLLBACK")
        other.close()

    # a gallery of an older schema that the reader cannot read as it is: the command that upgrades it
    old = root / "old.db"
    conn = store.connect(old, apply_migrations=False)
    store.migrate(conn, upto=1)
    conn.close()
    seen["older-schema"] = _one_line_exit(*run_main("stats", "--db", old), "older",
                                          f"python cli.py doctor --db {old} --repair")
    return seen


def test_databases_that_are_not_usable_galleries_get_one_line_and_stay_unchanged(db_run):
    assert db_run == DB_EXPECTED


# ---------------------------------------------------------------- the README table


def readme_table() -> dict:
    """{case: outcome} from README's "What happens to bad input" table: the first column names one or more cases
    in backticks, the last column's first backticked text is the outcome."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## What happens to bad input\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no '## What happens to bad input' section"
    section = m.group(1)
    table = {}
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert len(lines) > 2, "no table in the section"
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        out = re.search(r"`([^`]+)`", cells[-1])
        assert names and out, f"row without case names or outcome: {ln}"
        for name in names:
            assert name not in table, f"case {name} listed twice"
            table[name] = out.group(1)
    return table


def test_readme_bad_input_table(server_run, image_run, csv_run, untrusted_run, blocked_run, fairness_run,
                                csv_kinds_run, local_run, db_run, http_server, env, tmp_path, noise_image):
    seen = {**observed(server_run), **observed(image_run), **csv_observed(csv_run), **untrusted_observed(untrusted_run),
            **observed(blocked_run), **observed(fairness_run), **csv_kinds_run["seen"], **local_observed(local_run),
            **db_run}
    # the images-folder rows: observed here (a fresh run) unless the parametrized test already ran
    for kind in ("not-a-directory", "full", "database-full"):
        if UNWRITABLE[kind][0] not in OBSERVED_ERRORS:
            (tmp_path / kind).mkdir()
            unwritable_case(kind, http_server, env, tmp_path / kind, noise_image)
    seen.update(OBSERVED_ERRORS)
    table = readme_table()
    for case, promised in table.items():
        assert case in seen, f"README case {case!r} is not exercised by tests/test_hostile.py"
        assert seen[case] == promised, f"README says {case!r} -> {promised!r}; observed {seen[case]!r}"
    # every failure tag the runs produced is in the table
    tags = {v for v in seen.values() if v.startswith("failed: ")}
    assert tags <= set(table.values()), tags - set(table.values())


# ---------------------------------------------------------------- issue 10: the memory budget of an ingest


def test_ingest_with_256_workers_stays_within_its_memory_budget(http_server, weights, tmp_path, monkeypatch):
    """--workers 256 and a 2 MB budget: downloads in flight plus images waiting for the encoder never hold more
    than the budget (plus at most one preprocessed image, granted when no image waits, so the encoder is never
    starved); every image still ends ok. Counted by the run's own budget, not timed."""
    from retrieval import ingest as I
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.fetch import MemoryBudget
    from test_ingest import noise_png

    made = []

    class Spy(MemoryBudget):
        def __init__(self, limit):
            super().__init__(limit)
            made.append(self)

    monkeypatch.setattr(I, "MemoryBudget", Spy)
    bodies = [noise_png(1300 + i, 150) for i in range(60)]  # ~68 KB each, incompressible, all distinct
    urls = [http_server.add(f"/m/{i}.png", body=b, headers={"Content-Type": "image/png"}) for i, b in enumerate(bodies)]
    csv, db = write_csv(tmp_path / "data.csv", urls), tmp_path / "g.db"
    conn = store.connect(db)
    try:
        s = I.ingest_csv(conn, db, csv, load_encoder(weights, EncoderSettings(batch_size=8)),
                         I.IngestOptions(workers=256, memory_mb=2, fetch=I.FetchConfig(per_host=256)))
    finally:
        conn.close()
    assert (s.new, s.failed, s.status) == (60, 0, "completed"), s
    (budget,) = made
    one_image = 3 * 224 * 224 * 4  # a preprocessed 224 x 224 image, float32
    assert budget.limit == 2 * 2**20
    assert budget.peak <= budget.limit + one_image, budget.peak
    assert budget.waits > 0  # 256 downloads of 68 KB (17 MB) did not fit at once: some waited
    assert budget.in_use == 0 and budget.pixels == 0  # everything given back
    assert s.memory_peak == budget.peak and s.as_dict()["memory_peak_mb"] <= 2.6
    assert_consistent(db)


# ---------------------------------------------------------------- issue 10: untrusted CSVs and servers (one run each)

ESC_TEXT = "\x1b]0;pwned\x07\x1b[31m\x9b2J"  # retitle the terminal, red, a C1 CSI


def _raw_unsafe(text: str) -> bool:
    """Whether ``text`` holds a control or bidi character a terminal would act on (newline and tab aside)."""
    from retrieval.safety import has_unsafe

    return has_unsafe(text.replace("\r\n", "\n"))


def _cli(env, *args, timeout=90):
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def untrusted_run(servers, env, tmp_path_factory):
    """One ingest (text output, not --json) of a CSV whose name, cells, local file names and servers carry
    terminal escapes and credentials, then stats and query (text and JSON) on the gallery: every output kept."""
    import base64

    srv, other = servers("untrusted"), servers("untrusted-other")
    typ = {"Content-Type": "image/jpeg"}
    root = tmp_path_factory.mktemp("untrusted")
    cases: dict[str, list[str]] = {}

    def status_line(req):  # an unknown status whose reason phrase is a terminal escape
        req.send_response(599, "Bad " + ESC_TEXT)
        req.send_header("Content-Length", "0")
        req.end_headers()

    cases["escape-in-status-line"] = [srv.add("/status.jpg", handler=status_line)]
    cases["escape-in-redirect"] = [srv.add("/redirect.jpg", status=302, headers={"Location": "/x" + ESC_TEXT})]
    secret = base64.b64encode(b"user:s3cret").decode()

    def private(req):
        ok = req.headers.get("Authorization") == f"Basic {secret}"
        body = jpeg(1400) if ok else b"who are you?"
        req.send_response(200 if ok else 401)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    srv.add("/private.jpg", handler=private)
    other.add("/moved.jpg", body=jpeg(1401), headers=typ)
    srv.add("/to-other.jpg", status=302, headers={"Location": other.url("/moved.jpg")})
    base = srv.url("").replace("http://", "http://user:s3cret@")
    cases["credentials-in-url"] = [f"{base}/private.jpg", f"{base}/to-other.jpg"]
    (root / ("cat" + ESC_TEXT + ".jpg")).write_bytes(jpeg(1402))
    lines = [f"{u},plain" for u in cases["escape-in-status-line"] + cases["escape-in-redirect"]]
    lines += [f"{u},creds" for u in cases["credentials-in-url"]]
    lines += [f"{base}/missing.jpg,creds 404"]
    lines += [f'"cat{ESC_TEXT}.jpg",a local file', f'{srv.url("/cell" + ESC_TEXT + ".jpg")},bad url cell',
              f'{srv.add("/titled.jpg", body=jpeg(1403), headers=typ)},"title {ESC_TEXT} \u202eevil\u202c"']
    csv = root / ("list" + ESC_TEXT + ".csv")
    csv.write_text("url,title\n" + "\n".join(lines) + "\n", encoding="utf-8")
    db = root / "g.db"
    p = _cli(env, "ingest", "--csv", csv, "--db", db)
    assert p.returncode == 0, p.stderr
    outputs = {"ingest": p.stdout + p.stderr}
    outputs["stats"] = _cli(env, "stats", "--db", db).stdout
    q = _cli(env, "query", root / ("cat" + ESC_TEXT + ".jpg"), "--db", db, "-k", "10")
    outputs["query"] = q.stdout + q.stderr
    qj = _cli(env, "query", root / ("cat" + ESC_TEXT + ".jpg"), "--db", db, "-k", "10", "--json")
    outputs["query-json"] = qj.stdout + qj.stderr
    missing = _cli(env, "ingest", "--csv", root / ("nothing" + ESC_TEXT + ".csv"), "--db", db)
    outputs["error"] = missing.stdout + missing.stderr
    qurl = _cli(env, "query", "--url", f"{base}/missing.jpg", "--db", db)
    outputs["query-url-error"] = qurl.stdout + qurl.stderr
    return {"cases": cases, "rows": rows_by_url(db), "db": db, "outputs": outputs, "csv": csv, "root": root,
            "query_json": json.loads(qj.stdout), "servers": (srv, other), "secret": secret}


def untrusted_observed(run) -> dict:
    rows, outputs = run["rows"], run["outputs"]
    seen = {}
    clean_outputs = not any(_raw_unsafe(o) for o in outputs.values())
    stored_clean = all(not _raw_unsafe(r["error"] or "") for r in rows.values())
    for name in ("escape-in-status-line", "escape-in-redirect"):
        (url,) = run["cases"][name]
        error = rows[url]["error"] or ""
        seen[name] = "escaped" if clean_outputs and stored_clean and "\\u001b" in error else outcome(rows[url])
    by_title = {json.loads(r["meta"])["title"]: r for r in rows.values() if r["meta"]}
    cell = by_title["bad url cell"]
    seen["escape-in-csv-cell"] = ("escaped" if clean_outputs and stored_clean and cell["error"].startswith("invalid-url")
                                  and "\\u001b" in outputs["query-json"] else "raw")
    local = by_title["a local file"]
    seen["escape-in-file-name"] = ("escaped" if clean_outputs and local["status"] == "ok"
                                   and "cat\\u001b]0;pwned\\u0007" in outputs["query"] else "raw")
    creds = {outcome(rows.get(u.replace("user:s3cret@", ""))) for u in run["cases"]["credentials-in-url"]}
    seen["credentials-in-url"] = creds.pop() if len(creds) == 1 else str(creds)
    return seen


def test_untrusted_text_and_credentials_never_reach_the_terminal_or_the_database(untrusted_run):
    run, rows, outputs = untrusted_run, untrusted_run["rows"], untrusted_run["outputs"]
    assert untrusted_observed(run) == {"escape-in-status-line": "escaped", "escape-in-redirect": "escaped",
                                       "escape-in-csv-cell": "escaped", "escape-in-file-name": "escaped",
                                       "credentials-in-url": "ok"}
    for name, text in outputs.items():
        assert not _raw_unsafe(text), (name, text)
        assert "s3cret" not in text, (name, text)
    assert "\\u001b" in outputs["error"] and outputs["error"].startswith("Error: ")  # a CSV's own name
    assert "http-404" in outputs["query-url-error"]
    status = rows[run["cases"]["escape-in-status-line"][0]]
    assert status["error"].startswith("http-599: Bad \\u001b]0;pwned\\u0007") and status["http_status"] == 599
    # nothing stored holds the password; the rows are keyed without it
    conn = store.connect(run["db"])
    try:
        dump = "\n".join(str(tuple(r)) for r in conn.execute("SELECT * FROM images"))
    finally:
        conn.close()
    assert "s3cret" not in dump
    srv, other = run["servers"]
    sent = [h.get("Authorization") for _, p, h in srv.requests if p == "/private.jpg"]
    assert sent == [f"Basic {run['secret']}"]  # the credentials went to their own host
    assert all("Authorization" not in h for _, _, h in other.requests)  # never to a redirect's other host
    # JSON output stays valid and exact: the title comes back with its escape and bidi characters
    titles = {r["meta"].get("title") for r in run["query_json"] if r["meta"]}
    assert f"title {ESC_TEXT} \u202eevil\u202c" in titles
    assert_consistent(run["db"])


@pytest.fixture(scope="module")
def blocked_run(servers, env, tmp_path_factory):
    """An ingest without DINOV2_ALLOW_PRIVATE of URLs that spell the test server's loopback address every way."""
    srv = servers("blocked")
    port = srv.port
    srv.add("/a.jpg", body=jpeg(1410), headers={"Content-Type": "image/jpeg"})
    srv.add("/hop.jpg", status=302, headers={"Location": f"http://127.1:{port}/a.jpg"})
    urls = [f"http://{h}:{port}/a.jpg" for h in ("127.0.0.1", "127.1", "2130706433", "0x7f.1", "017700000001",
                                                  "localhost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0")]
    urls += ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.jpg", "http://[fe80::1]/x.jpg",
             "http://224.0.0.1/x.jpg", srv.url("/hop.jpg")]
    root = tmp_path_factory.mktemp("blocked")
    csv, db = write_csv(root / "data.csv", urls), root / "g.db"
    strict = {k: v for k, v in env.items() if k != "DINOV2_ALLOW_PRIVATE"}
    summary, _ = ingest_ok(strict, csv, db)
    return {"cases": {"blocked-address": urls}, "rows": rows_by_url(db), "summary": summary, "server": srv}


def test_private_addresses_are_refused_in_every_spelling(blocked_run):
    assert observed(blocked_run) == {"blocked-address": "failed: blocked-address"}
    assert blocked_run["server"].count() == 0  # nothing was sent, not even the redirect's first hop
    assert blocked_run["summary"]["failure_reasons"] == {"blocked-address": len(blocked_run["cases"]["blocked-address"])}
    assert all("--allow-private" in r["error"] for r in blocked_run["rows"].values())


@pytest.fixture(scope="module")
def fairness_run(servers, env, tmp_path_factory):
    """12 rows on a host answering 429 with Retry-After 60 s, then 4 rows on another host (--timeout 3)."""
    busy, good = servers("throttling"), servers("throttling-neighbour")
    throttled = [busy.add(f"/t/{i}.jpg", status=429, body=b"slow down", headers={"Retry-After": "60"})
                 for i in range(12)]
    fine = [good.add(f"/g/{i}.jpg", body=jpeg(1420 + i), headers={"Content-Type": "image/jpeg"}) for i in range(4)]
    root = tmp_path_factory.mktemp("fairness")
    csv, db = write_csv(root / "data.csv", throttled + fine), root / "g.db"
    summary, elapsed = ingest_ok(env, csv, db, "--timeout", 3, "--workers", 8)
    # the first rows of the throttled host were tried (4 at once: its per-host share); the rest were not
    return {"cases": {"throttled-host": fine, "failing-host": throttled[4:]}, "rows": rows_by_url(db),
            "summary": summary, "seconds": elapsed, "tried": throttled[:4], "busy": busy, "db": db}


def test_a_throttling_host_holds_back_only_its_own_rows_and_is_given_up_fast(fairness_run):
    run = fairness_run
    assert observed(run) == {"throttled-host": "ok", "failing-host": "failed: host-failing"}
    assert {outcome(run["rows"][u]) for u in run["tried"]} <= {"failed: http-429", "failed: host-busy"}
    assert run["busy"].count() <= 4  # the given-up rows made no request
    assert run["seconds"] < 20, run["seconds"]  # not the 60 s Retry-After
    assert all(run["rows"][u]["error"].startswith("host-failing: not tried") for u in run["cases"]["failing-host"])
    from retrieval.ingest import is_transient

    assert all(is_transient(run["rows"][u]["error"]) for u in run["cases"]["failing-host"])  # a later run retries


@pytest.fixture(scope="module")
def csv_kinds_run(servers, env, tmp_path_factory):
    """CSVs whose URL column is not named url, saved as UTF-16, a binary file, a --url-column naming nothing."""
    srv = servers("csv-kinds")
    root = tmp_path_factory.mktemp("csv-kinds")
    a = srv.add("/p.jpg", body=jpeg(1430), headers={"Content-Type": "image/jpeg"})
    b = srv.add("/u16.jpg", body=jpeg(1431), headers={"Content-Type": "image/jpeg"})
    seen: dict[str, str] = {}
    (root / "ids.csv").write_text(f"id,photo_url\n7,{a}\n", encoding="utf-8")
    s, _ = ingest_ok(env, root / "ids.csv", root / "g.db")
    row = rows_by_url(root / "g.db").get(a)
    seen["url-column-by-content"] = outcome(row) if (s["url_column"], s["url_column_how"]) == ("photo_url", "by content") \
        and json.loads(row["meta"]) == {"id": "7"} else f"column {s['url_column']}"
    (root / "excel.csv").write_bytes(f"url\ttitle\r\n{b}\tcafé\r\n".encode("utf-16"))
    ingest_ok(env, root / "excel.csv", root / "g.db")
    row = rows_by_url(root / "g.db").get(b)
    seen["utf-16-csv"] = outcome(row) if row and json.loads(row["meta"]) == {"title": "café"} else "missing"
    (root / "photo.csv").write_bytes(save(picture(1432), "PNG"))
    refused = {}
    for name, args in (("binary-csv", ["--csv", root / "photo.csv"]),
                       ("url-column-missing", ["--csv", root / "ids.csv", "--url-column", "nope"])):
        db = root / f"{name}.db"
        p = _cli(env, "ingest", *args, "--db", db)
        one_error_line(p, args[1])
        assert not db.exists(), name  # refused before a gallery was created
        seen[name] = f"exit {p.returncode}"
        refused[name] = p.stderr
    return {"seen": seen, "stderr": refused}


def test_csv_url_column_utf16_and_binary_files(csv_kinds_run):
    assert csv_kinds_run["seen"] == {"url-column-by-content": "ok", "utf-16-csv": "ok", "binary-csv": "exit 2",
                                     "url-column-missing": "exit 2"}
    assert "not a text CSV file" in csv_kinds_run["stderr"]["binary-csv"]
    assert "PNG image" in csv_kinds_run["stderr"]["binary-csv"]
    assert "no column named 'nope'" in csv_kinds_run["stderr"]["url-column-missing"]
