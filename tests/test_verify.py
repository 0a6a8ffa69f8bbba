"""``cli.py verify``: reference features from transformers itself, checked under each interpolation behaviour."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.variants import official_config, random_params

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    from reference import hf_model
    from retrieval.weights import save_params

    d = tmp_path_factory.mktemp("verify")
    cfg = official_config("small", depth=2)
    params = random_params(cfg, seed=5)
    weights = d / "w.safetensors"
    save_params(params, weights)
    rng = np.random.default_rng(0)
    images = []
    for name, (w, h) in {"cat.png": (498, 415), "dog.png": (421, 499)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
        images.append(d / name)
    return d, weights, images, hf_model(params, cfg)


def reference_features(model, images, route):
    from reference import hf_tokens
    from retrieval.decode import open_path
    from retrieval.preprocess import preprocess

    return np.concatenate([hf_tokens(model, preprocess(open_path(p), route)[None])[:, 0] for p in images])


def run_verify(weights, ref, images, *extra):
    return subprocess.run([sys.executable, "cli.py", "verify", "--reference", str(ref), *map(str, images),
                           "--weights", str(weights), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_verify_finds_the_behaviour_that_made_the_reference(setup):
    from reference import use_official_interpolation

    d, weights, images, model = setup
    # resize-short gives 266x224 and 224x266 inputs: off the 37x37 grid, so the behaviours differ
    ref = d / "hf.npy"
    np.save(ref, reference_features(model, images, "resize-short").astype(np.float64))
    proc = run_verify(weights, ref, images, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["matches"] == ["size"]
    size_rows = [r for r in out["rows"] if r["behaviour"] == "size"]
    assert len(size_rows) == 2 and all(r["mae"] < 1e-6 and r["cosine"] > 0.999999 for r in size_rows)

    official = d / "official.npy"
    np.save(official, reference_features(use_official_interpolation(model), images, "resize-short"))
    del model.embeddings.interpolate_pos_encoding
    proc = run_verify(weights, official, images)
    assert proc.returncode == 0, proc.stderr
    assert "match: offset 0.1 (official dinov2)" in proc.stdout


def test_verify_center_crop_text_report_and_mismatch_exit_code(setup):
    d, weights, images, model = setup
    ref = d / "crop.npy"
    feats = reference_features(model, images, "center-crop")
    np.save(ref, feats)
    proc = run_verify(weights, ref, images, "--preprocess", "center-crop")
    assert proc.returncode == 0, proc.stderr
    # 224x224 is a 16x16 grid: even a square grid tells the offset-0.1 scale factor from the output size
    assert "match: size (transformers Dinov2Model) (every image" in proc.stdout
    assert proc.stdout.count("cat.png") == 3 and proc.stdout.count("dog.png") == 3

    wrong = d / "wrong.npy"
    np.save(wrong, feats * 1.01)
    proc = run_verify(weights, wrong, images, "--preprocess", "center-crop")
    assert proc.returncode == 1
    assert "no match" in proc.stdout


def test_verify_refuses_a_reference_of_the_wrong_shape(setup):
    d, weights, images, _ = setup
    bad = d / "bad.npy"
    np.save(bad, np.zeros((3, 384)))
    proc = run_verify(weights, bad, images)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bad.npy" in proc.stderr and "(3, 384)" in proc.stderr
