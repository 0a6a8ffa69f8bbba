"""``cli.py embed`` over more files than it decodes at a time: every row is its own image's feature, in order."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import model as M
from retrieval.decode import open_path
from retrieval.preprocess import preprocess
from retrieval.variants import official_config, random_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    from retrieval.weights import save_params

    d = tmp_path_factory.mktemp("embed")
    cfg = official_config("small", depth=1)
    params = random_params(cfg, seed=3)
    weights = d / "w.safetensors"
    save_params(params, weights)
    rng = np.random.default_rng(0)
    images = []
    for i in range(37):  # three aspect ratios: three shapes after resize-short
        w, h = [(60, 40), (40, 60), (50, 50)][i % 3]
        path = d / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return d, weights, images, M.prepare(params, cfg)


def run_embed(weights, images, out, *extra):
    proc = subprocess.run([sys.executable, "cli.py", "embed", *map(str, images), "--weights", str(weights), "--offline",
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def test_embed_in_windows_keeps_every_image_in_its_row(setup):
    d, weights, images, model = setup
    # batch size 1: 32 files decoded at a time, so 37 files take two windows; batch size 8: one window
    small = run_embed(weights, images, d / "b1.npy", "--batch-size", "1")
    big = run_embed(weights, images, d / "b8.npy", "--batch-size", "8")
    assert small.shape == big.shape == (37, 384) and small.dtype == np.float32
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-5 * np.abs(big).max())
    for i in (0, 1, 2, 31, 32, 33, 36):  # each side of the window boundary
        alone = M.embed(model, preprocess(open_path(images[i]), "resize-short")[None])[0]
        np.testing.assert_allclose(small[i], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
