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


def setup_commands() -> list[str]:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_two_setup_commands():
    cmds = setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert "cli.py ingest --csv demo_data/demo.csv" in cmds[0] and "cli.py query" in cmds[0]
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci, ".ci/run must run the README's test command"


def clone_working_tree(clone):
    """A clone of the project with the working tree as it is now (tests run before a commit too)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / f)
    return clone


def clean_env(tmp_path, weights):
    """This environment without our venv, with random weights standing in for the hub download."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "DINOV2_"))}
    env.update(DINOV2_WEIGHTS=str(weights), DINOV2_OFFLINE="1", DINOV2_CACHE=str(tmp_path / "cache"))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "venv" not in p)
    return env


@pytest.mark.slow
def test_readme_main_command_works_in_a_fresh_venv(tmp_path):
    """The first set-up command, verbatim, in a fresh clone and virtual environment (offline: random
    weights of the real shapes stand in for the hub download, which these machines cannot reach)."""
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    clone = clone_working_tree(tmp_path / "clone")
    weights = tmp_path / "small.safetensors"
    save_params(random_params(official_config("small", depth=2), seed=0), weights)
    env = clean_env(tmp_path, weights)
    proc = subprocess.run(["bash", "-c", setup_commands()[0]], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "completed: 4 new, 0 skipped, 0 failed" in proc.stdout
    ranks = re.findall(r"^\s+(\d)\s+([0-9.]+)\s+\d+\s+demo_data/images/", proc.stdout, re.M)
    assert [r[0] for r in ranks] == ["1", "2", "3", "4"], proc.stdout
    # nothing was downloaded (the cache may hold only the remembered sha256 of the weights file)
    assert (clone / "gallery.db").exists() and not any((tmp_path / "cache").rglob("*.safetensors*"))


@pytest.mark.slow
def test_a_wheel_install_finds_its_migrations(tmp_path):
    """``pip install .`` (not editable) installs no checkout beside the package: the migrations travel as
    data files, and an ingest run from elsewhere creates the full schema."""
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    clone = clone_working_tree(tmp_path / "clone")
    weights = tmp_path / "small.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=0), weights)
    env = clean_env(tmp_path, weights)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(clone)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(clone)  # nothing may be read from the source tree
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "images.csv").write_text("url\n" + "".join(f"{p}\n" for p in sorted((ROOT / "demo_data" / "images").glob("*.jpg"))))
    # the CSV names files outside its own folder: --files-root allows that folder (issue 10's confinement)
    proc = subprocess.run([str(venv / "bin" / "dinov2-gallery"), "ingest", "--csv", "images.csv", "--db", "g.db",
                           "--files-root", str(ROOT / "demo_data" / "images")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "completed: 4 new, 0 skipped, 0 failed" in proc.stdout
    shell = subprocess.run(["/usr/bin/sqlite3", str(work / "g.db"), "SELECT name FROM migrations ORDER BY name"],
                           capture_output=True, text=True, timeout=60)
    assert shell.stdout.split() == [p.stem for p in sorted((ROOT / "migrations").glob("*.sql"))]


def python_loading_extensions():
    """Another interpreter on this machine whose sqlite3 module can load extensions and which can make a
    venv (Debian's /usr/bin/python3 here; this venv's Python cannot), or None."""
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if not exe or not Path(exe).exists() or Path(exe).resolve() == Path(sys.executable).resolve():
            continue
        probe = subprocess.run([exe, "-c", "import ensurepip, sqlite3, venv; sqlite3.Connection.enable_load_extension"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return exe
    return None


@pytest.mark.slow
def test_a_python_whose_sqlite3_loads_extensions_uses_it(tmp_path):
    """Most users' Pythons (Debian's, python.org's, conda's) can load SQLite extensions, and the gallery is
    then opened by the standard sqlite3 module rather than sqlean: ingest and query work that way, and the
    same file is shared with sqlean (this interpreter) and the sqlite3 shell."""
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    exe = python_loading_extensions()
    if exe is None:
        pytest.skip("no other Python here whose sqlite3 module loads extensions")
    clone = clone_working_tree(tmp_path / "clone")
    weights = tmp_path / "small.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=0), weights)
    env = clean_env(tmp_path, weights)
    venv = tmp_path / "v"
    subprocess.run([exe, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(clone)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    driver = subprocess.run([str(venv / "bin" / "python"), "-c", "from retrieval import store; print(store._driver().__name__)"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert driver.stdout.strip() == "sqlite3", driver.stdout + driver.stderr

    images = sorted((ROOT / "demo_data" / "images").glob("*.jpg"))
    csv, db = tmp_path / "images.csv", tmp_path / "g.db"
    csv.write_text("url\n" + "".join(f"{p}\n" for p in images))
    tool = str(venv / "bin" / "dinov2-gallery")
    root = ["--files-root", str(ROOT / "demo_data" / "images")]  # the CSV names files outside its folder
    proc = subprocess.run([tool, "ingest", "--csv", str(csv), "--db", str(db), *root], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "completed: 4 new, 0 skipped, 0 failed" in proc.stdout, proc.stdout + proc.stderr
    query = subprocess.run([tool, "query", str(images[2]), "--db", str(db), "-k", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    first = next(line for line in query.stdout.splitlines() if re.match(r"\s+1\s", line))
    assert images[2].name in first and re.search(r"\s1\.0+\s", first), query.stdout

    # the same file through sqlean (this interpreter): every image is known
    again = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), *root], cwd=ROOT,
                           env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "completed: 0 new, 4 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    shell = subprocess.run([SQLITE3, str(db), "-cmd", f".load {sqlite_vec.loadable_path()}",
                            "SELECT count(*) FROM image_embeddings"], capture_output=True, text=True, timeout=60)
    assert shell.stdout.strip() == "4", shell.stdout + shell.stderr
