"""Peak memory of an ingest with many workers, under different --memory-mb budgets, side by side in one run.

Local HTTP servers (127.0.0.1, ``--hosts`` of them on different ports: different hosts, so the per-host cap
of 4 does not limit the concurrency) serve N URLs of large incompressible PNGs (a few distinct bodies, so most rows
are downloaded in full and then found to be duplicates: the downloads, not the encoder, dominate). Each run is
``cli.py ingest --workers 256 --memory-mb M`` in a fresh process, measured by its peak RSS (ru_maxrss of the
child); the baseline is the same command on a CSV of one row (the model, imports and SQLite).

    python bench/bench_memory.py                 # 400 URLs of ~3 MB, budgets 64, 256 and 4096 MB
    python bench/bench_memory.py --rows 200 --side 700 --budgets 32 128

Random weights of the real small shapes at depth 1 stand in for the model (the encoder is not what is measured).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from httpserver import LocalHTTPServer  # noqa: E402


def noise_png(seed: int, side: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def peak_rss_mb(args: list[str], env: dict) -> tuple[float, dict]:
    wrapper = ("import json, resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "print(json.dumps({'code': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],"
               " 'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    p = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "cli.py", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    res = json.loads(p.stdout)
    if res["code"] != 0:
        raise SystemExit(f"ingest failed: {res['err']}")
    return res["maxrss"] / 1024, json.loads(res["out"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--side", type=int, default=1000, help="PNG side in pixels (1000: ~3 MB)")
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--workers", type=int, default=256)
    ap.add_argument("--hosts", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 4096])
    a = ap.parse_args()

    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    weights = tmp / "w.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=0), weights)
    bodies = [noise_png(i, a.side) for i in range(a.distinct)]
    servers = [LocalHTTPServer() for _ in range(a.hosts)]
    try:
        urls = [servers[i % a.hosts].add(f"/img/{i}.png", body=bodies[i % a.distinct],
                                         headers={"Content-Type": "image/png"}) for i in range(a.rows)]
        csv = tmp / "rows.csv"
        csv.write_text("url\n" + "\n".join(urls) + "\n")
        one = tmp / "one.csv"
        one.write_text("url\n" + urls[0] + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_") and "proxy" not in k.lower()}
        env.update(DINOV2_OFFLINE="1", DINOV2_WEIGHTS=str(weights), DINOV2_ALLOW_PRIVATE="1",
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        common = ["--workers", str(a.workers), "--max-mb", "50", "--timeout", "120", "--json", "-q"]
        base, _ = peak_rss_mb(["ingest", "--csv", str(one), "--db", str(tmp / "base.db"), *common], env)
        size = sum(len(b) for b in bodies) / len(bodies) / 2**20
        print(f"{a.rows} URLs of {size:.1f} MB ({a.distinct} distinct bodies) on {a.hosts} hosts, --workers {a.workers}; "
              f"all downloads at once would be {a.rows * size:.0f} MB, {a.workers} at once {a.workers * size:.0f} MB")
        print(f"baseline (one row): peak RSS {base:.0f} MB")
        print(f"{'--memory-mb':>11}  {'peak RSS MB':>11}  {'above baseline':>14}  {'budget peak MB':>14}  "
              f"{'new':>4}  {'dup':>4}  {'failed':>6}  {'seconds':>7}")
        for mb in a.budgets:
            peak, s = peak_rss_mb(["ingest", "--csv", str(csv), "--db", str(tmp / f"g{mb}.db"), "--memory-mb",
                                   str(mb), *common], env)
            print(f"{mb:>11}  {peak:>11.0f}  {peak - base:>14.0f}  {s['memory_peak_mb']:>14.1f}  {s['new']:>4}  "
                  f"{s['duplicate']:>4}  {s['failed']:>6}  {s['seconds']:>7.1f}")
    finally:
        for srv in servers:
            srv.close()


if __name__ == "__main__":
    main()
