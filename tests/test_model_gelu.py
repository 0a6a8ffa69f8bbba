"""The float32 GELU (a rational approximation, not SciPy's erf) against the exact function in float64."""

import numpy as np
import pytest
from scipy.special import erfc

from retrieval.model import gelu


def exact(x):
    x = np.asarray(x, np.float64)
    return x * 0.5 * erfc(-x / np.sqrt(2))  # x Phi(x), no cancellation for negative x


def float32_sample(step=997):
    """Every step-th positive float32 below 1e30 and its negative, plus the values that matter most."""
    pos = np.arange(0, 0x7149F2CA, step, dtype=np.uint32).view(np.float32)  # 0x7149F2CA = 1e30
    dense = np.linspace(-10, 10, 2_000_001, dtype=np.float32)
    return np.concatenate([pos, -pos, dense])


def test_float32_gelu_is_as_accurate_as_erf_through_float64():
    x = float32_sample()
    got = gelu(x.copy())
    err = np.abs(got.astype(np.float64) - exact(x))
    # half an ulp of the largest |gelu| near the transition (4) and ~1 ulp relative elsewhere
    assert err.max() <= 2.6e-7
    assert (err / np.maximum(np.abs(exact(x)), 1)).max() <= 1.3e-7
    assert got.dtype == np.float32


def test_float32_gelu_scratch_buffers_and_in_place():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((7, 40), dtype=np.float32) * 4
    want = exact(h)
    scratch = [np.empty_like(h) for _ in range(3)]
    out = gelu(h, *scratch)
    assert out is h
    np.testing.assert_allclose(h, want, rtol=0, atol=2.6e-7)
    view = rng.standard_normal((5, 30), dtype=np.float32)  # a strided column slice, as in the FFN
    want = exact(view[:, 3:17])
    gelu(view[:, 3:17])
    np.testing.assert_allclose(view[:, 3:17], want, rtol=0, atol=2.6e-7)


@pytest.mark.parametrize("value, want", [(0.0, 0.0), (1e30, 1e30), (3e38, 3e38), (-3e38, 0.0), (np.inf, np.inf), (-1e-30, -5e-31)])
def test_float32_gelu_extremes_stay_finite_and_right(value, want):
    got = gelu(np.array([value], np.float32))[0]
    assert got == pytest.approx(want, abs=1e-14, rel=1e-6)


def test_float64_gelu_uses_erf():
    x = np.linspace(-8, 8, 10001)
    np.testing.assert_allclose(gelu(x.copy()), exact(x), rtol=1e-14, atol=1e-15)  # erf form: 1 + erf cancels for negative x, as in torch
