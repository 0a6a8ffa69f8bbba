"""Should the gallery keep a plain (non-vec0) copy of its vectors for tools that cannot load sqlite-vec
(DuckDB's SQLite scanner, pandas on a stock sqlite3)? Measured side by side in one run on a synthetic
gallery of N random L2-normalised vectors:

- file size: the gallery as it is, and with a plain ``image_vectors(image_id, embedding BLOB)`` copy;
- write cost: committing the vectors to vec0 alone vs vec0 + the plain copy (what every ingest would pay);
- the alternative: ``export --format parquet`` / ``npy`` on demand (time, file size), and a DuckDB
  cosine top-10 over the Parquet file.

    python bench/bench_export.py            # N=10000, D=768 (base)
    python bench/bench_export.py --n 5000 --dim 384
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval import store  # noqa: E402
from retrieval.export import export_npy, export_parquet  # noqa: E402

MODEL = {"variant": "base", "weights_sha256": "0" * 64, "preprocess": "resize-short", "interpolation": "hf",
         "pooling": "cls"}


def build(path: Path, vecs: np.ndarray, plain_copy: bool, batch: int = 512) -> float:
    conn = store.connect(path)
    store.ensure_model(conn, {**MODEL, "dim": vecs.shape[1]})
    if plain_copy:
        conn.execute("CREATE TABLE image_vectors (image_id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)")
    t = time.perf_counter()
    for start in range(0, len(vecs), batch):
        outcomes = [{"url": f"http://127.0.0.1/{i}.jpg", "status": "ok", "vector": vecs[i],
                     "content_sha256": f"{i:064x}", "path": f"g/{i}.jpg", "meta": {"title": f"image {i}"}}
                    for i in range(start, min(start + batch, len(vecs)))]
        with store.transaction(conn):
            results = store.commit_batch(conn, outcomes)
            if plain_copy:
                conn.executemany("INSERT INTO image_vectors VALUES (?, ?)",
                                 [(image_id, vecs[i].astype("<f4").tobytes())
                                  for (image_id, _), i in zip(results, range(start, start + len(results)))])
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=2, help="builds of each gallery (best time counts)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    raw = vecs.nbytes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain_db, copy_db = tmp / "gallery.db", tmp / "with_copy.db"
        t_plain = t_copy = float("inf")
        for rep in range(args.repeat):  # alternated, best of each: the machine is shared
            for p in (plain_db, copy_db, Path(f"{plain_db}-wal"), Path(f"{copy_db}-wal")):
                p.unlink(missing_ok=True)
            t_plain = min(t_plain, build(plain_db, vecs, False))
            t_copy = min(t_copy, build(copy_db, vecs, True))
        size_plain, size_copy = plain_db.stat().st_size, copy_db.stat().st_size
        conn = store.connect(plain_db)
        t = time.perf_counter()
        pq_info = export_parquet(conn, plain_db, tmp / "g.parquet")
        t_pq = time.perf_counter() - t
        t = time.perf_counter()
        export_npy(conn, plain_db, tmp / "g.npy")
        t_npy = time.perf_counter() - t
        conn.close()
        assert pq_info["rows"] == args.n
        duck = None
        try:
            import duckdb

            q = (f"SELECT id, list_cosine_similarity(vector, (SELECT vector FROM '{tmp}/g.parquet' WHERE id = 1)) AS s "
                 f"FROM '{tmp}/g.parquet' ORDER BY s DESC LIMIT 10")
            duckdb.sql(q).fetchall()  # warm
            t = time.perf_counter()
            top = duckdb.sql(q).fetchall()
            duck = time.perf_counter() - t
            assert top[0][0] == 1
        except ImportError:
            pass
        size_pq = (tmp / "g.parquet").stat().st_size
    mb = 1e6
    print(f"N={args.n} D={args.dim}: raw float32 {raw / mb:.1f} MB (shared machine: timings are indicative)")
    print(f"gallery.db as it is          {size_plain / mb:8.1f} MB   write {t_plain:6.2f} s")
    print(f"... with a plain vector copy {size_copy / mb:8.1f} MB   write {t_copy:6.2f} s"
          f"   (+{(size_copy - size_plain) / mb:.1f} MB = x{size_copy / size_plain:.2f} size, x{t_copy / t_plain:.2f} write time)")
    print(f"export parquet on demand     {size_pq / mb:8.1f} MB   {t_pq:6.2f} s"
          f"   ({t_pq / t_plain:.2f} of the time to write the gallery)")
    print(f"export npy + jsonl           {'':>8}      {t_npy:6.2f} s")
    if duck is not None:
        print(f"DuckDB top-10 cosine over the Parquet file: {duck * 1000:.0f} ms")


if __name__ == "__main__":
    main()
