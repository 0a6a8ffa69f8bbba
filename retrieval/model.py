"""The DINOv2 forward pass in NumPy: pure functions over arrays, parameters keyed by hub names.

Shapes: B batch, H x W pixels, h x w patch grid (H/14, W/14), N = h*w patches, R registers,
T = 1 + R + N tokens, D width, Hd heads, d = D/Hd head width, F FFN hidden width, M = B*T rows.

``prepare`` turns a checkpoint's parameters into the arrays the forward pass multiplies with,
once at load: transposed, QKV fused (head by head), and every per-channel affine step folded
exactly into the adjacent weights (LayerNorm scale and shift into QKV and fc1, the attention scale
into Q, LayerScale into proj and fc2), each bias of QKV, proj and fc1 as one extra weight row that
meets a column of ones kept beside the activations, so it costs no pass of its own (fc2's is added
with the residual, keeping the hidden units contiguous for GELU). ``forward`` returns all
tokens after the final LayerNorm; ``embed`` pools them into image features (for the CLS feature
the last layer skips the work for the other tokens, which nothing reads).

Threads: the work of each layer is split over a few Python threads, tensor-parallel style
(NumPy releases the GIL in its loops and BLAS calls): thread k owns a group of heads (its QKV
columns, its attention, its share of proj) and a slice of the FFN hidden units (its fc1 columns
and GELU, its share of fc2), then all threads add the partial products and normalise by rows.
BLAS runs single-threaded meanwhile (through threadpoolctl when installed), so each core runs
one thread and nothing spins. See docs/performance.md.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .interpolate import interpolate_pos_embed
from .variants import ModelConfig

INTERPOLATIONS = ("hf", "official")
POOLINGS = ("cls", "mean", "concat")
POS_MODES = ("size", "offset", "antialias")


def pos_mode_for(cfg: ModelConfig, interpolation: str) -> str:
    """Which position-table behaviour an interpolation choice means for this variant.

    hf: transformers' ``Dinov2Model`` (resize by output size) or, with registers,
    ``Dinov2WithRegistersModel`` (output size, antialiased). official: facebookresearch/dinov2
    (scale factor (h + 0.1)/37 without registers; output size, antialiased, with registers).
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    if cfg.registers:
        return "antialias"
    return "size" if interpolation == "hf" else "offset"


@dataclass
class Model:
    """A loaded model: its config, the prepared arrays, and interpolated position tables by grid."""

    cfg: ModelConfig
    arrays: dict
    dtype: type = np.float32
    pos_cache: dict = field(default_factory=dict)


def _fold(wt, scale, bias, dt):
    """wt (K, N) weights (any layout, e.g. a transposed view), scale (K, 1) or (1, N) float64 factors,
    bias (N,) float64 or None -> (K + 1, N) in ``dt``: [wt * scale ; bias], the bias row meeting the ones
    column (without a bias: (K, N)). Each weight is one product of two numbers rounded once (NumPy
    computes it in float64 by chunks, with no float64 copy of the whole matrix).
    """
    K, N = wt.shape
    out = np.empty((K + (bias is not None), N), dt)  # (K + 1, N) or (K, N)
    np.multiply(wt, scale, out=out[:K])
    if bias is not None:
        out[K] = bias
    return out


