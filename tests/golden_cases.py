"""The seeded cases behind tests/golden/encoder.npz (shared by scripts/make_golden.py and the test)."""

import numpy as np

# variant, depth (None = full), weights seed
CASES = [("small", None, 101), ("small-reg", None, 102), ("giant", 1, 103)]
SHAPES = [(224, 224), (224, 308), (308, 224), (518, 518), (70, 126)]


def pixels_for(H: int, W: int) -> np.ndarray:
    """Deterministic normalised pixels (2, 3, H, W) float32 for one input shape."""
    return np.random.default_rng(H * 1000 + W).standard_normal((2, 3, H, W), dtype=np.float32)


def fingerprint(params: dict) -> np.ndarray:
    """A few sums that change if the seeded weights ever change (e.g. a NumPy RNG stream change)."""
    names = sorted(params)
    return np.array([float(np.abs(params[n].astype(np.float64)).sum()) for n in names[:: max(1, len(names) // 16)]])
