"""Bicubic resizing of the DINOv2 position-embedding table, matching PyTorch to float32 rounding.

DINOv2 checkpoints carry a learned position embedding for a fixed M x M patch grid (M = 37 for
518-pixel training images, patch 14).  Any other input size needs that table resampled to the
new (h, w) patch grid, and every reference implementation does it with
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` on the table viewed
as a (1, D, M, M) image.  Three call patterns occur in practice; ``interpolate_pos_embed``
reproduces each one:

``"size"``       transformers ``Dinov2Model``:
                 ``interpolate(x, size=(h, w), mode="bicubic", align_corners=False)``.
                 Source coordinate of output pixel i is ``(i + 0.5) * in/out - 0.5``.

``"offset"``     official facebookresearch/dinov2 models without registers:
                 ``interpolate(x, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")``.
                 PyTorch then takes the output size as ``floor(M * scale)`` (= h, w) but maps
                 coordinates with ``1 / scale`` (= M / (h + 0.1)) instead of M / h, so the
                 result is slightly different from "size" mode.

``"antialias"``  register variants (transformers ``Dinov2WithRegistersModel`` and official):
                 ``size=(h, w)`` with ``antialias=True``.  This goes through PyTorch's separate
                 PIL-style kernel: Keys cubic with a = -0.5 (not -0.75), the kernel support is
                 widened by the scale when downsampling, taps that fall outside the input are
                 dropped and the remaining weights renormalised to sum to one.

All three share the skip rule of the reference code: when the patch grid already equals the
table's (h == w == M) the table is returned unchanged.  (The references test this in pixels,
``num_patches == M*M and H == W``; with only the patch grid available we use h == w == M.  The
two differ only for non-square pixel sizes that floor to an M x M grid, e.g. 518 x 525, where
"size" and "antialias" interpolation are exact identities anyway and only "offset" would
differ, by the 0.1-offset resampling of a 37 x 37 grid onto itself.)

Bicubic resizing is separable, so each behaviour is a pair of small 1-D matrices
(out_h x M and out_w x M) applied along rows and columns.  The matrices are built by
replaying PyTorch's CPU weight computation step by step in float32 (its ``opmath`` type for
float32 tensors, see aten/src/ATen/native/UpSample.h and cpu/UpSampleKernel.cpp), including
the fused multiply-adds of its AVX2/AVX512 builds (``FMA_WEIGHTS``), so the weights are
bit-identical to the ones torch uses; the resize itself is then done in float64 and rounded
once to float32 (measured slightly closer to torch than a float32 matmul: worst ~2.2e-7 vs
~2.3e-7 relative).
"""

from __future__ import annotations

import functools
import math
import os
import platform

import numpy as np

__all__ = ["bicubic_matrix", "resize", "interpolate_pos_embed", "MODES"]

MODES = ("size", "offset", "antialias")

# Keys cubic-convolution parameter.  PyTorch uses a = -0.75 for plain bicubic (OpenCV
# compatible) and a = -0.5 for antialias=True (Pillow compatible); see
# HelperInterpCubic::aa_filter in aten/src/ATen/native/cpu/UpSampleKernel.cpp.
_A_PLAIN = np.float32(-0.75)
_A_AA = np.float32(-0.5)

_F32 = np.float32


def _torch_kernel_uses_fma() -> bool:
    """Guess whether torch's CPU interpolation kernels on this machine use fused multiply-adds.

    torch dispatches UpSampleKernel.cpp to an AVX2 or AVX512 build on any x86-64 CPU with AVX2
    and FMA (unless ATEN_CPU_CAPABILITY=default caps it), and the compiler fuses some of the
    weight computations there; the DEFAULT build does not.  Other architectures are unverified
    and assumed unfused.
    """
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "default":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:  # numpy's own runtime CPU-feature table (numpy >= 2; numpy.core before that)
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return True
    return bool(features.get("AVX2") and features.get("FMA3"))


