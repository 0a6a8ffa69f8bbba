"""The benchmarks' reference is transformers as its users run it (issue 15): the default attention
implementation (SDPA on CPU, not eager), float32, under ``torch.inference_mode()``. Nothing here is
timed; the speed itself is measured by bench/bench_encoder.py.

The reference model is built by ``tests/reference.py`` (``hf_model`` / ``load_hf`` / ``hf_run``), which
bench/bench_encoder.py's torch worker and bench/hf_embed.py both import; the last two tests run those
scripts themselves and read back which attention implementation they ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.variants import ModelConfig, random_params

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig(dim=64, depth=2, grid=4)  # one head, 56x56 position table: built in a fraction of a second


def test_reference_model_uses_transformers_default_attention():
    import torch
    from reference import default_attn_implementation, hf_model, hf_run

    params = random_params(TINY, seed=1)
    model = hf_model(params, TINY)
    default = default_attn_implementation(TINY)  # what transformers picks when nobody names one
    assert default == "sdpa"  # the default the docs' figures are measured against
    assert model.config._attn_implementation == default
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training

    pixels = np.random.default_rng(2).standard_normal((2, 3, 56, 84), dtype=np.float32)
    out = hf_run(model, pixels)
    assert out.is_inference() and out.dtype == torch.float32 and tuple(out.shape) == (2, 1 + 4 * 6, 64)

    # the labelled extra column: eager attention on request, the same function of the same weights
    eager = hf_model(params, TINY, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ref = hf_run(eager, pixels)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.slow
def test_bench_encoder_torch_worker_runs_the_default_attention():
    """The timed torch side of bench_encoder.py (its worker subprocess, as the benchmark starts it)."""
    cmd = [sys.executable, "bench/bench_encoder.py", "--worker", "torch", "--setting", "small:28x28:1",
           "--warmup", "0", "--repeats", "1", "--min-seconds", "0", "--sgemm-repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attn"] == "sdpa"
    assert len(out["times"]) == 1


@pytest.mark.slow
def test_hf_embed_runs_the_default_attention(tmp_path):
    """The transformers side of the whole-process comparison (bench/hf_embed.py) on a tiny model."""
    from PIL import Image
    from reference import save_hf

    model_dir = save_hf(random_params(TINY, seed=3), TINY, tmp_path / "model")
    images = []
    for i, size in enumerate([(64, 48), (48, 64)]):
        path = tmp_path / f"img{i}.jpg"
        rgb = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path, quality=90)
        images.append(str(path))
    feats = tmp_path / "feats.npy"
    cmd = [sys.executable, "bench/hf_embed.py", *images, "--model-dir", str(model_dir), "--threads", "1",
           "--out", str(feats)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("(transformers sdpa)")
    out = np.load(feats)
    assert out.shape == (2, 64) and out.dtype == np.float32 and np.isfinite(out).all()
