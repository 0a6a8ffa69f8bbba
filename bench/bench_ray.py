"""Ray ingest vs local ingest on this machine, and the merge's rows/s.

    .venv/bin/python bench/bench_ray.py                    # base, 600 images: about 5 minutes on 2 idle cores
    .venv/bin/python bench/bench_ray.py --variant small --images 300 --merge-rows 20000    # a quicker look

The targets (issue 14): on one machine with a local Ray instance, ``cli.py ingest --engine ray`` reaches at
least 0.8x the images/s of ``cli.py ingest`` (the local engine) on the same CSV, and ``cli.py merge`` inserts at
least 20,000 rows/s.

What it does, in ONE run (the figures side by side on the same, possibly busy, machine):

1. Random weights of the variant's real shapes and ``--images`` distinct photo-like 640x480 JPEGs
   (bench/bench_ingest.py's ``photo``), served by a local HTTP server on 127.0.0.1 (tests/httpserver.py).
2. ``cli.py ingest --csv`` (local engine) and ``cli.py ingest --csv --engine ray`` (a local Ray instance that
   the command starts itself) as subprocesses into fresh galleries, ``--rounds`` times, alternating. Figures:
     - run-timed images/s: the run's own ``images_per_s`` (new / seconds from the start of the run, after
       the model is loaded and, for Ray, after ``ray.init``; for Ray it includes Ray Data's start-up: actor
       creation and the weights load in the actor, which a longer run amortises);
     - Ray steady: the rows of the shards after the first / the time between the first and the last shard
       written (the pipeline's rate once it runs);
     - whole process: images / wall seconds of the subprocess (interpreter, imports, Ray start-up, ...).
   The headline is the median over rounds of Ray's run-timed images/s / the local run-timed images/s.
3. Merge: ``--merge-rows`` synthetic rows (90% ok with a vector of the variant's width, 5% the same bytes as
   an earlier row, 5% failed) in shards of 10,000 rows, merged by ``cli.py merge`` into a fresh gallery
   ``--merge-rounds`` times (the median is the figure), then a second time into the last one (nothing to do);
   for scale, the same number of vectors inserted alone into a fresh vectors table. With ``--merge-into DB``
   also once into a copy of DB, e.g. the 1M gallery ``bench/bench_search.py --keep`` leaves (its index
   trained: the inserts go to 1,000 lists):

       .venv/bin/python bench/bench_ray.py --merge-only --merge-into /tmp/bsfull/g1m.db

Prints a Markdown table. Nothing is written outside a temporary folder (``--keep DIR`` to keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ingest import photo, write_csv  # noqa: E402
from httpserver import LocalHTTPServer  # noqa: E402

from retrieval import shards as S  # noqa: E402
from retrieval import store  # noqa: E402
from retrieval.variants import official_config, random_params  # noqa: E402
from retrieval.weights import save_params  # noqa: E402

TARGET_RATIO = 0.8
TARGET_MERGE = 20_000


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_") and "proxy" not in k.lower()}
    env.update(DINOV2_OFFLINE="1", DINOV2_ALLOW_PRIVATE="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    return env


def run_cli(args: list[str], out_dir: Path) -> tuple[dict, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--json"], cwd=out_dir, env=child_env(),
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout), wall


def ingest_round(work: Path, k: int, csv: Path, weights: Path, bs: int, block_rows: int) -> dict:
    out = {}
    for engine in ("local", "ray"):
        d = work / f"{engine}{k}"
        d.mkdir()
        args = ["ingest", "--csv", str(csv), "--db", str(d / "gallery.db"), "--weights", str(weights),
                "--batch-size", str(bs), "-q"]
        if engine == "ray":
            args += ["--engine", "ray", "--block-rows", str(block_rows)]
        summary, wall = run_cli(args, d)
        r = {"run": summary["images_per_s"], "wall": summary["new"] / wall, "new": summary["new"],
             "seconds": summary["seconds"]}
        if engine == "ray":
            files = S.shard_files(d / "gallery_shards")
            times = sorted((f.stat().st_mtime, S.read_shard(f)[1].num_rows) for f in files)
            if len(times) > 1:
                r["steady"] = sum(n for _, n in times[1:]) / max(times[-1][0] - times[0][0], 1e-9)
            r["shards"] = len(files)
        out[engine] = r
        print(f"  round {k} {engine}: {summary['new']} new in {summary['seconds']:.1f} s run-timed "
              f"({r['run']:.2f} img/s), {wall:.1f} s wall" + (f", steady {r.get('steady', 0):.2f} img/s, "
                                                             f"{r['shards']} shards" if engine == "ray" else ""),
              flush=True)
    return out


def make_shards(directory: Path, rows: int, dim: int, record: dict, per_shard: int = 10_000,
                content_prefix: str = "") -> None:
    rng = np.random.default_rng(0)
    seq = 0
    for s in range(0, rows, per_shard):
        n = min(per_shard, rows - s)
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        cols = {c: [] for c in S.COLUMNS if c != "vector"}
        for i in range(n):
            j = seq + i
            kind = j % 20
            url = f"https://merge.example.com/{j:09d}.jpg"
            cols["seq"].append(j)
            cols["url"].append(url)
            cols["url_hash"].append(store.url_hash(url))
            cols["mtime"].append(None)
            cols["meta"].append(json.dumps({"title": f"image {j}"}))
            if kind == 19:
                cols["status"].append("failed")
                cols["error"].append("http-404: Not Found")
                cols["http_status"].append(404)
                for c in ("content_sha256", "width", "height", "format", "bytes", "path"):
                    cols[c].append(None)
                continue
            # every 20th row of the rest carries the bytes of the row before it: a duplicate at merge time
            content = j - 1 if kind == 18 else j
            cols["status"].append("ok")
            cols["error"].append(None)
            cols["http_status"].append(200)
            cols["content_sha256"].append(content_prefix + f"{content:064x}"[len(content_prefix):])
            cols["width"].append(640)
            cols["height"].append(480)
            cols["format"].append("JPEG")
            cols["bytes"].append(50_000 + j % 1000)
            cols["path"].append(None)
        table = S.make_table(cols, vecs, S.new_info(record, "bench"))
        S.write_shard(directory, f"bench-{s // per_shard:05d}", table)
        seq += n


def vec0_alone(work: Path, rows: int, dim: int, record: dict) -> float:
    """For scale: ``rows`` vectors inserted alone (one executemany, one transaction) into the vectors table of
    a fresh gallery (the store's layout), with the merge's page cache. Rows/s."""
    conn = store.connect(work / "alone.db")
    store.ensure_model(conn, record)
    conn.execute(f"PRAGMA cache_size = {-S.MERGE_CACHE_KIB}")
    vec = np.random.default_rng(1).standard_normal(dim).astype("<f4").tobytes()
    t = time.perf_counter()
    with store.transaction(conn):
        conn.executemany("INSERT INTO image_embeddings (image_id, list, embedding) VALUES (?, 0, ?)",
                         ((i + 1, vec) for i in range(rows)))
    alone = rows / (time.perf_counter() - t)
    conn.close()
    return alone


def merge_bench(work: Path, rows: int, dim: int, record: dict, rounds: int, into: Path | None) -> list[dict]:
    """``cli.py merge`` of ``rows`` synthetic rows into a fresh gallery, ``rounds`` times (then once more into
    the last one: nothing to do), and with ``into`` once into a copy of that gallery (its model's record)."""
    shards_dir = work / "merge_shards"
    t = time.perf_counter()
    make_shards(shards_dir, rows, dim, record)
    print(f"  {rows} synthetic rows written as shards in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for k in range(rounds):
        db = work / f"merge-{k}.db"
        first, wall = run_cli(["merge", str(shards_dir), "--db", str(db)], work)
        results.append({"into": "a fresh gallery", "rows": first["rows"], "rows_per_s": first["rows_per_s"],
                        "seconds": first["seconds"], "wall": wall, "counts": first})
        print(f"  merge {k + 1} into a fresh gallery: {first['rows']} rows in {first['seconds']:.2f} s = "
              f"{first['rows_per_s']:.0f} rows/s (new {first['new']}, duplicate {first['duplicate']}, "
              f"failed {first['failed']})", flush=True)
        db_last = db
    again, _ = run_cli(["merge", str(shards_dir), "--db", str(db_last)], work)
    results[-1]["again_s"], results[-1]["again_shards"] = again["seconds"], again["shards"]
    results[-1]["vec0_alone"] = vec0_alone(work, rows, dim, record)
    if into is not None:
        big = work / "into.db"
        shutil.copyfile(into, big)
        conn = store.connect(big, readonly=True)
        model = store.get_model(conn)
        n_before = store.stats(conn)["counts"]["total"]
        conn.close()
        rec = {k: model[k] for k in ("variant", "weights_sha256", "preprocess", "interpolation", "pooling", "dim")}
        shutil.rmtree(work / "into_shards", ignore_errors=True)
        make_shards(work / "into_shards", rows, int(rec["dim"]), rec, content_prefix="e")
        got, wall = run_cli(["merge", str(work / "into_shards"), "--db", str(big)], work)
        results.append({"into": f"a copy of {into.name} ({n_before:,} rows)", "rows": got["rows"],
                        "rows_per_s": got["rows_per_s"], "seconds": got["seconds"], "wall": wall, "counts": got})
        print(f"  merge into {into.name}: {got['rows']} rows in {got['seconds']:.2f} s = {got['rows_per_s']:.0f} "
              f"rows/s", flush=True)
        big.unlink()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="base")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--merge-rows", type=int, default=100_000)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--merge-only", action="store_true", help="only the merge figures")
    ap.add_argument("--merge-rounds", type=int, default=3, help="merges into a fresh gallery (the median is the figure)")
    ap.add_argument("--merge-into", type=Path, default=None,
                    help="also merge into a copy of this gallery (e.g. bench_search.py's 1M gallery --keep)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_ray_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    server = LocalHTTPServer()
    try:
        cfg = official_config(args.variant)
        weights = work / "weights.safetensors"
        save_params(random_params(cfg, seed=0), weights)
        rounds = []
        if not args.merge_only:
            urls = [server.add(f"/p{i}.jpg", body=photo(i)) for i in range(args.images)]
            csv = write_csv(work / "data.csv", urls)
            print(f"{args.variant}, {args.images} distinct 640x480 JPEGs from 127.0.0.1, batch {args.batch_size}, "
                  f"{os.cpu_count()} CPUs (a shared machine: other work may be running)", flush=True)
            rounds = [ingest_round(work, k, csv, weights, args.batch_size, args.block_rows)
                      for k in range(args.rounds)]
        record = {"variant": args.variant, "weights_sha256": "0" * 64, "preprocess": "resize-short",
                  "interpolation": "hf", "pooling": "cls", "dim": cfg.dim}
        merges = (merge_bench(work, args.merge_rows, cfg.dim, record, args.merge_rounds, args.merge_into)
                  if args.merge_rows else [])
    finally:
        server.close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    if not rounds:
        return print_merges(merges)
    ratio = statistics.median(r["ray"]["run"] / r["local"]["run"] for r in rounds)
    steady = [r["ray"].get("steady") for r in rounds if r["ray"].get("steady")]
    print()
    print("| engine | run-timed img/s | whole process img/s | Ray steady img/s |")
    print("|---|---:|---:|---:|")
    for r in rounds:
        print(f"| local | {r['local']['run']:.2f} | {r['local']['wall']:.2f} | |")
        print(f"| ray | {r['ray']['run']:.2f} | {r['ray']['wall']:.2f} | {r['ray'].get('steady', 0):.2f} |")
    local_run = statistics.median(r["local"]["run"] for r in rounds)
    print()
    print(f"Ray / local, run-timed (median of {len(rounds)}): {ratio:.2f}x  (target >= {TARGET_RATIO}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    if steady:
        print(f"Ray steady / local run-timed: {statistics.median(steady) / local_run:.2f}x")
    whole = statistics.median(r["ray"]["wall"] / r["local"]["wall"] for r in rounds)
    print(f"Ray / local, whole process: {whole:.2f}x")
    print(f"per core (local, {os.cpu_count()} CPUs): {local_run / (os.cpu_count() or 1):.2f} images/s")
    print_merges(merges)


def print_merges(merges: list[dict]) -> None:
    if not merges:
        return
    print()
    print("| merge into | rows | rows/s | seconds | whole process (s) |")
    print("|---|---:|---:|---:|---:|")
    for m in merges:
        print(f"| {m['into']} | {m['rows']} | {m['rows_per_s']:.0f} | {m['seconds']:.2f} | {m['wall']:.1f} |")
    fresh = [m["rows_per_s"] for m in merges if m["into"] == "a fresh gallery"]
    last = [m for m in merges if "again_s" in m][0]
    med = statistics.median(fresh)
    print(f"merged again: {last['again_shards']} shards in {last['again_s']:.2f} s; the same number of vectors "
          f"inserted alone into a fresh vectors table: {last['vec0_alone']:.0f} rows/s")
    print(f"merge into a fresh gallery, median of {len(fresh)}: {med:.0f} rows/s (min {min(fresh):.0f}, max "
          f"{max(fresh):.0f}); target >= {TARGET_MERGE} rows/s: {'met' if med >= TARGET_MERGE else 'NOT met'}")


if __name__ == "__main__":
    main()
