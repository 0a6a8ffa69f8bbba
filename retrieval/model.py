"""The DINOv2 forward pass in NumPy: pure functions over arrays, parameters keyed by hub names.

Shapes: B batch, H x W pixels, h x w patch grid (H/14, W/14), N = h*w patches, R registers,
T = 1 + R + N tokens, D width, Hd heads, d = D/Hd head width, F FFN hidden width.

``prepare`` turns a checkpoint's parameters into the arrays the forward pass multiplies with
(transposed, QKV fused, in the compute dtype), once at load. ``forward`` returns all tokens after
the final LayerNorm; ``embed`` pools them into image features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf

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


def prepare(params: dict, cfg: ModelConfig, dtype=np.float32) -> Model:
    """Arrange checkpoint parameters for the forward pass (done once at load)."""
    dt = np.dtype(dtype)
    D = cfg.dim

    def arr(name):
        return np.ascontiguousarray(params[name], dtype=dt)

    a = {
        "cls": arr("embeddings.cls_token").reshape(1, 1, D),  # (1, 1, D)
        "pos": arr("embeddings.position_embeddings"),  # (1, 1 + 37*37, D)
        "patch_w": np.ascontiguousarray(arr("embeddings.patch_embeddings.projection.weight").reshape(D, -1).T),  # (3*p*p, D)
        "patch_b": arr("embeddings.patch_embeddings.projection.bias"),  # (D,)
        "norm_w": arr("layernorm.weight"),  # (D,)
        "norm_b": arr("layernorm.bias"),  # (D,)
        "layers": [],
    }
    if cfg.registers:
        a["registers"] = arr("embeddings.register_tokens")  # (1, R, D)
    for i in range(cfg.depth):
        pre = f"encoder.layer.{i}."
        att = pre + "attention.attention."
        layer = {
            "norm1_w": arr(pre + "norm1.weight"),
            "norm1_b": arr(pre + "norm1.bias"),
            # fused QKV: (D, 3D), columns [q | k | v]
            "qkv_w": np.ascontiguousarray(np.concatenate([arr(att + n + ".weight") for n in ("query", "key", "value")]).T),
            "qkv_b": np.concatenate([arr(att + n + ".bias") for n in ("query", "key", "value")]),  # (3D,)
            "proj_w": np.ascontiguousarray(arr(pre + "attention.output.dense.weight").T),  # (D, D)
            "proj_b": arr(pre + "attention.output.dense.bias"),  # (D,)
            "ls1": arr(pre + "layer_scale1.lambda1"),  # (D,)
            "norm2_w": arr(pre + "norm2.weight"),
            "norm2_b": arr(pre + "norm2.bias"),
            "ls2": arr(pre + "layer_scale2.lambda1"),  # (D,)
        }
        if cfg.ffn == "swiglu":
            layer["fc1_w"] = np.ascontiguousarray(arr(pre + "mlp.weights_in.weight").T)  # (D, 2F)
            layer["fc1_b"] = arr(pre + "mlp.weights_in.bias")  # (2F,)
            layer["fc2_w"] = np.ascontiguousarray(arr(pre + "mlp.weights_out.weight").T)  # (F, D)
            layer["fc2_b"] = arr(pre + "mlp.weights_out.bias")  # (D,)
        else:
            layer["fc1_w"] = np.ascontiguousarray(arr(pre + "mlp.fc1.weight").T)  # (D, F)
            layer["fc1_b"] = arr(pre + "mlp.fc1.bias")  # (F,)
            layer["fc2_w"] = np.ascontiguousarray(arr(pre + "mlp.fc2.weight").T)  # (F, D)
            layer["fc2_b"] = arr(pre + "mlp.fc2.bias")  # (D,)
        a["layers"].append(layer)
    return Model(cfg=cfg, arrays=a, dtype=dt.type)


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


def gelu(x):
    """Exact GELU, in place: x * (1 + erf(x / sqrt(2))) / 2."""
    y = erf(x * np.asarray(1 / np.sqrt(2), x.dtype))  # (..., F)
    y += 1
    y *= 0.5
    x *= y
    return x


def silu(x):
    """x * sigmoid(x)."""
    return x / (1 + np.exp(-x))


def softmax(s):
    """In place over the last axis."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def attention(x, layer, heads):
    """x (B, T, D) normalised tokens -> (B, T, D) attention output (before LayerScale)."""
    B, T, D = x.shape
    d = D // heads
    qkv = x.reshape(B * T, D) @ layer["qkv_w"]  # (B*T, 3D)
    qkv += layer["qkv_b"]
    qkv = qkv.reshape(B, T, 3, heads, d).transpose(2, 0, 3, 1, 4)  # (3, B, Hd, T, d)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, Hd, T, d) each
    s = q @ k.transpose(0, 1, 3, 2)  # (B, Hd, T, T)
    s *= np.asarray(d ** -0.5, x.dtype)
    softmax(s)
    o = s @ v  # (B, Hd, T, d)
    o = o.transpose(0, 2, 1, 3).reshape(B * T, D)  # (B*T, D)
    out = o @ layer["proj_w"]  # (B*T, D)
    out += layer["proj_b"]
    return out.reshape(B, T, D)


