"""Helpers for the web app's tests: a small real gallery, a real ``cli.py serve`` process on 127.0.0.1, and
headless Chromium (Debian's chromium + chromedriver) driven by Selenium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and os.path.exists(p)), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and os.path.exists(p)), None)
SCRIPT_CAPTION = "<script>window.__xss = 1</script><b>bold?</b>"


def picture(seed: int, size=(96, 72)) -> Image.Image:
    """A distinct picture: a few coloured blocks and a gradient, different for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        a[y0:y0 + rng.integers(8, h), x0:x0 + rng.integers(8, w)] = rng.integers(0, 256, 3)
    a[:, :, seed % 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(a)


def jpeg(seed: int, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def small_weights(path: Path) -> Path:
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    save_params(random_params(official_config("small", depth=1), seed=0), path)
    return path


def base_env(weights: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("DINOV2_")}
    env.update(DINOV2_OFFLINE="1", DINOV2_WEIGHTS=str(weights), DINOV2_CACHE=str(cache),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    if os.environ.get("DINOV2_ALLOW_PRIVATE"):  # the tests' loopback servers (tests/conftest.py)
        env["DINOV2_ALLOW_PRIVATE"] = os.environ["DINOV2_ALLOW_PRIVATE"]
    return env


def cli(env: dict, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


N_IMAGES = 12


def make_gallery(root: Path, env: dict) -> dict:
    """A CSV gallery of N_IMAGES pictures (p0..p11.jpg, meta title/kind), one with a <script> caption, a
    duplicate of p0, and two failures; ingested with mean pooling (scores spread out even with random
    weights). Returns {"db", "folder", "ids": {file name: id}, "failed": [ids], "files": {name: path}}."""
    import sqlite3  # reading plain columns needs no extension

    folder = root / "pics"
    folder.mkdir(parents=True)
    lines = ["url,title,kind"]
    files = {}
    for i in range(N_IMAGES):
        name = f"p{i}.jpg"
        (folder / name).write_bytes(jpeg(100 + i, (96 + 8 * (i % 3), 72 + 8 * (i % 2))))
        files[name] = folder / name
        title = SCRIPT_CAPTION if i == 3 else f"photo {i}"
        lines.append(f"pics/{name},\"{title}\",{'a' if i % 2 == 0 else 'b'}")
    (folder / "p0_copy.jpg").write_bytes((folder / "p0.jpg").read_bytes())
    lines.append("pics/p0_copy.jpg,copy of photo 0,a")
    lines.append("<script>window.__xss = 2</script>,not a url,x")
    lines.append("pics/missing.jpg,missing file,x")
    csv = root / "gallery.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = root / "g.db"
    p = cli(env, "ingest", "--csv", csv, "--db", db, "--pooling", "mean", "-q")
    assert p.returncode == 0, p.stderr
    con = sqlite3.connect(db)
    try:
        ids = {Path(url).name: i for i, url in con.execute("SELECT id, url FROM images WHERE status != 'failed'")}
        failed = [r[0] for r in con.execute("SELECT id FROM images WHERE status = 'failed' ORDER BY id")]
    finally:
        con.close()
    return {"db": db, "folder": folder, "ids": ids, "failed": failed, "files": files, "csv": csv}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``cli.py serve`` in a subprocess; ``.url(path)``, ``.stop()``."""

    def __init__(self, env: dict, db: Path, *args, host: str = "127.0.0.1"):
        import requests

        self.port = free_port()
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, "cli.py", "serve", "--db", str(db), "--host", host, "--port", str(self.port), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy for loopback
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"serve exited {self.proc.returncode}\nstdout: {out}\nstderr: {err}")
            try:
                if self.http.get(self.url("/api/health"), timeout=2).status_code == 200:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("serve did not answer within 60 s")
            time.sleep(0.1)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_model(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.http.get(self.url("/api/health")).json()["model"]["loaded"]:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.communicate()


def browser_or_skip():
    """A headless Chromium WebDriver. Skips only when chromium is truly absent and CI is not set."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium/chromedriver are missing (.ci/run installs them)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    import tempfile

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-proxy-server", "--window-size=1100,800", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver._profile_dir = profile
    return driver


def close_browser(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(getattr(driver, "_profile_dir", ""), ignore_errors=True)
