"""Web app benchmark (``cli.py serve``): search by upload and by id over HTTP, and how long the results page
takes to render in headless Chromium, on a large gallery.

    .venv/bin/python bench/bench_web.py                       # base, 100,000 images (~5-10 min the first time)
    .venv/bin/python bench/bench_web.py --n 10000 --variant small --no-browser   # a quick smoke

The targets (issue 13), with the base model and a 100k gallery: search by upload <= 0.4 s and by id <= 0.1 s
(median), the page of results rendered in a browser in <= 1 s.

What it does, in ONE run (figures side by side on the same, possibly busy, machine):

1. Random weights of the variant's real shapes (``random_params(official_config(VARIANT), 0)``), and a gallery
   of ``--n`` images: synthetic L2-normalised vectors inserted through ``store.commit_batch`` in batches of
   1,000 (as the ingest does), each row pointing at one of 64 real JPEG originals (640x480) stored beside the
   database, with a ``title`` in its metadata. Kept in ``--workdir`` and reused by later runs with the same
   ``--n`` and variant (delete the folder to rebuild).
2. ``cli.py serve`` in a subprocess on 127.0.0.1 (the real server: uvicorn, the JSON API, the model warm).
3. Over HTTP (``requests``, loopback): ``GET /api/search?id=..&k=K`` for ``--repeats`` different ids, and
   ``POST /api/search`` with ``--repeats`` different 640x480 JPEGs (distinct bytes: nothing is cached).
   Beside them, in this process on the same database: ``store.search`` alone and the encoder alone
   (decode + preprocess + forward pass), so the HTTP figures can be split into their parts.
4. Headless Chromium (unless ``--no-browser``): ``/?id=..&k=50``; the time from the navigation's start to
   every one of the 50 thumbnails loaded, measured in the page (``performance.now()``); first with thumbnails
   made lazily from the originals (cold: each id's results not seen before), then again (cached in the
   database).

Prints the medians, the targets and the ratios. Thumbnails made during a run are cached in the gallery;
the next run deletes them first.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from retrieval import store  # noqa: E402


def photo(seed: int, size=(640, 480)) -> bytes:
    """A photo-like JPEG (smooth colours, some noise): distinct bytes for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * 100 + 128,
                  np.cos(y / rng.uniform(20, 80) + rng.uniform(0, 6)) * 100 + 128,
                  (x + y) / (w + h) * 255], axis=-1)
    a += rng.normal(0, 12, a.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def build(workdir: Path, n: int, variant: str) -> tuple[Path, Path]:
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / f"{variant}.safetensors"
    if not weights.exists():
        print(f"random {variant} weights -> {weights}", flush=True)
        save_params(random_params(official_config(variant), seed=0), weights)
    db = workdir / f"gallery_{variant}_{n}.db"
    done = workdir / (db.name + ".done")
    if done.exists():
        return db, weights
    for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
        p.unlink(missing_ok=True)
    originals = workdir / "originals"
    originals.mkdir(exist_ok=True)
    paths = []
    for i in range(64):
        p = originals / f"{i:02d}.jpg"
        if not p.exists():
            p.write_bytes(photo(1000 + i))
        paths.append(p)
    encoder = load_encoder(weights, EncoderSettings())
    conn = store.connect(db)
    store.ensure_model(conn, encoder.record())
    dim = encoder.dim
    del encoder
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        m = min(1000, n - start)
        v = rng.normal(size=(m, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        outcomes = [{"status": "ok", "vector": v[j], "url": f"http://bench.invalid/{start + j}.jpg",
                     "content_sha256": hashlib.sha256(str(start + j).encode()).hexdigest(), "width": 640,
                     "height": 480, "format": "JPEG", "bytes": 0, "path": str(paths[(start + j) % 64]),
                     "meta": {"title": f"image {start + j}"}} for j in range(m)]
        store.commit_batch(conn, outcomes)
        if (start // 1000) % 10 == 9:
            print(f"  {start + m} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    conn.close()
    done.write_text("ok\n")
    print(f"gallery of {n} -> {db} in {time.perf_counter() - t0:.0f} s", flush=True)
    return db, weights


def gemm_rate(size: int = 2048, repeats: int = 3) -> float:
    """This machine's float32 GEMM rate now (GFLOP/s, best of ``repeats``, NumPy's BLAS threads): the
    ceiling the encoder's matrix products run under."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def upload_gflop(variant: str, data: bytes) -> float:
    """The forward pass's GFLOP for one upload as the gallery preprocesses it (bench_encoder's count)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_encoder import gflop

    from retrieval.preprocess import _resize_short_shape
    from retrieval.variants import official_config

    cfg = official_config(variant)
    w, h = Image.open(io.BytesIO(data)).size
    a, b = _resize_short_shape(w, h, 224)
    return gflop(cfg, a // cfg.patch * cfg.patch, b // cfg.patch * cfg.patch, True)


def median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--variant", default="base")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_web")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()

    from webtools import Server, base_env  # tests/webtools.py: the same server and browser set-up as the tests

    db, weights = build(args.workdir, args.n, args.variant)
    env = base_env(weights, args.workdir / "cache")
    rng = np.random.default_rng(1)
    conn = store.connect(db)
    with store.transaction(conn):  # the "cold" page must make its thumbnails: forget those of earlier runs
        conn.execute("DELETE FROM thumbnails")
    n_rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    ids = [int(x) for x in rng.choice(np.arange(1, n_rows + 1), size=args.repeats * 3, replace=False)]

    t0 = time.perf_counter()
    srv = Server(env, db)
    first_answer = time.perf_counter() - t0
    try:
        srv.wait_model(timeout=600)
        model = srv.http.get(srv.url("/api/health")).json()["model"]
        srv.http.get(srv.url("/api/search"), params={"id": ids[-1], "k": args.k})  # warm the connection
        by_id = []
        for i in ids[:args.repeats]:
            t = time.perf_counter()
            r = srv.http.get(srv.url("/api/search"), params={"id": i, "k": args.k})
            by_id.append(time.perf_counter() - t)
            assert r.status_code == 200 and len(r.json()["results"]) == args.k, r.text[:300]
        uploads = [photo(5000 + i) for i in range(args.repeats + 1)]
        srv.http.post(srv.url("/api/search"), params={"k": args.k}, files={"image": ("w.jpg", uploads[-1])})
        by_upload = []
        for data in uploads[:args.repeats]:
            t = time.perf_counter()
            r = srv.http.post(srv.url("/api/search"), params={"k": args.k}, files={"image": ("q.jpg", data)})
            by_upload.append(time.perf_counter() - t)
            assert r.status_code == 200 and len(r.json()["results"]) == args.k, r.text[:300]

        # the parts, in this process, on the same database
        from retrieval import query
        from retrieval.decode import decode
        from retrieval.encoder import encode_images, l2_normalise

        enc = query.gallery_encoder(conn, weights)
        l2_normalise(encode_images(enc, [decode(uploads[-1], "warm")]))
        gemm = [gemm_rate()]
        search_alone, encode_alone = [], []
        for i, data in zip(ids[:args.repeats], uploads[:args.repeats]):
            v = store.get_vector(conn, i)
            t = time.perf_counter()
            store.search(conn, v, args.k)
            search_alone.append(time.perf_counter() - t)
            t = time.perf_counter()
            l2_normalise(encode_images(enc, [decode(data, "q")]))
            encode_alone.append(time.perf_counter() - t)
        gemm.append(gemm_rate())
        del enc

        render_cold = render_warm = None
        if not args.no_browser:
            from webtools import browser_or_skip, close_browser

            driver = browser_or_skip()
            try:
                wait_js = ("const done = arguments[arguments.length - 1];"
                           "const check = () => { const imgs = [...document.querySelectorAll('#grid img')];"
                           " if (imgs.length === 50 && imgs.every(i => i.complete && i.naturalWidth > 0))"
                           " done(performance.now()); else setTimeout(check, 5); }; check();")
                driver.set_script_timeout(60)
                driver.get(srv.url("/"))  # the browser's own start-up, static files cached
                cold, warm = [], []
                for i in ids[args.repeats:args.repeats + 5]:
                    driver.get(srv.url(f"/?id={i}&k=50"))
                    cold.append(driver.execute_async_script(wait_js) / 1000)
                    driver.get(srv.url(f"/?id={i}&k=50"))
                    warm.append(driver.execute_async_script(wait_js) / 1000)
                render_cold, render_warm = median(cold), median(warm)
            finally:
                close_browser(driver)
    finally:
        srv.stop()
        conn.close()

    figures = {
        "gallery": args.n, "variant": args.variant, "k": args.k, "repeats": args.repeats,
        "server_first_answer_s": round(first_answer, 2), "model_load_s": model["load_seconds"],
        "by_id_median_s": median(by_id), "by_upload_median_s": median(by_upload),
        "store_search_alone_median_s": median(search_alone), "encode_alone_median_s": median(encode_alone),
        "render_50_cold_median_s": render_cold, "render_50_cached_median_s": render_warm,
        "gemm_gflops_before_after": [round(g, 1) for g in gemm], "upload_forward_gflop": upload_gflop(args.variant, uploads[0]),
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}, indent=2))
    print()
    print(f"| measure ({args.variant}, {args.n:,} images, k={args.k}) | median | target | ratio to target |")
    print("|---|---:|---:|---:|")
    for label, value, target in (
        ("search by id over HTTP", figures["by_id_median_s"], 0.1),
        ("search by upload over HTTP", figures["by_upload_median_s"], 0.4),
        ("  of which store.search alone", figures["store_search_alone_median_s"], None),
        ("  of which decode + encode alone", figures["encode_alone_median_s"], None),
        ("results page, 50 thumbnails made lazily", render_cold, 1.0),
        ("results page, 50 thumbnails cached", render_warm, 1.0),
    ):
        if value is None:
            continue
        ratio = f"{value / target:.2f}" if target else ""
        print(f"| {label} | {value:.3f} s | {f'{target} s' if target else ''} | {ratio} |")
    print(f"\nover HTTP / its parts measured alone: by id {figures['by_id_median_s'] / figures['store_search_alone_median_s']:.2f}x"
          f" store.search; by upload {figures['by_upload_median_s'] / (figures['encode_alone_median_s'] + figures['store_search_alone_median_s']):.2f}x"
          " (encode + store.search)")
    print(f"server start to first answer {first_answer:.2f} s; model load (in the background) "
          f"{model['load_seconds']:.2f} s")
    g, rate = figures["upload_forward_gflop"], max(figures["gemm_gflops_before_after"])
    print(f"one upload's forward pass: {g:.1f} GFLOP; this machine's float32 GEMM now {rate:.0f} GFLOP/s (2048^3, "
          f"best of 3, before and after the encodes): {g / rate:.3f} s at that rate; decode + encode ran at "
          f"{g / figures['encode_alone_median_s']:.0f} GFLOP/s ({g / figures['encode_alone_median_s'] / rate:.0%} of it)")


if __name__ == "__main__":
    main()