def ffn(x, layer, kind):
    """x (B, T, D) normalised tokens -> (B, T, D) FFN output (before LayerScale)."""
    B, T, D = x.shape
    h = x.reshape(B * T, D) @ layer["fc1_w"]  # (B*T, F) or (B*T, 2F)
    h += layer["fc1_b"]
    if kind == "swiglu":
        x1, x2 = np.split(h, 2, axis=-1)  # (B*T, F) each
        h = silu(x1) * x2  # (B*T, F)
    else:
        h = gelu(h)  # (B*T, F)
    out = h @ layer["fc2_w"]  # (B*T, D)
    out += layer["fc2_b"]
    return out.reshape(B, T, D)


def block(x, layer, cfg):
    """One transformer layer, pre-norm with LayerScale: x (B, T, D) -> (B, T, D)."""
    y = attention(layer_norm(x, layer["norm1_w"], layer["norm1_b"], cfg.eps), layer, cfg.heads)  # (B, T, D)
    y *= layer["ls1"]
    x = x + y
    y = ffn(layer_norm(x, layer["norm2_w"], layer["norm2_b"], cfg.eps), layer, cfg.ffn)  # (B, T, D)
    y *= layer["ls2"]
    x += y
    return x


def position_table(model: Model, h: int, w: int, pos_mode: str):
    """The position table for an h x w patch grid, interpolated once and cached: (1, 1 + h*w, D)."""
    key = (h, w, pos_mode)
    table = model.pos_cache.get(key)
    if table is None:
        table = interpolate_pos_embed(model.arrays["pos"], h, w, pos_mode).astype(model.dtype, copy=False)
        model.pos_cache[key] = table
    return table


def embed_tokens(model: Model, pixels, pos_mode: str):
    """pixels (B, 3, H, W) -> tokens (B, T, D) before the first layer: [CLS, registers, patches]."""
    cfg, a = model.cfg, model.arrays
    B, C, H, W = pixels.shape
    p = cfg.patch
    if C != 3 or H % p or W % p or H == 0 or W == 0:
        raise ConfigError(f"pixels of shape {pixels.shape}: expected (B, 3, H, W) with H and W multiples of {p}")
    h, w = H // p, W // p
    x = np.asarray(pixels, dtype=model.dtype)
    patches = x.reshape(B, C, h, p, w, p).transpose(0, 2, 4, 1, 3, 5).reshape(B * h * w, C * p * p)  # (B*N, 3*p*p)
    tok = patches @ a["patch_w"]  # (B*N, D)
    tok += a["patch_b"]
    tok = tok.reshape(B, h * w, cfg.dim)  # (B, N, D)
    pos = position_table(model, h, w, pos_mode)  # (1, 1 + N, D)
    parts = [np.broadcast_to(a["cls"] + pos[:, :1], (B, 1, cfg.dim))]  # (B, 1, D)
    if cfg.registers:
        parts.append(np.broadcast_to(a["registers"], (B, cfg.registers, cfg.dim)))  # (B, R, D)
    tok += pos[:, 1:]
    parts.append(tok)
    return np.concatenate(parts, axis=1)  # (B, T, D)


def forward(model: Model, pixels, pos_mode: str):
    """pixels (B, 3, H, W) -> all tokens after the final LayerNorm (B, T, D)."""
    if pos_mode not in POS_MODES:
        raise ConfigError(f"position interpolation {pos_mode!r}: expected one of {', '.join(POS_MODES)}")
    x = embed_tokens(model, pixels, pos_mode)  # (B, T, D)
    for layer in model.arrays["layers"]:
        x = block(x, layer, model.cfg)  # (B, T, D)
    return layer_norm(x, model.arrays["norm_w"], model.arrays["norm_b"], model.cfg.eps)  # (B, T, D)


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
    tokens = forward(model, pixels, pos_mode_for(model.cfg, interpolation))  # (B, T, D)
    return pool(tokens, model.cfg, pooling)


def feature_dim(cfg: ModelConfig, pooling: str) -> int:
    return 2 * cfg.dim if pooling == "concat" else cfg.dim