# Whether to replay the fused multiply-adds of torch's AVX2 / AVX512 kernels when building the
# weights.  Matching the build torch actually runs makes the weights bit-identical to torch 2.13
# (verified on AVX512, AVX2 and DEFAULT dispatch); a mismatch changes weights by up to ~5e-7
# absolute, i.e. resized tables by up to ~2e-6 relative.  Set it before first use or in tests;
# it is part of the matrix cache key.
FMA_WEIGHTS = _torch_kernel_uses_fma()


def _mad(a, b, c, fused: bool) -> np.ndarray:
    """float32 ``a * b + c``: one rounding if ``fused`` (an FMA), else two.

    The float64 product of two float32 values is exact, so rounding ``a*b + c`` taken in
    float64 to float32 reproduces an FMA (barring vanishingly rare double-rounding ties).
    """
    a, b, c = (np.asarray(v, dtype=_F32) for v in (a, b, c))
    if fused:
        return (a.astype(np.float64) * b + c.astype(np.float64)).astype(_F32)
    return (a * b).astype(_F32) + c


def _cubic1(x: np.ndarray, a: np.float32, fuse: tuple[bool, bool]) -> np.ndarray:
    """Keys kernel for |x| <= 1, ``((a + 2) * x - (a + 3)) * x * x + 1``, float32 like torch."""
    u = _mad(a + _F32(2), x, -(a + _F32(3)), fuse[0])
    return _mad(u * np.asarray(x, dtype=_F32), x, _F32(1), fuse[1])


def _cubic2(x: np.ndarray, a: np.float32, fuse: tuple[bool, bool, bool]) -> np.ndarray:
    """Keys kernel for 1 < |x| < 2, ``((a * x - 5a) * x + 8a) * x - 4a``, float32 like torch."""
    u = _mad(a, x, -(_F32(5) * a), fuse[0])
    u = _mad(u, x, _F32(8) * a, fuse[1])
    return _mad(u, x, -(_F32(4) * a), fuse[2])


def _torch_scale(in_size: int, out_size: int, scale_factor: float | None) -> np.float32:
    """``area_pixel_compute_scale<float>`` with align_corners=False: the input step per output pixel.

    With a user scale factor torch uses ``1 / scale_factor`` (computed in double, then rounded to
    float), otherwise ``in / out`` in float.
    """
    if scale_factor is not None and scale_factor > 0:
        return _F32(1.0 / scale_factor)
    return _F32(in_size) / _F32(out_size)


def _plain_matrix(in_size: int, out_size: int, scale_factor: float | None, fma: bool) -> np.ndarray:
    """Plain bicubic (antialias=False): 4 taps, a = -0.75, out-of-range taps clamped to the border.

    Replays HelperInterpCubic::compute_indices_weights in float32.  The FMA pattern (which
    multiply-adds the AVX2/AVX512 build fuses) was identified by matching torch's weights
    bit for bit; see FMA_WEIGHTS.
    """
    scale = _torch_scale(in_size, out_size, scale_factor)
    i = np.arange(out_size)
    # area_pixel_compute_source_index(cubic=True): (i + 0.5) * scale - 0.5, negatives kept
    src = _mad(scale, i.astype(_F32) + _F32(0.5), _F32(-0.5), fma)  # (out,) float32
    # guard_index_and_lambda: integer part capped at in-1, fraction clipped to [0, 1]
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # (out,)
    t = np.minimum(np.maximum(src - idx.astype(_F32), _F32(0)), _F32(1))  # (out,) float32
    # get_cubic_upsample_coefficients: taps at idx-1, idx, idx+1, idx+2 sit at distances
    # t+1, t, 1-t, 2-t from the sample
    t_far = t + _F32(1)
    s_near = _F32(1) - t
    s_far = s_near + _F32(1)
    f1, f2 = (fma, False), (fma, fma, False)
    coeffs = (
        _cubic2(t_far, _A_PLAIN, f2),
        _cubic1(t, _A_PLAIN, f1),
        _cubic1(s_near, _A_PLAIN, f1),
        _cubic2(s_far, _A_PLAIN, f2),
    )
    mat = np.zeros((out_size, in_size), dtype=np.float64)  # (out, in)
    for j, c in enumerate(coeffs):  # 4 taps; clamped taps pile onto the border pixel
        cols = np.clip(idx - 1 + j, 0, in_size - 1)  # (out,)
        np.add.at(mat, (i, cols), c.astype(np.float64))
    return mat