def prepare(params: dict, cfg: ModelConfig, dtype=np.float32) -> Model:
    """Arrange checkpoint parameters for the forward pass (done once at load).

    The folding is exact algebra, each weight a product rounded once to ``dtype``, the biases
    summed in float64: LayerNorm(x) @ W + c = n @ (w[:, None] * W) + (b @ W + c), with n the
    normalised x; (o @ P + p) * ls = o @ (P * ls) + p * ls; and the attention scale d**-0.5 goes into Q.
    """
    dt = np.dtype(dtype)
    D, Hd = cfg.dim, cfg.heads
    d = D // Hd

    def raw(name):
        return np.asarray(params[name])

    def f64(name):
        return np.asarray(params[name], dtype=np.float64)

    def out(a):
        return np.ascontiguousarray(a, dtype=dt)

    a = {
        "cls": out(raw("embeddings.cls_token").reshape(1, 1, D)),  # (1, 1, D)
        "pos": out(raw("embeddings.position_embeddings")),  # (1, 1 + 37*37, D)
        "patch_w": out(raw("embeddings.patch_embeddings.projection.weight").reshape(D, -1).T),  # (3*p*p, D)
        "patch_b": out(raw("embeddings.patch_embeddings.projection.bias")),  # (D,)
        "norm_w": out(raw("layernorm.weight")),  # (D,)
        "norm_b": out(raw("layernorm.bias")),  # (D,)
        "layers": [],
    }
    if cfg.registers:
        a["registers"] = out(raw("embeddings.register_tokens"))  # (1, R, D)
    for i in range(cfg.depth):
        pre = f"encoder.layer.{i}."
        att = pre + "attention.attention."
        n1w, n1b = f64(pre + "norm1.weight"), f64(pre + "norm1.bias")  # (D,) each
        n2w, n2b = f64(pre + "norm2.weight"), f64(pre + "norm2.bias")  # (D,) each
        ls1, ls2 = f64(pre + "layer_scale1.lambda1"), f64(pre + "layer_scale2.lambda1")  # (D,) each

        # fused QKV, head-major columns [q0 k0 v0 | q1 k1 v1 | ...] (d columns each), norm1 and the
        # attention scale folded: column (h, j, e) = norm1.w * W_j[h*d + e, :] * scale_j
        qkv = np.empty((D + 1, Hd, 3, d), dt)  # (D + 1, Hd, 3, d)
        for j, (name, s) in enumerate((("query", d ** -0.5), ("key", 1.0), ("value", 1.0))):
            wj = raw(att + name + ".weight")  # (D out, D in)
            np.multiply(wj.reshape(Hd, d, D).transpose(2, 0, 1), (n1w * s)[:, None, None], out=qkv[:D, :, j])
            qkv[D, :, j] = ((wj.astype(np.float64) @ n1b + f64(att + name + ".bias")) * s).reshape(Hd, d)
        mlp = ("mlp.weights_in", "mlp.weights_out") if cfg.ffn == "swiglu" else ("mlp.fc1", "mlp.fc2")
        w1, w2 = raw(pre + mlp[0] + ".weight"), raw(pre + mlp[1] + ".weight")  # (F or 2F, D), (D, F)
        proj = raw(pre + "attention.output.dense.weight")  # (D, D)
        a["layers"].append({
            "qkv_w": qkv.reshape(D + 1, 3 * D),  # (D + 1, 3D)
            "proj_w": _fold(proj.T, ls1[None, :], f64(pre + "attention.output.dense.bias") * ls1, dt),  # (D + 1, D)
            "fc1_w": _fold(w1.T, n2w[:, None], w1.astype(np.float64) @ n2b + f64(pre + mlp[0] + ".bias"), dt),  # (D + 1, F)
            "fc2_w": _fold(w2.T, ls2[None, :], None, dt),  # (F, D), LayerScale folded
            "fc2_b": out(f64(pre + mlp[1] + ".bias") * ls2),  # (D,), added with the residual
        })
    return Model(cfg=cfg, arrays=a, dtype=dt.type)


# ---------------------------------------------------------------- threads


