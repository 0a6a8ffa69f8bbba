"""Our encoder against the reference implementation itself: transformers' Dinov2Model and
Dinov2WithRegistersModel running the same randomly initialised weights (real shapes).

Acceptance: relative max error (max|diff| / max|ref|) <= 1e-5 and cosine >= 0.999999 on the CLS
feature, for every variant, input shape, interpolation behaviour and preprocessing route.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import model as M
from retrieval.variants import official_config, random_params

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(224, 224), (224, 308), (308, 224), (518, 518), (70, 126)]
REL_TOL, COS_TOL = 1e-5, 0.999999

# variant, depth (giant reduced: full depth is 1.1 B parameters), batch size
VARIANTS = [("small", None, 2), ("base", None, 2), ("large", None, 1), ("giant", 2, 1), ("base-reg", None, 2)]


def check(ours, ref, what):
    from reference import errors

    e = errors(ours, ref)
    assert e["rel_max"] <= REL_TOL and e["cos_min"] >= COS_TOL, f"{what}: {e}"
    return e


@pytest.fixture(scope="module", params=VARIANTS, ids=[v[0] for v in VARIANTS])
def pair(request):
    from reference import hf_model

    variant, depth, batch = request.param
    cfg = official_config(variant, depth)
    params = random_params(cfg, seed=7)
    return cfg, M.prepare(params, cfg), hf_model(params, cfg), batch


@pytest.mark.parametrize("interpolation", ["hf", "official"])
def test_cls_matches_transformers(pair, interpolation):
    from reference import hf_model, hf_tokens, use_official_interpolation

    cfg, ours, ref, batch = pair
    if interpolation == "official":
        if cfg.registers:
            pytest.skip("register variants interpolate the same way in both implementations")
        ref = use_official_interpolation(ref)
    try:
        rng = np.random.default_rng(3)
        for H, W in SHAPES:
            if cfg.dim >= 1024 and (H, W) == (518, 518) and interpolation == "official":
                continue  # no interpolation at 518x518 in either behaviour: covered by the hf run
            pixels = rng.standard_normal((batch, 3, H, W), dtype=np.float32)
            got = M.embed(ours, pixels, interpolation=interpolation)  # (B, D)
            want = hf_tokens(ref, pixels)[:, 0]  # (B, D)
            check(got, want, f"{cfg.variant} {H}x{W} {interpolation}")
    finally:
        if interpolation == "official":
            del ref.embeddings.interpolate_pos_encoding  # back to the class's method


def test_pooling_and_patch_tokens_match(pair):
    from reference import hf_tokens

    cfg, ours, ref, _ = pair
    pixels = np.random.default_rng(4).standard_normal((1, 3, 224, 308), dtype=np.float32)
    want = hf_tokens(ref, pixels)  # (1, T, D)
    tokens = M.forward(ours, pixels, M.pos_mode_for(cfg, "hf"))
    check(tokens[0], want[0], "all tokens")
    check(M.embed(ours, pixels, pooling="mean"), want[:, 1 + cfg.registers:].mean(1), "mean pooling")
    concat = M.embed(ours, pixels, pooling="concat")
    assert concat.shape == (1, 2 * cfg.dim)
    grid = M.patch_tokens(tokens, cfg, 16, 22)
    check(grid.reshape(-1, cfg.dim), want[0, 1 + cfg.registers:], "patch tokens")


def test_official_interpolation_differs_from_hf():
    """The two behaviours give measurably different features off the 37x37 grid (so the tests above can fail)."""
    cfg = official_config("small", 2)
    model = M.prepare(random_params(cfg, 1), cfg)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 308), dtype=np.float32)
    a = M.embed(model, pixels, interpolation="hf")
    b = M.embed(model, pixels, interpolation="official")
    assert np.abs(a - b).max() / np.abs(a).max() > 1e-3


def _photo(path: Path, w: int, h: int, seed: int):
    """A photo-like image: smooth gradients, a few shapes and noise, saved by Pillow."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        d.ellipse([x0, y0, x0 + rng.integers(5, w // 2), y0 + rng.integers(5, h // 2)],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    return [_photo(d / "a.jpg", 498, 415, 1), _photo(d / "b.png", 421, 499, 2), _photo(d / "c.jpg", 640, 200, 3)]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    from reference import hf_model
    from retrieval.weights import save_params

    cfg = official_config("base")
    params = random_params(cfg, seed=11)
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    save_params(params, path)
    return path, cfg, params, hf_model(params, cfg)


@pytest.mark.parametrize("route", ["resize-short", "center-crop", "hf"])
def test_routes_through_cli_embed_match_transformers(base_weights, photos, tmp_path, route):
    """``cli.py embed`` end to end: files -> our preprocessing -> our encoder, vs transformers on the same pixels."""
    from reference import hf_tokens
    from retrieval.decode import open_path
    from retrieval.preprocess import preprocess

    path, cfg, _, ref = base_weights
    out = tmp_path / "feats.npy"
    proc = subprocess.run(
        [sys.executable, "cli.py", "embed", *map(str, photos), "--weights", str(path), "--preprocess", route,
         "--batch-size", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(photos), cfg.dim)
    for row, photo in zip(got, photos):
        pixels = preprocess(open_path(photo), route)[None]
        check(row[None], hf_tokens(ref, pixels)[:, 0], f"{photo.name} {route}")