def _aa_filter(x: np.ndarray, fma: bool) -> np.ndarray:
    """Keys cubic with a = -0.5 on |x|, float32 (HelperInterpCubic::aa_filter, antialias path)."""
    x = np.abs(np.asarray(x, dtype=_F32))
    near = _cubic1(x, _A_AA, (fma, fma))
    far = _cubic2(x, _A_AA, (fma, fma, fma))
    return np.where(x < _F32(1), near, np.where(x < _F32(2), far, _F32(0))).astype(_F32)


def _aa_matrix(in_size: int, out_size: int, scale_factor: float | None, fma: bool) -> np.ndarray:
    """Antialiased bicubic: PIL-style variable-width taps (``_compute_indices_min_size_weights_aa``)."""
    if in_size == out_size:
        # separable_upsample_generic_Nd_kernel_impl skips unchanged dimensions entirely
        return np.eye(in_size, dtype=np.float64)
    scale = _torch_scale(in_size, out_size, scale_factor)
    # when downsampling the kernel is stretched by the scale (support 2 -> 2*scale input pixels)
    support = _F32(2.0 * float(scale)) if scale >= 1.0 else _F32(2.0)
    invscale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)
    max_taps = int(math.ceil(float(support))) * 2 + 1
    i = np.arange(out_size)
    center = (float(scale) * (i + 0.5)).astype(_F32)  # (out,) float32, product taken in double
    # static_cast<int64_t> truncates toward zero; negative starts are then lifted to 0
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)  # (out,)
    xmax = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, max_taps)  # (out,) taps actually inside the input
    weights = np.zeros((out_size, max_taps), dtype=_F32)  # (out, taps)
    total = np.zeros(out_size, dtype=_F32)  # (out,) float32 running sum, in tap order
    for j in range(max_taps):
        # distance of tap j's pixel centre from the sample centre, in output-pixel units
        d = (j + xmin).astype(_F32) - center  # (out,) float32
        x = ((d.astype(np.float64) + 0.5) * float(invscale)).astype(_F32)
        w = np.where(j < xsize, _aa_filter(x, fma), _F32(0)).astype(_F32)
        weights[:, j] = w
        total = (total + w).astype(_F32)
    # renormalise the surviving taps (truncated at the borders) to sum to one, in float32
    safe = np.where(total != 0, total, _F32(1)).astype(_F32)
    weights = (weights / safe[:, None]).astype(_F32)  # (out, taps)
    mat = np.zeros((out_size, in_size), dtype=np.float64)  # (out, in)
    for j in range(max_taps):
        valid = j < xsize
        mat[i[valid], (xmin + j)[valid]] = weights[valid, j]
    return mat


@functools.lru_cache(maxsize=256)
def _bicubic_matrix_cached(
    in_size: int, out_size: int, scale_factor: float | None, antialias: bool, fma: bool
) -> np.ndarray:
    build = _aa_matrix if antialias else _plain_matrix
    mat = build(in_size, out_size, scale_factor, fma)
    mat.setflags(write=False)  # shared through the cache
    return mat


