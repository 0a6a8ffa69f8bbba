"""README's "Opening the gallery with other tools": every recipe block (marked ``<!-- recipe: NAME -->``) runs,
verbatim, in a folder holding a test ``gallery.db``, with ``python`` being this project's interpreter (so
``python cli.py ...`` works there) and the tools as a user has them. The statements the section makes about
what fails are checked too."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from retrieval import store

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README.split("## Opening the gallery with other tools", 1)[1].split("\n## ", 1)[0]
SQLITE3 = Path("/usr/bin/sqlite3")
DIM = 8


def recipes() -> dict[str, tuple[str, str]]:
    """``{name: (language, code)}`` of the section's recipe blocks."""
    found = re.findall(r"<!-- recipe: ([\w-]+).*?-->\s*```(\w+)\n(.*?)```", SECTION, re.S)
    return {name: (lang, code) for name, lang, code in found}


def test_the_section_has_its_recipes():
    assert set(recipes()) == {"sqlite3", "datasette", "sqlite-utils", "pandas", "duckdb", "duckdb-sqlite"}


@pytest.fixture
def folder(tmp_path) -> Path:
    """A gallery of 6 ok images (with titles and vectors), 2 http-404 failures and 1 not-an-image, and a
    ``bin/python`` that runs this project's interpreter with ``cli.py`` beside the gallery."""
    work = tmp_path / "work"
    work.mkdir()
    conn = store.connect(work / "gallery.db")
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": DIM})
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((6, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    outcomes = [{"url": f"http://127.0.0.1/{i}.jpg", "status": "ok", "vector": v, "content_sha256": f"{i:064x}",
                 "path": f"gallery_images/{i}.jpg", "meta": {"title": f"picture {i}"}} for i, v in enumerate(vecs)]
    outcomes += [{"url": f"http://127.0.0.1/gone{i}.jpg", "status": "failed", "error": "http-404: Not Found"}
                 for i in range(2)]
    outcomes.append({"url": "http://127.0.0.1/page.html", "status": "failed", "error": "not-an-image: text"})
    store.commit_batch(conn, outcomes)
    conn.close()
    (work / "cli.py").symlink_to(ROOT / "cli.py")  # python resolves the link: retrieval/ is found beside it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    np.save(tmp_path / "vecs.npy", vecs)
    return work


def run_env(work: Path, *front) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINOV2_", "PYTHONPATH", "VIRTUAL_ENV"))}
    path = [str(work.parent / "bin"), *map(str, front), str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    env["PATH"] = os.pathsep.join(path)
    return env


def run_block(work: Path, name: str, env: dict | None = None, python: str | None = None, timeout: float = 120):
    lang, code = recipes()[name]
    env = env or run_env(work)
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [python or sys.executable, "-c", code]
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"recipe {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def vecs_of(work: Path) -> np.ndarray:
    return np.load(work.parent / "vecs.npy")


@pytest.mark.skipif(not SQLITE3.exists(), reason="no /usr/bin/sqlite3")
def test_sqlite3_recipe(folder):
    out = run_block(folder, "sqlite3")
    assert "http-404|2" in out and "not-an-image|1" in out
    knn = re.findall(r"^(\d+)\|([0-9.]+)$", out, re.M)
    vecs = vecs_of(folder)
    expected = [int(i) + 1 for i in np.argsort(-(vecs @ vecs[0]))[:3]]
    assert [int(i) for i, _ in knn] == expected and float(knn[0][1]) == 0.0
    for copy in ("gallery-backup.db", "gallery-compact.db"):
        p = subprocess.run([str(SQLITE3), str(folder / copy), "SELECT count(*) FROM images"], capture_output=True,
                           text=True, timeout=60)
        assert p.stdout.strip() == "9", (copy, p.stdout, p.stderr)


@pytest.mark.skipif(not SQLITE3.exists(), reason="no /usr/bin/sqlite3")
def test_limit_instead_of_k_fails_on_this_sqlite3_as_the_readme_says(folder):
    version = subprocess.run([str(SQLITE3), "--version"], capture_output=True, text=True).stdout.split()[0]
    if tuple(map(int, version.split(".")[:2])) >= (3, 41):
        pytest.skip(f"sqlite3 {version} hands LIMIT to virtual tables")
    vec = subprocess.run([sys.executable, "cli.py", "vec-path"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    p = subprocess.run([str(SQLITE3), "gallery.db", "-cmd", f".load {vec}",
                        "SELECT image_id FROM image_embeddings WHERE embedding MATCH "
                        "(SELECT embedding FROM image_embeddings WHERE image_id = 1) LIMIT 3"],
                       cwd=folder, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "A LIMIT or 'k = ?' constraint is required" in p.stderr


def test_sqlite_utils_recipe(folder):
    out = run_block(folder, "sqlite-utils")
    views = json.loads(out[: out.index("]") + 1])
    assert {v["view"]: v["count"] for v in views} == {"ok_images": 6, "failed_images": 3, "duplicate_images": 0,
                                                       "failure_reasons": 2}
    assert '"reason": "http-404", "images": 2' in out
    assert '"title": "picture 0"' in out


def test_sqlite_utils_tables_counts_fails_on_the_vec0_table_as_the_readme_says(folder):
    tool = Path(sys.executable).parent / "sqlite-utils"
    if not tool.exists():
        pytest.skip("sqlite-utils has no script in this environment")
    p = subprocess.run([str(tool), "tables", "gallery.db", "--counts"], cwd=folder, capture_output=True, text=True,
                       timeout=60)
    loads = subprocess.run([sys.executable, "-c", "import sqlite3; sqlite3.Connection.enable_load_extension"],
                           capture_output=True).returncode == 0
    if loads:
        pytest.skip("this Python's sqlite3 can load extensions")
    assert p.returncode != 0 and "no such module: vec0" in p.stderr
    assert '"table": "images", "count": 9' in p.stdout  # the plain tables before it were counted


def test_pandas_recipe(folder):
    out = run_block(folder, "pandas")
    assert out.strip() == f"6 (6, {DIM}) float32"


def test_duckdb_recipe(folder):
    pytest.importorskip("duckdb")
    pytest.importorskip("pyarrow")
    out = run_block(folder, "duckdb")
    vecs = vecs_of(folder)
    expected = [int(i) + 1 for i in np.argsort(-(vecs @ vecs[0]))[:3]]
    ids = [int(m) for m in re.findall(r"│\s+(\d+)\s+│\s+http://", out)]
    assert ids == expected, out


# ---------------------------------------------------------------- recipes for other Pythons (fresh venvs)


def make_venv(path: Path, python: str, *packages: str) -> Path:
    subprocess.run([python, "-m", "venv", str(path)], check=True, timeout=120, capture_output=True)
    pip = subprocess.run([str(path / "bin" / "pip"), "install", "-q", *packages], capture_output=True, text=True,
                         timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"cannot install {' '.join(packages)} here: {pip.stderr.strip().splitlines()[-1:]}")
    return path


def extension_python() -> str | None:
    """A Python on this machine whose sqlite3 loads extensions (Debian's), as most users' Pythons do."""
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and Path(exe).exists() and subprocess.run(
                [exe, "-c", "import ensurepip, venv, sqlite3; sqlite3.Connection.enable_load_extension"],
                capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_datasette_recipe_on_a_python_that_loads_extensions(folder, tmp_path):
    """The recipe with Datasette installed in a Python whose sqlite3 loads extensions (python cli.py stays
    this project's). Its server line runs in the background on a free port instead of 8001."""
    exe = extension_python()
    if exe is None:
        pytest.skip("no Python here whose sqlite3 loads extensions")
    venv = make_venv(tmp_path / "dsv", exe, "datasette>=0.65")
    env = run_env(folder, venv / "bin")
    lang, code = recipes()["datasette"]
    first, serve = code.strip().splitlines()
    assert serve.startswith("datasette serve") and "--port 8001" in serve
    port = free_port()
    subprocess.run(["bash", "-euo", "pipefail", "-c", first], cwd=folder, env=env, check=True, timeout=120)
    proc = subprocess.Popen(["bash", "-c", "exec " + serve.replace("--port 8001", f"--port {port}")], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gallery/similar.json?id=1&k=2&_shape=array",
                                            timeout=5) as r:
                    rows = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(proc.communicate()[1][-3000:])
                time.sleep(0.3)
        vecs = vecs_of(folder)
        assert [r["id"] for r in rows] == [int(i) + 1 for i in np.argsort(-(vecs @ vecs[0]))[1:3]]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_duckdb_sqlite_scanner_recipe(folder, tmp_path):
    """DuckDB's SQLite scanner cannot be downloaded here: the venv gets a DuckDB whose scanner PyPI ships
    (duckdb-extension-sqlite-scanner), placed where ``INSTALL sqlite`` finds it installed already."""
    version = "1.5.5"
    venv = make_venv(tmp_path / "duckv", sys.executable, f"duckdb=={version}",
                     f"duckdb-extension-sqlite-scanner=={version}")
    py = str(venv / "bin" / "python")
    ext = subprocess.run([py, "-c", "import duckdb_extension_sqlite_scanner as m, os; print(os.path.dirname(m.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    home = tmp_path / "home"
    target = home / ".duckdb" / "extensions" / f"v{version}" / "linux_amd64"
    target.mkdir(parents=True)
    shutil.copy(Path(ext) / "extensions" / f"v{version}" / "sqlite_scanner.duckdb_extension", target)
    env = {**run_env(folder), "HOME": str(home)}
    out = run_block(folder, "duckdb-sqlite", env=env, python=py)
    assert re.search(r"http-404\s+│\s+2", out) and "picture 5" in out, out
    # and what the README says fails there
    p = subprocess.run([py, "-c", "import duckdb; c = duckdb.connect(); c.execute('LOAD sqlite'); "
                        "c.execute(\"ATTACH 'gallery.db' AS g (TYPE sqlite, READ_ONLY)\"); c.sql('SHOW ALL TABLES').fetchall()"],
                       cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no such module: vec0" in p.stderr