def _thread_count() -> int:
    """Usable cores, lowered by OMP_NUM_THREADS / OPENBLAS_NUM_THREADS when those ask for fewer."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        try:
            n = min(n, int(os.environ.get(var, "").split(",")[0]))
        except ValueError:
            pass
    return max(1, n)


THREADS = _thread_count()
_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
_BLAS = {"controller": None, "depth": 0, "limiter": None}


@contextmanager
def _single_threaded_blas():
    """BLAS on one thread while our threads split the work (restored after; nested and concurrent calls
    share it). Yields whether it could: without threadpoolctl, BLAS keeps its threads and the caller
    should not add its own (two threads each running a multi-threaded BLAS call oversubscribe the cores).
    """
    with _LOCK:
        if _BLAS["controller"] is None:
            try:
                from threadpoolctl import ThreadpoolController
                _BLAS["controller"] = ThreadpoolController()
            except Exception:  # not installed (or failing): BLAS keeps its threads
                _BLAS["controller"] = False
        if _BLAS["controller"] and _BLAS["depth"] == 0:
            _BLAS["limiter"] = _BLAS["controller"].limit(limits=1, user_api="blas")
        _BLAS["depth"] += 1
    try:
        yield bool(_BLAS["controller"])
    finally:
        with _LOCK:
            _BLAS["depth"] -= 1
            if _BLAS["depth"] == 0 and _BLAS["limiter"] is not None:
                _BLAS["limiter"].restore_original_limits()
                _BLAS["limiter"] = None


def _spread(fn, n: int):
    """fn(k, sync) for k in range(n): k = 0 in this thread, the rest in the pool. ``sync()`` is a
    barrier across the n calls; an exception in one call breaks it for the others and is re-raised.
    """
    global _POOL
    if n == 1:
        fn(0, lambda: None)
        return
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=THREADS - 1, thread_name_prefix="dinov2")
    barrier = threading.Barrier(n)

    def run(k):
        try:
            fn(k, barrier.wait)
        except BaseException:
            barrier.abort()
            raise

    futures = []
    errors = []
    try:
        for k in range(1, n):
            futures.append(_POOL.submit(run, k))
        run(0)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, the root cause first
        # e.g. Ctrl-C while submitting (before run(0) could abort the barrier): the submitted calls must not
        # wait at the barrier forever (the interpreter would hang at exit joining the pool's threads)
        barrier.abort()
        errors.append(exc)
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


def _split(n_items: int, n: int, k: int, unit: int = 1):
    """Part k of n of range(n_items) in whole units: (start, stop)."""
    units = n_items // unit
    return unit * (units * k // n), (n_items if k == n - 1 else unit * (units * (k + 1) // n))


CHUNK = 1 << 19  # values per piece of element-wise work: fewer, larger NumPy calls contend less for the GIL
SCORE_BLOCK = 1 << 20  # attention scores (values) computed at a time per thread: heads of one image


def _chunk_rows(width: int) -> int:
    return max(1, CHUNK // max(1, width))


def _chunks(start: int, stop: int, width: int):
    """Row ranges of about CHUNK values each within [start, stop)."""
    step = _chunk_rows(width)
    for i in range(start, stop, step):
        yield i, min(i + step, stop)


def _view(m, shape):
    """A reshaped view of m that shares its memory (raises rather than copy: results are written through it)."""
    v = m.view()
    v.shape = shape
    return v


# ---------------------------------------------------------------- layers


def layer_norm(x, w, b, eps):
    """x (..., D) -> (..., D), normalised over the last axis, then scaled and shifted."""
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., D)
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # (..., 1)
    xc *= 1.0 / np.sqrt(var + eps)  # (..., D)
    xc *= w
    xc += b
    return xc


def _row_dots(a, b):
    """Row-wise dot products of (m, D) arrays (b may broadcast) -> (m,), accumulated in blocks like a BLAS dot."""
    return np.vecdot(a, b) if hasattr(np, "vecdot") else np.einsum("ij,ij->i", a, np.broadcast_to(b, a.shape))


def normalize_into(x, out, eps):
    """x (m, D) -> out (m, D): normalised rows, no scale or shift (those are folded into the next weights)."""
    D = x.shape[-1]
    mu = _row_dots(x, np.ones(D, x.dtype))  # (m,) sums
    mu /= D
    np.subtract(x, mu[:, None], out=out)  # (m, D)
    var = _row_dots(out, out)  # (m,) sums of squares
    var /= D
    var += eps
    np.sqrt(var, out=var)
    np.divide(1, var, out=var)
    out *= var[:, None]  # (m, D)
    return out


# GELU for float32: gelu(x) = max(x, 0) - t Phi(-t) with t = |x|, Phi the standard normal CDF, and
# t Phi(-t) = exp(-t**2 / 2) * t P2(t) / Q3(t) (Q3 monic; a rational approximation of the Mills ratio,
# weighted least squares towards minimax in float64 on 0 <= t <= 8: 4.0e-8 absolute error in
# t Phi(-t)). t is clamped at 8, where t Phi(-t) < 1e-14. Over float32 inputs the result is within
# 2.5e-7 absolute (half an ulp of 4) and 1.2e-7 relative to max(|gelu(x)|, 1) of the exact value: the
# same as float32 x * (1 + erf(x / sqrt(2))) / 2 through SciPy's erf (the reference's own vectorised
# float32 erf is less accurate). 19 cheap passes over the data instead of SciPy's scalar erf
# (tests/test_model_gelu.py checks it); other dtypes use SciPy's erf.
_GELU_P = (4.584049425930373, 2.0800228879040197, 0.4037536742221101)  # P2 coefficients, t**0 first
_GELU_Q = (9.168057740341226, 11.475774209336976, 5.376099052404765)  # monic Q3: t**3 + these, t**0 first
_GELU_T = 8.0


def gelu(x, t=None, p=None, q=None):
    """Exact GELU in place, x * (1 + erf(x / sqrt(2))) / 2; t, p, q: optional scratch shaped like x."""
    if x.dtype != np.float32:
        from scipy.special import erf  # imported here: float32 (every query) does not need SciPy (~0.3 s)

        y = erf(x * np.asarray(1 / np.sqrt(2), x.dtype))  # (..., F)
        y += 1
        y *= 0.5
        x *= y
        return x
    t, p, q = (np.empty_like(x) if a is None else a for a in (t, p, q))
    (p0, p1, p2), (q0, q1, q2) = ([np.float32(v) for v in c] for c in (_GELU_P, _GELU_Q))
    # min and max against a row of constants, not a scalar: NumPy 2.4's loops for a scalar operand are 3x slower
    limit, zero = np.full(x.shape[-1], _GELU_T, np.float32), np.zeros(x.shape[-1], np.float32)  # (F,) each
    np.abs(x, out=t)  # (..., F) t = |x|
    np.minimum(t, limit, out=t)
    np.multiply(t, np.float32(-0.5), out=q)
    q *= t
    np.exp(q, out=q)  # exp(-t**2 / 2)
    np.multiply(t, p2, out=p)  # Horner: p = t P2(t)
    p += p1
    p *= t
    p += p0
    p *= t
    p *= q  # exp(-t**2 / 2) t P2(t)
    np.add(t, q2, out=q)  # q = Q3(t)
    q *= t
    q += q1
    q *= t
    q += q0
    p /= q  # t Phi(-t)
    np.maximum(x, zero, out=x)
    x -= p  # max(x, 0) - |x| Phi(-|x|) = x Phi(x)
    return x


def silu(x):
    """x * sigmoid(x)."""
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def softmax(s):
    """In place over the last axis."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def attention_heads(qkv, o, images, T, heads, d, s_buf):
    """Heads h0:h1 of images b0:b1: qkv (M, 3D) head-major [q k v] per head, q pre-scaled
    -> o[rows, h0*d:h1*d] = softmax(q k^T) v. s_buf: scratch (g, T, T) for g heads at a time.

    Softmax is shift-invariant, so exp is taken of the scores as they are, and the usual shift by the
    row maximum is only done, recomputing the block, when a row sum shows that exp overflowed or came
    close to underflowing (a sum below 2**-100, where the smallest terms would lose precision): the
    same rounding either way, two passes over the scores fewer.
    """
    g = s_buf.shape[0]
    lo, hi = 2.0 ** -100, np.finfo(s_buf.dtype).max
    ones = np.ones((T, 1), s_buf.dtype)  # (T, 1)
    for b in range(*images):
        rows = slice(b * T, (b + 1) * T)
        for j0 in range(heads[0], heads[1], g):
            j1 = min(j0 + g, heads[1])
            t = _view(qkv[rows, 3 * d * j0:3 * d * j1], (T, j1 - j0, 3 * d)).transpose(1, 0, 2)  # (g, T, 3d)
            q, kt, v = t[..., :d], t[..., d:2 * d].transpose(0, 2, 1), t[..., 2 * d:]  # (g, T, d), (g, d, T), (g, T, d)
            ob = _view(o[rows, d * j0:d * j1], (T, j1 - j0, d)).transpose(1, 0, 2)  # (g, T, d), written in place
            s = np.matmul(q, kt, out=s_buf[:j1 - j0])  # (g, T, T) scores
            with np.errstate(over="ignore", invalid="ignore"):
                np.exp(s, out=s)
                total = np.matmul(s, ones)  # (g, T, 1) row sums, a BLAS product (3x faster than s.sum)
            if not np.all((total >= lo) & (total <= hi)):  # overflow (inf, nan) or near-underflow: shift
                np.matmul(q, kt, out=s)
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                total = np.matmul(s, ones)
            np.matmul(s, v, out=ob)  # (g, T, d) unnormalised
            ob /= total  # softmax's division, on the smaller array


