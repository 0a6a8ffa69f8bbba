"""Tests for retrieval.interpolate: bicubic position-embedding resizing, checked against PyTorch.

The torch-free tests pin the matrices on hand-computed cases; the ``torch`` tests compare
against ``torch.nn.functional.interpolate`` and the real transformers / official DINOv2 code.
"""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest

import retrieval.interpolate as interp
from retrieval.interpolate import MODES, bicubic_matrix, interpolate_pos_embed, resize

M = 37  # the DINOv2 table grid (518 px / patch 14)
TOL = 1e-6  # allowed max abs error relative to max |reference|

# ---------------------------------------------------------------- torch-free


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    "n_in, n_out, sf",
    [(37, 16, None), (37, 74, None), (7, 3, None), (3, 11, None), (37, 1, None), (1, 5, None),
     (37, 16, 16.1 / 37), (37, 40, 40.1 / 37), (10, 25, 2.5)],
)
def test_rows_sum_to_one(n_in, n_out, sf, antialias):
    mat = bicubic_matrix(n_in, n_out, scale_factor=sf, antialias=antialias)
    assert mat.shape == (n_out, n_in) and mat.dtype == np.float64
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=2e-6)  # float32 weights


@pytest.mark.parametrize("n", [1, 5, 37])
@pytest.mark.parametrize("antialias", [False, True])
def test_identity_when_sizes_match(n, antialias):
    np.testing.assert_array_equal(bicubic_matrix(n, n, antialias=antialias), np.eye(n))


def test_plain_upsample_2_to_4_by_hand():
    # scale 1/2: output i samples source (i + 0.5)/2 - 0.5 = -0.25, 0.25, 0.75, 1.25.
    # Keys a=-0.75: k(x) = 1.25|x|^3 - 2.25|x|^2 + 1 (|x|<=1), -0.75|x|^3 + 3.75|x|^2 - 6|x| + 3 (1<|x|<2)
    # k(0.25)=0.87890625, k(0.75)=0.26171875, k(1.25)=-0.10546875, k(1.75)=-0.03515625;
    # taps outside [0, 1] are clamped onto the border pixel.
    expected = np.array(
        [
            [-0.03515625 + 0.26171875 + 0.87890625, -0.10546875],
            [-0.10546875 + 0.87890625, 0.26171875 - 0.03515625],
            [0.26171875 - 0.03515625, -0.10546875 + 0.87890625],
            [-0.10546875, -0.03515625 + 0.26171875 + 0.87890625],
        ]
    )
    np.testing.assert_array_equal(bicubic_matrix(2, 4), expected)


def test_antialias_downsample_4_to_2_by_hand():
    # scale 2: support widens to 2*2 = 4 input pixels, taps evaluated at (pixel - centre)/2 with
    # Keys a=-0.5: k(x) = 1.5|x|^3 - 2.5|x|^2 + 1, -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2.
    # Output 0 (centre 1.0) sees pixels 0..3 at x = -0.25, 0.25, 0.75, 1.25 -> the window is
    # truncated at the left border and the surviving weights renormalised.
    w = np.array([0.8671875, 0.8671875, 0.2265625, -0.0703125])
    row0 = w / w.sum()
    expected = np.stack([row0, row0[::-1]])
    np.testing.assert_allclose(bicubic_matrix(4, 2, antialias=True), expected, rtol=0, atol=1e-7)


def test_plain_downsample_uses_a_minus_075_and_aa_differs():
    plain = bicubic_matrix(37, 16)
    aa = bicubic_matrix(37, 16, antialias=True)
    assert (np.count_nonzero(plain, axis=1) <= 4).all()
    assert np.count_nonzero(aa, axis=1).max() > 4  # widened support when downsampling
    assert not np.allclose(plain, aa)


def test_scale_factor_changes_the_mapping():
    size_mode = bicubic_matrix(37, 16)
    offset_mode = bicubic_matrix(37, 16, scale_factor=16.1 / 37)
    assert not np.allclose(size_mode, offset_mode)
    # with scale_factor = out/in exactly, the two coincide up to float rounding of 1/scale
    np.testing.assert_allclose(bicubic_matrix(37, 74, scale_factor=2.0), bicubic_matrix(37, 74), atol=1e-7)


