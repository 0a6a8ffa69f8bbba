"""The README's promises: its sqlite3 session runs in the plain shell against a real gallery."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlite_vec

from retrieval import store

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SQLITE3 = shutil.which("sqlite3") or "/usr/bin/sqlite3"


def sql_session() -> str:
    m = re.search(r"<!-- sql-session.*?-->\s*```sql\n(.*?)```", README, re.S)
    assert m, "README has no sql-session block"
    return m.group(1)


@pytest.fixture
def gallery(tmp_path):
    path = tmp_path / "gallery.db"
    conn = store.connect(path)
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 8})
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((6, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    outcomes = [{"url": f"http://127.0.0.1/{i}.jpg", "status": "ok", "vector": v, "content_sha256": f"{i:064x}",
                 "path": f"gallery_images/{i}.jpg", "width": 10, "height": 10} for i, v in enumerate(vecs)]
    outcomes.append({"url": "http://127.0.0.1/missing.jpg", "status": "failed", "error": "http-404: Not Found",
                     "http_status": 404})
    store.commit_batch(conn, outcomes)
    conn.close()
    return path, vecs


@pytest.mark.skipif(not Path(SQLITE3).exists(), reason="no sqlite3 shell")
def test_readme_sql_session_runs_in_the_sqlite3_shell(gallery):
    path, vecs = gallery
    load = subprocess.run([sys.executable, "cli.py", "vec-path"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert load == sqlite_vec.loadable_path()
    proc = subprocess.run([SQLITE3, str(path), "-cmd", f".load {load}"], input=sql_session(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    out = proc.stdout
    assert re.search(r"│\s*ok\s*│\s*6\s*│", out) and re.search(r"│\s*failed\s*│\s*1\s*│", out)
    assert "http-404: Not Found" in out
    # the KNN query: image 1 first with score 1.0, then its true nearest neighbours in order
    rows = re.findall(r"│\s*(\d+)\s*│\s*(-?[0-9.]+)\s*│\s*http://127\.0\.0\.1/(\d+)\.jpg", out)
    ids = [int(r[0]) for r in rows]
    sims = vecs @ vecs[0]
    expected = [int(i) + 1 for i in np.argsort(-sims)[:5]]
    assert ids == expected
    assert float(rows[0][1]) == 1.0
    assert [float(r[1]) for r in rows] == pytest.approx([round(float(s), 4) for s in np.sort(sims)[::-1][:5]], abs=1e-4)