def bicubic_matrix(
    in_size: int, out_size: int, *, scale_factor: float | None = None, antialias: bool = False
) -> np.ndarray:
    """The (out_size, in_size) float64 matrix PyTorch's bicubic interpolation applies along one axis.

    ``align_corners=False`` throughout.  ``scale_factor`` is the value that was passed to
    ``torch.nn.functional.interpolate`` (None = it was called with ``size``); it only changes the
    coordinate mapping, ``out_size`` must still be given (torch uses ``floor(in * scale)``).
    ``antialias`` selects torch's antialiased kernel.  Each row sums to one (up to float32 weight
    rounding).  The result is cached and read-only.
    """
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
    sf = None if scale_factor is None else float(scale_factor)
    return _bicubic_matrix_cached(in_size, out_size, sf, bool(antialias), bool(FMA_WEIGHTS))


def resize(
    grid: np.ndarray,
    out_hw: tuple[int, int],
    *,
    scale_factor: tuple[float, float] | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Bicubic-resize a channels-last (h, w, C) array to (out_h, out_w, C) exactly as torch does.

    Equivalent to ``F.interpolate(x.permute(2, 0, 1)[None], size=out_hw (or scale_factor=...),
    mode="bicubic", align_corners=False, antialias=antialias)``.  Computed in float64 and
    returned in the input's float dtype (float32 stays float32).
    """
    grid = np.asarray(grid)
    if grid.ndim != 3:
        raise ValueError(f"expected an (h, w, C) array, got shape {grid.shape}")
    h, w, c = grid.shape
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    sf_h, sf_w = (None, None) if scale_factor is None else (float(scale_factor[0]), float(scale_factor[1]))
    mat_h = bicubic_matrix(h, out_h, scale_factor=sf_h, antialias=antialias)  # (out_h, h)
    mat_w = bicubic_matrix(w, out_w, scale_factor=sf_w, antialias=antialias)  # (out_w, w)
    out_dtype = grid.dtype if np.issubdtype(grid.dtype, np.floating) else np.float64
    x = grid.astype(np.float64, copy=False)  # (h, w, C)
    rows = (mat_h @ x.reshape(h, w * c)).reshape(out_h, w, c)  # (out_h, w, C)
    out = np.matmul(mat_w, rows)  # (out_w, w) @ (out_h, w, C) -> (out_h, out_w, C)
    return out.astype(out_dtype, copy=False)


def interpolate_pos_embed(table: np.ndarray, h: int, w: int, mode: str) -> np.ndarray:
    """Adapt a DINOv2 position-embedding table to an (h, w) patch grid.

    ``table`` is (1, 1 + M*M, D) with the CLS position first; returns (1, 1 + h*w, D) float32
    with patches in row-major (h, w) order.  ``mode`` is "size" (transformers Dinov2Model),
    "offset" (official dinov2 without registers) or "antialias" (register variants); see the
    module docstring.  The table is returned unchanged when h == w == M.
    """
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; expected one of {MODES}")
    table = np.asarray(table)
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"expected a (1, 1 + M*M, D) table, got shape {table.shape}")
    n = table.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"table has {n} patch positions, not a square grid")
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"patch grid must be positive, got {h}x{w}")
    if h == m and w == m:
        return table.astype(np.float32, copy=False)  # skip rule: (1, 1 + M*M, D)
    d = table.shape[2]
    cls = table[:, :1].astype(np.float32)  # (1, 1, D)
    grid = table[0, 1:].astype(np.float32).reshape(m, m, d)  # (M, M, D) rows, cols, channels
    if mode == "offset":
        # official: scale_factor=((h + 0.1) / M, (w + 0.1) / M); torch sizes the output as
        # floor(M * scale), which the official code asserts equals (h, w)
        sf = ((h + 0.1) / m, (w + 0.1) / m)
        assert (int(m * sf[0]), int(m * sf[1])) == (h, w)
        patches = resize(grid, (h, w), scale_factor=sf)  # (h, w, D)
    else:
        patches = resize(grid, (h, w), antialias=(mode == "antialias"))  # (h, w, D)
    patches = patches.astype(np.float32).reshape(1, h * w, d)  # (1, h*w, D)
    return np.concatenate([cls, patches], axis=1)  # (1, 1 + h*w, D)