def test_matrix_is_cached_and_read_only():
    a = bicubic_matrix(37, 22, antialias=True)
    assert bicubic_matrix(37, 22, antialias=True) is a
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_resize_is_separable_matrix_product_and_keeps_float32():
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((7, 9, 5)).astype(np.float32)  # (h, w, C)
    out = resize(grid, (4, 13))
    assert out.shape == (4, 13, 5) and out.dtype == np.float32
    expected = np.einsum("oh,hwc,pw->opc", bicubic_matrix(7, 4), grid.astype(np.float64), bicubic_matrix(9, 13))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def _table(d=8, m=M, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 1 + m * m, d)).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_pos_embed_shapes_skip_and_cls(mode):
    table = _table()
    assert interpolate_pos_embed(table, M, M, mode) is table  # skip rule
    out = interpolate_pos_embed(table, 16, 22, mode)
    assert out.shape == (1, 1 + 16 * 22, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], table[:, 0])  # CLS row untouched
    # row-major (h, w) patch order: equals resizing the (M, M, D) grid directly
    grid = table[0, 1:].reshape(M, M, 8)
    kw = {"scale_factor": (16.1 / M, 22.1 / M)} if mode == "offset" else {"antialias": mode == "antialias"}
    np.testing.assert_array_equal(out[0, 1:].reshape(16, 22, 8), resize(grid, (16, 22), **kw))


def test_pos_embed_skip_needs_both_sides_equal_to_table_grid():
    table = _table()
    out = interpolate_pos_embed(table, 37, 38, "size")  # same height, one more column: resampled
    assert out.shape == (1, 1 + 37 * 38, 8)
    assert not np.array_equal(out[0, 1:38], table[0, 1:38])


def test_pos_embed_modes_differ():
    table = _table()
    outs = {mode: interpolate_pos_embed(table, 16, 16, mode) for mode in MODES}
    assert not np.allclose(outs["size"], outs["offset"])
    assert not np.allclose(outs["size"], outs["antialias"])


def test_pos_embed_errors():
    with pytest.raises(ValueError, match="mode"):
        interpolate_pos_embed(_table(), 16, 16, "bilinear")
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(np.zeros((1, 1 + 37 * 36, 4), np.float32), 16, 16, "size")
    with pytest.raises(ValueError):
        interpolate_pos_embed(np.zeros((1 + 37 * 37, 4), np.float32), 16, 16, "size")


# ---------------------------------------------------------------- against torch


def _torch_resize(grid, out_hw=None, scale_factor=None, antialias=False):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1)[None]  # (1, C, h, w)
    kw = {"size": out_hw} if scale_factor is None else {"scale_factor": scale_factor}
    y = F.interpolate(x, mode="bicubic", align_corners=False, antialias=antialias, **kw)
    return y[0].permute(1, 2, 0).numpy()  # (out_h, out_w, C)


def _rel_err(out, ref):
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


SIZE_CASES = [
    ((37, 37), (16, 16)), ((37, 37), (22, 22)), ((37, 37), (5, 5)), ((37, 37), (37, 20)),
    ((37, 37), (40, 40)), ((37, 37), (74, 74)), ((7, 7), (3, 3)), ((3, 3), (11, 11)),
    ((37, 37), (16, 22)), ((37, 37), (22, 16)), ((37, 37), (5, 9)), ((37, 37), (1, 3)),
    ((6, 10), (13, 4)),
]
SCALE_CASES = [
    ((37, 37), ((h + 0.1) / 37, (w + 0.1) / 37)) for h, w in [(16, 16), (16, 22), (22, 16), (5, 9), (37, 37), (40, 74)]
] + [((7, 9), (0.6, 1.7)), ((10, 10), (2.5, 1.37)), ((37, 37), (0.3, 0.77))]


@pytest.mark.torch
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_hw, out_hw", SIZE_CASES)
def test_resize_size_mode_matches_torch(in_hw, out_hw, antialias):
    grid = np.random.default_rng(1).standard_normal((*in_hw, 32)).astype(np.float32)
    ref = _torch_resize(grid, out_hw, antialias=antialias)
    out = resize(grid, out_hw, antialias=antialias)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert _rel_err(out, ref) <= TOL


@pytest.mark.torch
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_hw, sf", SCALE_CASES)
def test_resize_scale_factor_mode_matches_torch(in_hw, sf, antialias):
    grid = np.random.default_rng(2).standard_normal((*in_hw, 32)).astype(np.float32)
    ref = _torch_resize(grid, scale_factor=sf, antialias=antialias)
    out_hw = (math.floor(in_hw[0] * sf[0]), math.floor(in_hw[1] * sf[1]))  # torch's output size
    out = resize(grid, out_hw, scale_factor=sf, antialias=antialias)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) <= TOL