@dataclass
class _Work:
    """Activation buffers of one forward pass, shared by the threads and reused by every layer.
    Ones columns carry the biases of QKV, proj and fc1 (the FFN's hidden units are per thread: ``_layers``)."""

    x: np.ndarray  # (M, D) residual stream
    a: np.ndarray  # (M, D + 1) normalised tokens | 1
    qkv: np.ndarray  # (M, 3D)
    o: np.ndarray  # (M, D + 1) attention output | 1
    parts: np.ndarray  # (P, M, D) partial proj / fc2 products: one per thread, or one shared by row
    B: int
    T: int

    @classmethod
    def make(cls, x, cfg: ModelConfig, B: int, T: int, parts: int):
        M, D, dt = B * T, cfg.dim, x.dtype

        def ones(*shape):
            buf = np.empty(shape, dt)
            buf[..., -1] = 1
            return buf

        return cls(x=x, a=ones(M, D + 1), qkv=np.empty((M, 3 * D), dt), o=ones(M, D + 1), parts=np.empty((parts, M, D), dt),
                   B=B, T=T)


@dataclass
class _Share:
    """What one thread computes in a layer: the images, heads and hidden units of its products (the
    products' rows are the images' rows), the partial-product slot it writes, and the rows it then
    finishes (residual + LayerNorm). Two ways to split, chosen per forward pass:

    - by image (data parallel; when the batch divides evenly): all heads and hidden units of its own
      images, whole products, no waiting for the other threads inside a layer;
    - by head and hidden unit (tensor parallel; batch 1, odd batches): all images, its heads and hidden
      units; the partial products of proj and fc2 (split along their inner dimension) are added after a
      barrier, by thread 0 alone for all rows: these steps are many short NumPy calls, and two threads
      making them at once keep taking the GIL from each other (measured at b1: 2.6% faster this way).
    """

    images: tuple
    heads: tuple
    hidden: tuple
    part: int
    rows: tuple
    ones: bool  # takes the ones column of o (the bias row of proj)


