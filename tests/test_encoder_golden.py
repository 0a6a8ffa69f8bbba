"""Our encoder against transformers' outputs stored by scripts/make_golden.py: runs without torch.

The weights and pixels are regenerated here from their seeds; only transformers' CLS features are stored.
"""

from pathlib import Path

import numpy as np
import pytest

from golden_cases import CASES, SHAPES, fingerprint, pixels_for
from reference import errors
from retrieval import model as M
from retrieval.variants import official_config, random_params

GOLDEN = np.load(Path(__file__).parent / "golden" / "encoder.npz")


@pytest.mark.parametrize("variant,depth,seed", CASES, ids=[c[0] for c in CASES])
def test_encoder_matches_stored_transformers_outputs(variant, depth, seed):
    cfg = official_config(variant, depth)
    params = random_params(cfg, seed)
    np.testing.assert_allclose(fingerprint(params), GOLDEN[f"{variant}/fingerprint"], rtol=1e-6,
                               err_msg="seeded weights changed: regenerate with scripts/make_golden.py")
    model = M.prepare(params, cfg)
    for interpolation in (["hf"] if cfg.registers else ["hf", "official"]):
        for H, W in SHAPES:
            got = M.embed(model, pixels_for(H, W), interpolation=interpolation)
            e = errors(got, GOLDEN[f"{variant}/{interpolation}/{H}x{W}"])
            assert e["rel_max"] <= 1e-5 and e["cos_min"] >= 0.999999, (variant, interpolation, H, W, e)


@pytest.mark.parametrize("variant,depth,seed", CASES, ids=[c[0] for c in CASES])
def test_encoder_one_image_at_a_time_matches_stored_outputs(variant, depth, seed):
    """Batch 1 takes the other way of splitting the work over threads (by heads and hidden units, not by
    image): each image's feature must still be transformers' feature for it."""
    cfg = official_config(variant, depth)
    model = M.prepare(random_params(cfg, seed), cfg)
    for H, W in SHAPES[:2]:
        pixels = pixels_for(H, W)
        got = np.concatenate([M.embed(model, pixels[i:i + 1]) for i in range(len(pixels))])
        e = errors(got, GOLDEN[f"{variant}/hf/{H}x{W}"])
        assert e["rel_max"] <= 1e-5 and e["cos_min"] >= 0.999999, (variant, H, W, e)