@pytest.mark.torch
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    "n_in, n_out, sf",
    [(37, 16, None), (37, 22, None), (37, 5, None), (37, 40, None), (37, 74, None), (7, 3, None),
     (3, 11, None), (37, 1, None), (37, 16, 16.1 / 37), (37, 37, 37.1 / 37), (37, 74, 74.1 / 37), (10, 25, 2.5)],
)
def test_weights_match_torch(n_in, n_out, sf, antialias):
    """Push one-hot rows through torch to read its weight matrix; on AVX2/AVX512 builds it is bit-identical."""
    import torch

    # grid[r, :, c] = (r == c): channel c carries the unit impulse at row c; width 2 stays 2
    basis = np.repeat(np.eye(n_in, dtype=np.float32)[:, None, :], 2, axis=1)  # (in, 2, C=in)
    sf2 = None if sf is None else (sf, 1.0)
    ref = _torch_resize(basis, (n_out, 2), scale_factor=sf2, antialias=antialias)[:, 0, :]  # (out, in)
    mat = bicubic_matrix(n_in, n_out, scale_factor=sf, antialias=antialias)
    assert ref.shape == mat.shape
    if _on_x86():  # FMA_WEIGHTS follows torch's dispatch: the float32 weights match bit for bit
        np.testing.assert_array_equal(mat.astype(np.float32), ref)
    else:  # unverified platforms: possibly differing FMA use, last float32 bits only
        np.testing.assert_allclose(mat, ref, rtol=0, atol=1e-6)


def _on_x86():
    return platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.torch
@pytest.mark.skipif(not _on_x86(), reason="FMA detection is only verified on x86-64")
def test_fma_detection_follows_torch_dispatch():
    import torch

    assert interp.FMA_WEIGHTS == (torch.backends.cpu.get_cpu_capability() != "DEFAULT")


# ---- the real DINOv2 code paths

IMAGE_SIZES = [(224, 224), (224, 308), (308, 224), (518, 518), (70, 126), (602, 700), (518, 532)]


def _hf_embeddings(registers: bool, table: np.ndarray):
    import torch

    if registers:
        from transformers import Dinov2WithRegistersConfig as Config
        from transformers import Dinov2WithRegistersModel as Model
    else:
        from transformers import Dinov2Config as Config
        from transformers import Dinov2Model as Model
    config = Config(image_size=518, patch_size=14, hidden_size=table.shape[2], num_attention_heads=1,
                    num_hidden_layers=1, intermediate_size=32)
    model = Model(config).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(torch.from_numpy(table))
    return model.embeddings


@pytest.fixture(scope="module")
def table64():
    return _table(d=64, seed=3)


@pytest.mark.torch
@pytest.mark.parametrize("registers, mode", [(False, "size"), (True, "antialias")])
def test_pos_embed_matches_transformers(registers, mode, table64):
    import torch

    emb = _hf_embeddings(registers, table64)
    for height, width in IMAGE_SIZES:
        h, w = height // 14, width // 14
        dummy = torch.zeros(1, 1 + h * w, table64.shape[2])
        with torch.no_grad():
            ref = emb.interpolate_pos_encoding(dummy, height, width).numpy()
        out = interpolate_pos_embed(table64, h, w, mode)
        assert out.shape == ref.shape == (1, 1 + h * w, 64), (height, width)
        assert _rel_err(out, ref) <= TOL, (height, width)


def _official_interpolate_pos_encoding(pos_embed, height, width, offset, antialias, patch_size=14):
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding, transcribed."""
    import torch
    import torch.nn.functional as F

    # the official forward calls this with (x, w, h) where w, h = x.shape[-2:], i.e. w is the height
    w, h = height, width
    npatch = (w // patch_size) * (h // patch_size)
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    m = int(math.sqrt(n))
    assert n == m * m
    kwargs = {}
    if offset:
        sx = float(w0 + offset) / m
        sy = float(h0 + offset) / m
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.torch
@pytest.mark.parametrize("offset, antialias, mode", [(0.1, False, "offset"), (0.0, True, "antialias")])
def test_pos_embed_matches_official(offset, antialias, mode, table64):
    import torch

    pos = torch.from_numpy(table64)
    for height, width in IMAGE_SIZES:
        h, w = height // 14, width // 14
        ref = _official_interpolate_pos_encoding(pos, height, width, offset, antialias).numpy()
        out = interpolate_pos_embed(table64, h, w, mode)
        assert out.shape == ref.shape == (1, 1 + h * w, 64), (height, width)
        assert _rel_err(out, ref) <= TOL, (height, width)