def _share(k: int, n: int, B: int, T: int, cfg: ModelConfig) -> _Share:
    if B % n == 0:
        images = _split(B, n, k)
        return _Share(images, (0, cfg.heads), (0, cfg.hidden), 0, (images[0] * T, images[1] * T), True)
    return _Share((0, B), _split(cfg.heads, n, k), _split(cfg.hidden, n, k, unit=16), k, (0, B * T) if k == 0 else (0, 0),
                  k == n - 1)


def _residual_norm(w: _Work, sh: _Share, eps, bias=None, final=None):
    """Rows of the share: x += the partial products (+ bias); a = normalised x (or, with ``final``,
    x = final LayerNorm(x) with its (w, b))."""
    D = w.x.shape[1]
    for i, j in _chunks(*sh.rows, D):
        x = w.x[i:j]  # (m, D)
        for part in w.parts:
            x += part[i:j]
        if bias is not None:
            x += bias
        if final is None:
            normalize_into(x, w.a[i:j, :D], eps)  # (m, D)
        else:
            x[...] = layer_norm(x, *final, eps)


def _qkv_part(w: _Work, layer, cfg, sh: _Share):
    """QKV columns of the share's heads for its images' rows."""
    d = cfg.dim // cfg.heads
    rows, c = slice(sh.images[0] * w.T, sh.images[1] * w.T), slice(3 * d * sh.heads[0], 3 * d * sh.heads[1])
    np.matmul(w.a[rows], layer["qkv_w"][:, c], out=w.qkv[rows, c])  # (m, 3d*heads)


