"""Search benchmark: galleries of 10k, 100k and 1M 768-d vectors, exact vs the IVF index, in SQL.

    /work/venv/bin/python bench/bench_search.py            # 10k, 100k, 1M: ~30-40 min on 2 shared cores
    /work/venv/bin/python bench/bench_search.py --quick    # 10k and 100k: a few minutes
    /work/venv/bin/python bench/bench_search.py --sizes 1000000 --keep /tmp/g1m.db   # keep the 1M gallery

Data (``clustered``): ``--centres`` (1,000) Gaussian centres, unit vectors in R^768; each centre has its
own rank-16 spread (a random 768x16 basis scaled to 0.6/sqrt(16) per axis); a vector is a centre (drawn
uniformly) + its basis times a standard normal 16-vector + isotropic noise of standard deviation
0.35/sqrt(768) per axis, L2-normalised. A vector's nearest neighbours are mostly in its own cluster,
with cosines of ~0.8-0.9 and a real ranking among them (like DINOv2 features of a photo collection:
near-duplicates, then the same subject, then the rest). The vectors are a deterministic function of
(seed, chunk number), so the gallery is streamed in chunks of 10,000 and never held in memory; the 50
query vectors come from the same distribution with another seed: they are not in the gallery.

Per N, in one run (the machine may be shared: the figures are side by side, exact next to IVF):

- build: ``store.ensure_model`` with the record of random base weights (what a real ingest writes:
  ``Encoder.record()``), then ``store.commit_batch`` of 10,000 ok rows per transaction (the ingest's own
  insertion path): file size, seconds, rows/s;
- raw vec0 inserts (vectors/s, 50,000 vectors in one transaction into a fresh table of the current
  layout) and point lookups (``SELECT embedding ... WHERE image_id = ?``, 1,000 random ids);
- the index: ``python cli.py index`` (whole process, k-means + rewrite);
- SQL latency over the 50 queries (median and p95; ``store.search`` = one statement, results joined to
  ``images``): IVF top-10 and top-100, exact top-10 (on 5 queries at 1M: ~2 s each);
  recall@10 and @100 of the IVF answers against exact ground truth computed with NumPy over the
  generated vectors (float64);
- whole processes (best of 3 wall times, and that run's CPU seconds): ``query --id ID -k 10``,
  ``query IMAGE -k 10`` (encoding included, random base weights, after one run that fills the prepared
  weights cache), ``query --id ID -k 5000``, ``doctor`` (once), ``stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval import index, store  # noqa: E402

DIM = 768
CHUNK = 10_000
RANK = 16


class Clustered:
    """The synthetic gallery: see the module docstring."""

    def __init__(self, centres: int = 1000, dim: int = DIM, seed: int = 0):
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((centres, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        # (centres, RANK, dim): each centre's low-rank spread, 0.6 / sqrt(RANK) per axis
        self.bases = rng.standard_normal((centres, RANK, dim)).astype(np.float32) * (0.6 / np.sqrt(RANK) / np.sqrt(dim))
        self.seed = seed
        self.dim = dim

    def chunk(self, number: int, n: int = CHUNK, stream: int = 1) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, number])
        which = rng.integers(0, len(self.centres), n)
        z = rng.standard_normal((n, RANK)).astype(np.float32)
        x = self.centres[which].copy()
        order = np.argsort(which, kind="stable")  # one small matmul per centre present in the chunk
        w = which[order]
        starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], n]):
            rows = order[s:e]
            x[rows] += z[rows] @ self.bases[w[s]]
        x += rng.standard_normal((n, self.dim)).astype(np.float32) * (0.35 / np.sqrt(self.dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def gallery(self, n: int):
        """(start, vectors) chunks of the first n gallery vectors."""
        for number, start in enumerate(range(0, n, CHUNK)):
            yield start, self.chunk(number, min(CHUNK, n - start))

    def queries(self, n: int = 50) -> np.ndarray:
        return self.chunk(0, n, stream=2)


def ground_truth(data: Clustered, n: int, queries: np.ndarray, k: int = 100) -> np.ndarray:
    """Image ids (1-based, = insertion order) of the exact top-k per query, streaming over the gallery."""
    best_s = np.full((len(queries), 0), -np.inf)
    best_i = np.zeros((len(queries), 0), np.int64)
    q = queries.astype(np.float64)
    for start, x in data.gallery(n):
        s = q @ x.astype(np.float64).T
        ids = np.arange(start + 1, start + 1 + len(x))
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, top, 1)
        best_i = np.take_along_axis(best_i, top, 1)
    return best_i


def make_weights(work: Path) -> Path:
    path = work / "base-random.safetensors"
    if not path.exists():
        from retrieval.variants import official_config, random_params
        from retrieval.weights import save_params

        save_params(random_params(official_config("base"), 0), path)
    return path


def model_record(weights: Path) -> dict:
    from retrieval.encoder import EncoderSettings, load_encoder

    return load_encoder(weights, EncoderSettings()).record()


def build_gallery(path: Path, data: Clustered, n: int, record: dict, log) -> dict:
    conn = store.connect(path)
    store.ensure_model(conn, record)
    t0 = time.perf_counter()
    for start, x in data.gallery(n):
        outcomes = [{"status": "ok", "url": f"https://img.example/{start + i + 1}.jpg",
                     "content_sha256": f"{start + i + 1:064x}", "width": 640, "height": 480, "format": "JPEG",
                     "bytes": 100_000, "vector": x[i]} for i in range(len(x))]
        store.commit_batch(conn, outcomes)
        if (start // CHUNK) % 10 == 9:
            log(f"  {start + len(x)}/{n} rows, {(start + len(x)) / (time.perf_counter() - t0):.0f} rows/s")
    seconds = time.perf_counter() - t0
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"build_s": seconds, "rows_per_s": n / seconds, "file_mb": path.stat().st_size / 1e6}


def raw_inserts(work: Path, data: Clustered, n: int = 50_000) -> dict:
    """vec0 INSERTs in one transaction, the current layout vs vec0's default (the old layout)."""
    out = {}
    x = np.concatenate([c for _, c in data.gallery(n)])
    for name, sql in (("current", index.vectors_table_sql(DIM, "t")),
                      ("old", f"CREATE VIRTUAL TABLE t USING vec0(image_id INTEGER PRIMARY KEY, embedding float[{DIM}] distance_metric=cosine)")):
        p = work / f"raw-{name}.db"
        for f in (p, Path(str(p) + "-wal"), Path(str(p) + "-shm")):
            f.unlink(missing_ok=True)
        conn = store.connect(p)
        conn.execute(sql)
        cols = "(image_id, list, embedding) VALUES (?, 0, ?)" if name == "current" else "(image_id, embedding) VALUES (?, ?)"
        t, c = time.perf_counter(), time.process_time()
        with store.transaction(conn):
            conn.executemany(f"INSERT INTO t {cols}", ((i + 1, v.tobytes()) for i, v in enumerate(x)))
        out[f"insert_{name}_per_s"] = n / (time.perf_counter() - t)
        out[f"insert_{name}_per_cpu_s"] = n / (time.process_time() - c)
        ids = np.random.default_rng(1).integers(1, n + 1, 1000)
        t, c = time.perf_counter(), time.process_time()
        for i in ids:
            conn.execute("SELECT embedding FROM t WHERE image_id = ?", (int(i),)).fetchone()
        out[f"lookup_{name}_ms"] = (time.perf_counter() - t) / len(ids) * 1e3
        out[f"lookup_{name}_cpu_ms"] = (time.process_time() - c) / len(ids) * 1e3
        conn.close()
        for f in (p, Path(str(p) + "-wal"), Path(str(p) + "-shm")):
            f.unlink(missing_ok=True)
    return out


