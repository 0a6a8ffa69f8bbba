"""Write tests/golden/encoder.npz: transformers' CLS features for seeded random weights and inputs.

Run once with the torch extra installed (``pip install -e '.[torch]'``):

    python scripts/make_golden.py

The default test run (no torch) regenerates the same weights and pixels from their seeds and checks
our encoder against these outputs (tests/test_encoder_golden.py). Only the small outputs are stored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from golden_cases import CASES, SHAPES, fingerprint, pixels_for  # noqa: E402
from reference import hf_model, hf_tokens, use_official_interpolation  # noqa: E402
from retrieval.variants import official_config, random_params  # noqa: E402


def main() -> None:
    out: dict[str, np.ndarray] = {}
    for variant, depth, seed in CASES:
        cfg = official_config(variant, depth)
        params = random_params(cfg, seed)
        out[f"{variant}/fingerprint"] = fingerprint(params)
        model = hf_model(params, cfg)
        behaviours = ["hf"] if cfg.registers else ["hf", "official"]
        for interpolation in behaviours:
            if interpolation == "official":
                model = use_official_interpolation(model)
            for H, W in SHAPES:
                out[f"{variant}/{interpolation}/{H}x{W}"] = hf_tokens(model, pixels_for(H, W))[:, 0]
        print(variant, "done", file=sys.stderr)
    path = ROOT / "tests" / "golden" / "encoder.npz"
    np.savez_compressed(path, **out)
    print(f"{path}: {len(out)} arrays, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