def _attention_part(w: _Work, layer, cfg, sh: _Share, s_buf):
    """The share's QKV, attention, and proj product (partial when split by heads) into w.parts[sh.part]."""
    d = cfg.dim // cfg.heads
    _qkv_part(w, layer, cfg, sh)
    attention_heads(w.qkv, w.o, sh.images, w.T, sh.heads, d, s_buf)  # o[rows, d*h0:d*h1]
    rows = slice(sh.images[0] * w.T, sh.images[1] * w.T)
    c = slice(d * sh.heads[0], cfg.dim + 1 if sh.ones else d * sh.heads[1])
    np.matmul(w.o[rows, c], layer["proj_w"][c], out=w.parts[sh.part, rows])  # (m, D), LayerScale folded


def _ffn_part(w: _Work, layer, cfg, sh: _Share, h, u, scratch):
    """The share's fc1 columns, GELU (or SwiGLU), and fc2 product (partial when split by hidden unit)
    into w.parts[sh.part]; fc2's bias is added with the residual. h (m, f) and u (m, 2f), the hidden
    units, are this thread's own contiguous buffers, so the element-wise passes run on whole rows."""
    F = cfg.hidden
    f0, f1 = sh.hidden
    r0, r1 = sh.images[0] * w.T, sh.images[1] * w.T
    a = w.a[r0:r1]  # (m, D + 1)
    if cfg.ffn == "swiglu":
        f = f1 - f0
        np.matmul(a, layer["fc1_w"][:, f0:f1], out=u[:, :f])  # (m, f) gate inputs
        np.matmul(a, layer["fc1_w"][:, F + f0:F + f1], out=u[:, f:])  # (m, f) value inputs
        for i, j in _chunks(0, r1 - r0, f):
            np.multiply(silu(u[i:j, :f]), u[i:j, f:], out=h[i:j])  # (m, f)
    else:
        np.matmul(a, layer["fc1_w"][:, f0:f1], out=h)  # (m, f)
        for i, j in _chunks(0, r1 - r0, f1 - f0):
            gelu(h[i:j], *(a[:j - i] for a in scratch))  # (m, f)
    np.matmul(h, layer["fc2_w"][f0:f1], out=w.parts[sh.part, r0:r1])  # (m, D), LayerScale folded


