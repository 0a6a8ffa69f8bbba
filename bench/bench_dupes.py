"""How long ``python cli.py dupes`` takes on a large gallery, against the alternatives, side by side in one run.

Builds a real gallery (SQLite + sqlite-vec) of N synthetic L2-normalised vectors (default 100,000 x 384, the
small model's width) with planted groups of near-duplicates (cosine ~0.998) among random vectors, then times:

- ``lifecycle.dupes`` (what the CLI runs): read every vector, blocked NumPy matrix product over the upper
  triangle, connected components, row details;
- per-row KNN through ``store.search`` (k = 10) for a sample of rows, extrapolated to N rows: the other
  design (one nearest-neighbour query per image), with sqlite-vec's exact KNN behind it;
- faiss ``IndexFlatIP.range_search`` on the same vectors (faiss is for comparison only, never a dependency;
  skipped when it is not installed).

It checks that the planted groups are found, and prints seconds and ratios. Run from the repository root:

    python bench/bench_dupes.py                 # 100,000 x 384
    python bench/bench_dupes.py --n 100000 --dim 768 --sample 100
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval import lifecycle, store  # noqa: E402


def build(path: Path, n: int, dim: int, groups: int, seed: int = 0) -> list[list[int]]:
    """A gallery of n vectors with ``groups`` planted groups of 2..5 near-duplicates; returns the groups (ids)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    planted = []
    members = rng.permutation(n)
    at = 0
    for _ in range(groups):
        size = int(rng.integers(2, 6))
        ids = members[at:at + size]
        at += size
        for i in ids[1:]:
            X[i] = X[ids[0]] + rng.standard_normal(dim, dtype=np.float32) * 0.05
        planted.append(sorted(int(i) + 1 for i in ids))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    conn = store.connect(path)
    store.ensure_model(conn, dict(variant="small" if dim == 384 else "base", weights_sha256="0" * 64,
                                  preprocess="resize-short", interpolation="hf", pooling="cls", dim=dim))
    with store.transaction(conn):
        for start in range(0, n, 10_000):
            chunk = range(start, min(n, start + 10_000))
            conn.executemany(
                "INSERT INTO images (id, url, url_hash, status, content_sha256) VALUES (?, ?, ?, 'ok', ?)",
                [(i + 1, f"https://example.test/{i}.jpg", f"{i:064x}", f"{i:064x}") for i in chunk])
            conn.executemany("INSERT INTO image_embeddings (image_id, embedding) VALUES (?, ?)",
                             [(i + 1, X[i].astype("<f4").tobytes()) for i in chunk])
    conn.close()
    return sorted(planted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--sample", type=int, default=200, help="rows queried one by one for the per-row KNN estimate")
    ap.add_argument("--knn-k", type=int, default=10)
    ap.add_argument("--no-faiss", action="store_true", help="skip the faiss comparison")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        t = time.perf_counter()
        planted = build(db, args.n, args.dim, args.groups)
        print(f"gallery: {args.n} x {args.dim} float32, {len(planted)} planted groups, built in "
              f"{time.perf_counter() - t:.1f} s ({db.stat().st_size / 1e6:.0f} MB)")
        conn = store.connect(db)

        t = time.perf_counter()
        ids, X = lifecycle.read_vectors(conn)
        t_read = time.perf_counter() - t
        del X
        t, cpu = time.perf_counter(), time.process_time()
        found = lifecycle.dupes(conn, args.threshold)
        t_dupes, cpu_dupes = time.perf_counter() - t, time.process_time() - cpu
        got = sorted(sorted(m["id"] for m in g["images"]) for g in found["groups"])
        assert got == planted, "the planted groups were not found exactly"
        print(f"dupes (blocked NumPy):     {t_dupes:8.1f} s  (of which reading the vectors {t_read:.1f} s; CPU time "
              f"{cpu_dupes:.1f} s over all threads: on a shared machine the wall time is what others leave); "
              f"{len(found['groups'])} groups found = the planted ones")

        rng = np.random.default_rng(1)
        sample = rng.choice(args.n, size=min(args.sample, args.n), replace=False) + 1
        vecs = [store.get_vector(conn, int(i)) for i in sample]
        t = time.perf_counter()
        for v in vecs:
            store.search(conn, v, args.knn_k)
        t_knn = (time.perf_counter() - t) / len(vecs) * args.n
        print(f"per-row KNN (store.search, k={args.knn_k}): {t_knn:8.1f} s  estimated for {args.n} rows from "
              f"{len(vecs)} queries; {t_knn / t_dupes:.1f}x the blocked product")

        try:
            if args.no_faiss:
                raise ImportError
            import faiss
        except ImportError:
            print("faiss: skipped (--no-faiss, or not installed)")
        else:
            ids, X = lifecycle.read_vectors(conn)
            t = time.perf_counter()
            index = faiss.IndexFlatIP(X.shape[1])
            index.add(X)
            lims, _, _ = index.range_search(X, args.threshold)
            t_faiss = time.perf_counter() - t
            print(f"faiss IndexFlatIP.range_search: {t_faiss:8.1f} s  ({int(lims[-1])} pairs incl. self); "
                  f"dupes is {t_dupes / t_faiss:.2f}x its time (dupes also reads the vectors and the rows)")
        conn.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