def timed_search(conn, queries, k, exact=None):
    times, answers = [], []
    for q in queries:
        t = time.perf_counter()
        rows = store.search(conn, q, k, exact=exact)
        times.append(time.perf_counter() - t)
        answers.append([r["id"] for r in rows])
    return times, answers


def recall(answers, truth, k) -> float:
    return float(np.mean([len(set(a[:k]) & set(t[:k].tolist())) / k for a, t in zip(answers, truth)]))


def ms(xs, p=50) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


CPU: dict = {}  # "query_id_s" -> the CPU seconds (user + sys) of the run with the best wall time


def run_cli(args, env, repeat=3, name=None) -> tuple[float, str]:
    """Best wall time of `python cli.py ARGS` over ``repeat`` runs, and its last output; the CPU time of
    that run goes to CPU[name] (on a shared machine wall time includes waiting for a core)."""
    import resource

    best, out = float("inf"), ""
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if wall < best and name:
            CPU[name] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best = min(best, wall)
        out = res.stdout + res.stderr
        if res.returncode not in (0, 1):
            raise RuntimeError(f"cli.py {' '.join(args)} failed: {out}")
    return best, out


def bench_size(n: int, work: Path, data: Clustered, weights: Path, record: dict, image: Path, log,
               keep: Path | None, reuse: dict | None = None) -> dict:
    """``reuse``: the row of an earlier run whose gallery was kept at ``keep``: its build and index figures
    are reported again and only the searches and commands are measured anew."""
    path = keep if keep is not None else work / f"g{n}.db"
    row = {"n": n}
    env = dict(os.environ, DINOV2_ALLOW_PRIVATE="1")
    if reuse:
        row.update({k: v for k, v in reuse.items() if k in ("build_s", "rows_per_s", "file_mb", "index_s")})
    else:
        for f in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
            f.unlink(missing_ok=True)
        log(f"N={n}: building the gallery through store.commit_batch")
        row.update(build_gallery(path, data, n, record, log))
    queries = data.queries(50)
    log(f"N={n}: exact ground truth (NumPy, float64)")
    truth = ground_truth(data, n, queries, 100)

    conn = store.connect(path)
    n_exact = 50 if n <= 100_000 else 5
    t_ex, a_ex = timed_search(conn, queries[:n_exact], 10, exact=True)
    row["exact10_med_ms"], row["exact10_p95_ms"] = ms(t_ex), ms(t_ex, 95)
    row["exact_recall10"] = recall(a_ex, truth[:n_exact], 10)
    conn.close()

    if not reuse:
        log(f"N={n}: python cli.py index")
        t = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "index", "--db", str(path), "--force"], env=env,
                             cwd=ROOT, capture_output=True, text=True)
        row["index_s"] = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(res.stdout + res.stderr)
        log(f"N={n}: index built in {row['index_s']:.1f} s: {res.stdout.strip()}")
    row["file_mb_indexed"] = path.stat().st_size / 1e6

    conn = store.connect(path)
    st = index.state(conn)
    row["nlist"], row["nprobe"] = st["nlist"], st["nprobe"]
    timed_search(conn, queries[:5], 10)  # warm the page cache for both statements
    for k in (10, 100):
        times, answers = timed_search(conn, queries, k)
        row[f"ivf{k}_med_ms"], row[f"ivf{k}_p95_ms"] = ms(times), ms(times, 95)
        row[f"recall{k}"] = recall(answers, truth, k)
    conn.close()
    log(f"N={n}: IVF top-10 {row['ivf10_med_ms']:.1f} ms recall {row['recall10']:.3f}; "
        f"top-100 {row['ivf100_med_ms']:.1f} ms recall {row['recall100']:.3f}")

    row.update(raw_inserts(work, data) if n == min(SIZES_RUN) else {})
    qid = str(n // 2)
    db = ["--db", str(path)]
    env["DINOV2_CACHE"] = str(work / "cache")  # the prepared weights (retrieval/prepared.py) go here
    CPU.clear()
    row["query_id_s"], _ = run_cli(["query", "--id", qid, "-k", "10", *db], env, name="query_id_s")
    run_cli(["query", str(image), "-k", "10", "--weights", str(weights), "--offline", *db], env, repeat=1)  # fills the cache
    row["query_image_s"], _ = run_cli(["query", str(image), "-k", "10", "--weights", str(weights), "--offline", *db],
                                      env, name="query_image_s")
    row["query_5000_s"], _ = run_cli(["query", "--id", qid, "-k", "5000", "--json", *db], env, name="query_5000_s")
    row["doctor_s"], out = run_cli(["doctor", *db], env, repeat=1, name="doctor_s")
    row["doctor_healthy"] = out.strip().endswith("healthy")
    row["stats_s"], _ = run_cli(["stats", *db], env, name="stats_s")
    row["cpu"] = dict(CPU)
    log(json.dumps(row))
    if keep is None:
        for f in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
            f.unlink(missing_ok=True)
    return row


SIZES_RUN: list = []


def table(rows) -> str:
    lines = [
        "| N | file | build (commit_batch) | index build | IVF top-10 med / p95 | recall@10 | IVF top-100 med / p95 "
        "| recall@100 | exact top-10 med | `query --id` | `query IMAGE` | `-k 5000` | `doctor` | `stats` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['file_mb_indexed']:.0f} MB | {r['build_s']:.0f} s ({r['rows_per_s']:,.0f} rows/s) "
            f"| {r['index_s']:.1f} s ({r['nlist']} lists) | {r['ivf10_med_ms']:.1f} / {r['ivf10_p95_ms']:.1f} ms "
            f"| {r['recall10']:.3f} | {r['ivf100_med_ms']:.1f} / {r['ivf100_p95_ms']:.1f} ms | {r['recall100']:.3f} "
            f"| {r['exact10_med_ms']:.0f} ms | {r['query_id_s']:.2f} s | {r['query_image_s']:.2f} s "
            f"| {r['query_5000_s']:.2f} s | {r['doctor_s']:.1f} s | {r['stats_s']:.2f} s |")
    return "\n".join(lines)


def make_image(work: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    path = work / "query.jpg"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only")
    ap.add_argument("--sizes", type=int, nargs="+", help="gallery sizes (default 10000 100000 1000000)")
    ap.add_argument("--keep", type=Path, help="keep the largest gallery at this path")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--reuse", type=Path, help="bench_search.json of the run that kept --keep: measure its gallery "
                    "again without rebuilding it")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    SIZES_RUN[:] = sizes
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    weights = make_weights(work)
    record = model_record(weights)
    image = make_image(work)
    data = Clustered(args.centres)
    rows = []
    earlier = {r["n"]: r for r in json.loads(args.reuse.read_text())} if args.reuse else {}
    for n in sizes:
        keep = args.keep if (args.keep and n == max(sizes)) else None
        rows.append(bench_size(n, work, data, weights, record, image, log, keep,
                               earlier.get(n) if keep is not None else None))
        (work / "bench_search.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    raw = rows[0]
    if "insert_current_per_s" in raw:
        print(f"\nvec0 inserts in one transaction: {raw['insert_current_per_s']:,.0f} vectors/s (chunk_size {index.CHUNK_SIZE}, "
              f"partition key) vs {raw['insert_old_per_s']:,.0f} (vec0 default); point lookup "
              f"{raw['lookup_current_ms']:.3f} ms vs {raw['lookup_old_ms']:.3f} ms "
              f"({raw['lookup_old_ms'] / raw['lookup_current_ms']:.1f}x)")
        if "insert_current_per_cpu_s" in raw:
            print(f"per CPU second: {raw['insert_current_per_cpu_s']:,.0f} vs {raw['insert_old_per_cpu_s']:,.0f} inserts/s; "
                  f"lookup {raw['lookup_current_cpu_ms']:.3f} vs {raw['lookup_old_cpu_ms']:.3f} ms CPU")
    for r in rows:
        print(f"N={r['n']:,}: IVF top-10 is {r['exact10_med_ms'] / r['ivf10_med_ms']:.0f}x faster than exact "
              f"(recall@10 {r['recall10']:.3f}); nprobe {r['nprobe']} of {r['nlist']} lists")
    if all("cpu" in r for r in rows):
        print("\nCPU seconds (user + sys) of the same whole-process runs (wall time above includes waiting for a "
              "core on a shared machine):")
        print("| N | `query --id` | `query IMAGE` | `-k 5000` | `doctor` | `stats` |\n|---|---:|---:|---:|---:|---:|")
        for r in rows:
            c = r["cpu"]
            print(f"| {r['n']:,} | {c['query_id_s']:.2f} s | {c['query_image_s']:.2f} s | {c['query_5000_s']:.2f} s "
                  f"| {c['doctor_s']:.1f} s | {c['stats_s']:.2f} s |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    (work / "bench_search.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