def _layers(w: _Work, model: Model, sh: _Share, sync, cls_only: bool):
    """One thread's share of every layer. On entry w.a holds norm1 of the embedded tokens for all rows.
    With ``cls_only`` the last layer stops after its QKV (the CLS rows are finished by ``block_cls``)."""
    cfg, layers = model.cfg, model.arrays["layers"]
    g = max(1, min(cfg.heads, SCORE_BLOCK // (w.T * w.T)))  # heads per block of attention scores
    s_buf = np.empty((g, w.T, w.T), w.x.dtype)  # per-thread scratch
    f, m = sh.hidden[1] - sh.hidden[0], (sh.images[1] - sh.images[0]) * w.T
    h = np.empty((m, f), w.x.dtype)  # (m, f) hidden units
    u = np.empty((m, 2 * f), w.x.dtype) if cfg.ffn == "swiglu" else None  # (m, 2f) swiglu inputs
    rows = min(m, _chunk_rows(f))
    scratch = [np.empty((rows, f), w.x.dtype) for _ in range(3)]
    final = (model.arrays["norm_w"], model.arrays["norm_b"])
    if len(w.parts) == 1:  # split by image: nothing to wait for inside a layer
        sync = _no_sync
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        if cls_only and last:
            _qkv_part(w, layer, cfg, sh)
            return
        _attention_part(w, layer, cfg, sh, s_buf)
        sync()
        _residual_norm(w, sh, cfg.eps)  # x += attn; a = norm2(x)
        sync()
        _ffn_part(w, layer, cfg, sh, h, u, scratch)
        sync()
        _residual_norm(w, sh, cfg.eps, layer["fc2_b"], final if last else None)  # x += ffn; a = norm1(x) of the next layer
        sync()


def _no_sync():
    pass


def block_cls(w: _Work, layer, cfg):
    """The rest of the last layer for the CLS rows only, after its QKV (w.qkv, all rows) -> CLS tokens (B, D).

    Keys and values need every token; the query, proj and the FFN only the CLS token.
    """
    B, T, D, Hd = w.B, w.T, cfg.dim, cfg.heads
    d = D // Hd
    t = w.qkv.reshape(B, T, Hd, 3, d)  # (B, T, Hd, 3, d)
    q = t[:, 0, :, 0, None, :]  # (B, Hd, 1, d), pre-scaled
    k = t[:, :, :, 1].transpose(0, 2, 3, 1)  # (B, Hd, d, T)
    v = t[:, :, :, 2].transpose(0, 2, 1, 3)  # (B, Hd, T, d)
    s = softmax(np.matmul(q, k))  # (B, Hd, 1, T)
    o = np.ones((B, D + 1), w.x.dtype)  # (B, D + 1) [o | 1]
    o[:, :D] = np.matmul(s, v).reshape(B, D)  # (B, D)
    c = w.x.reshape(B, T, D)[:, 0] + o @ layer["proj_w"]  # (B, D)
    n = np.ones((B, D + 1), w.x.dtype)  # (B, D + 1) [norm2(c) | 1]
    normalize_into(c, n[:, :D], cfg.eps)
    h = n @ layer["fc1_w"]  # (B, F) or (B, 2F)
    if cfg.ffn == "swiglu":
        h = silu(h[:, :cfg.hidden]) * h[:, cfg.hidden:]  # (B, F)
    else:
        gelu(h)  # (B, F)
    c += h @ layer["fc2_w"]  # (B, D)
    c += layer["fc2_b"]
    return c


def position_table(model: Model, h: int, w: int, pos_mode: str):
    """The position table for an h x w patch grid, interpolated once and cached: (1, 1 + h*w, D)."""
    key = (h, w, pos_mode)
    table = model.pos_cache.get(key)
    if table is None:
        table = interpolate_pos_embed(model.arrays["pos"], h, w, pos_mode).astype(model.dtype, copy=False)
        model.pos_cache[key] = table
    return table


def _token_tables(model: Model, h: int, w: int, pos_mode: str):
    """(CLS token + its position (1, D), patch bias + patch positions (N, D)), cached with the table."""
    key = ("tokens", h, w, pos_mode)
    tables = model.pos_cache.get(key)
    if tables is None:
        pos = position_table(model, h, w, pos_mode)  # (1, 1 + N, D)
        a = model.arrays
        tables = (a["cls"][0] + pos[0, :1], pos[0, 1:] + a["patch_b"])  # (1, D), (N, D)
        model.pos_cache[key] = tables
    return tables


def _patches(model: Model, pixels):
    """pixels (B, 3, H, W) -> (B, N, 3*p*p) patches, each flattened (channel, row, column) like the conv weight."""
    p = model.cfg.patch
    B, C, H, W = pixels.shape
    if C != 3 or H % p or W % p or H == 0 or W == 0:
        raise ConfigError(f"pixels of shape {pixels.shape}: expected (B, 3, H, W) with H and W multiples of {p}")
    h, w = H // p, W // p
    px = np.asarray(pixels, dtype=model.dtype)
    return px.reshape(B, C, h, p, w, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p), h, w


def _embed_part(model: Model, patches, x, tables, k: int, n: int):
    """Thread k's columns of the tokens before the first layer: x (B, T, D) = [CLS, registers, patches]."""
    cfg, a = model.cfg, model.arrays
    R = cfg.registers
    c0, c1 = _split(cfg.dim, n, k, unit=16)
    np.matmul(patches, a["patch_w"][:, c0:c1], out=x[:, 1 + R:, c0:c1])  # (B, N, c)
    x[:, 1 + R:, c0:c1] += tables[1][:, c0:c1]  # patch bias + positions
    x[:, 0, c0:c1] = tables[0][:, c0:c1]  # CLS + its position
    if R:
        x[:, 1:1 + R, c0:c1] = a["registers"][:, :, c0:c1]  # (B, R, c)


def _encode(model: Model, pixels, pos_mode: str, cls_only: bool):
    """pixels (B, 3, H, W) -> all tokens after the final LayerNorm (B, T, D), or the CLS tokens before it (B, D)."""
    if pos_mode not in POS_MODES:
        raise ConfigError(f"position interpolation {pos_mode!r}: expected one of {', '.join(POS_MODES)}")
    cfg = model.cfg
    patches, h, w = _patches(model, pixels)  # (B, N, 3*p*p)
    tables = _token_tables(model, h, w, pos_mode)
    B, T = patches.shape[0], 1 + cfg.registers + h * w
    x = np.empty((B, T, cfg.dim), model.dtype)  # (B, T, D)
    with _single_threaded_blas() as limited:  # also for block_cls: a multi-threaded BLAS call leaves its threads spinning
        n = max(1, min(THREADS if limited else 1, cfg.heads, cfg.dim // 16))
        shares = [_share(k, n, B, T, cfg) for k in range(n)]
        work = _Work.make(x.reshape(B * T, cfg.dim), cfg, B, T, parts=1 if B % n == 0 else n)

        def part(k, sync):
            _embed_part(model, patches, x, tables, k, n)
            sync()
            for i, j in _chunks(*_split(B * T, n, k), cfg.dim):
                normalize_into(work.x[i:j], work.a[i:j, :cfg.dim], cfg.eps)  # (m, D) norm1 of the first layer
            sync()
            _layers(work, model, shares[k], sync, cls_only)

        _spread(part, n)
        if cls_only and model.arrays["layers"]:
            return block_cls(work, model.arrays["layers"][-1], cfg)  # (B, D)
    return x[:, 0] if cls_only else x


def forward(model: Model, pixels, pos_mode: str):
    """pixels (B, 3, H, W) -> all tokens after the final LayerNorm (B, T, D)."""
    x = _encode(model, pixels, pos_mode, cls_only=False)  # (B, T, D)
    if not model.arrays["layers"]:
        x = layer_norm(x, model.arrays["norm_w"], model.arrays["norm_b"], model.cfg.eps)
    return x


def pool(tokens, cfg: ModelConfig, pooling: str):
    """tokens (B, T, D) -> features: cls (B, D), mean of patch tokens (B, D), or both (B, 2D)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    cls = tokens[:, 0]  # (B, D)
    if pooling == "cls":
        return np.ascontiguousarray(cls)
    mean = tokens[:, 1 + cfg.registers:].mean(axis=1)  # (B, D)
    if pooling == "mean":
        return mean
    return np.concatenate([cls, mean], axis=1)  # (B, 2D)


def patch_tokens(tokens, cfg: ModelConfig, h: int, w: int):
    """tokens (B, T, D) -> patch tokens as a grid (B, h, w, D)."""
    B = tokens.shape[0]
    return tokens[:, 1 + cfg.registers:].reshape(B, h, w, cfg.dim)


def embed(model: Model, pixels, *, interpolation: str = "hf", pooling: str = "cls"):
    """pixels (B, 3, H, W) -> raw (not normalised) features (B, D) or (B, 2D) for ``concat``."""
    pos_mode = pos_mode_for(model.cfg, interpolation)
    if pooling == "cls":
        cls = _encode(model, pixels, pos_mode, cls_only=True)  # (B, D) before the final LayerNorm
        return layer_norm(cls, model.arrays["norm_w"], model.arrays["norm_b"], model.cfg.eps)  # (B, D)
    tokens = forward(model, pixels, pos_mode)  # (B, T, D)
    return pool(tokens, model.cfg, pooling)


def feature_dim(cfg: ModelConfig, pooling: str) -> int:
    return 2 * cfg.dim if pooling == "concat" else cfg.dim
