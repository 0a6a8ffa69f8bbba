"""The reference implementation for parity tests and benchmarks: transformers' Dinov2Model /
Dinov2WithRegistersModel built from the same parameters our encoder uses, loaded and run as users of
transformers run it (default attention implementation, float32). torch and transformers needed; tests
import this lazily; bench/bench_encoder.py and bench/hf_embed.py import it too.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np


def hf_config(cfg):
    """transformers' config (Dinov2Config / Dinov2WithRegistersConfig) for one of our ModelConfigs."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    common = dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, mlp_ratio=4,
        image_size=cfg.grid * cfg.patch, patch_size=cfg.patch, layer_norm_eps=cfg.eps,
        use_swiglu_ffn=cfg.ffn == "swiglu",
    )
    if cfg.registers:
        return Dinov2WithRegistersConfig(num_register_tokens=cfg.registers, **common)
    return Dinov2Config(**common)


def save_hf(params: dict, cfg, folder) -> Path:
    """The hub layout in ``folder``: config.json + model.safetensors (float32), what from_pretrained reads."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    hf_config(cfg).save_pretrained(folder)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_hf(model_dir, attn_implementation: str | None = None):
    """transformers' model as its users run it: ``AutoModel.from_pretrained`` in float32, eval mode.

    ``attn_implementation=None`` passes nothing, so transformers picks its default attention (SDPA on
    CPU); the benchmarks' reference (bench/bench_encoder.py, bench/hf_embed.py) loads through here, and
    tests/test_bench_reference.py checks that it gets the default. ``"eager"`` is for the benchmark's
    extra, labelled column only.
    """
    import torch
    from transformers import AutoModel

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    model.eval()
    return model


def default_attn_implementation(cfg) -> str:
    """The attention implementation transformers chooses for a model of ``cfg`` when the caller names
    none (a model constructed from the bare config; use a small ``cfg``, its weights are initialised)."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    cls = Dinov2WithRegistersModel if cfg.registers else Dinov2Model
    return cls(hf_config(cfg)).config._attn_implementation


def hf_model(params: dict, cfg, attn_implementation: str | None = None):
    """A transformers model loaded the way users load the hub files: config.json + model.safetensors
    through ``load_hf`` (transformers' default attention unless ``attn_implementation`` is given)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = load_hf(save_hf(params, cfg, tmp), attn_implementation)
    torch.set_grad_enabled(False)
    return model


def hf_run(model, pixels):
    """One timed call of the benchmarks' reference: ``last_hidden_state`` under ``torch.inference_mode()``.

    ``pixels``: a float32 (B, 3, H, W) torch tensor or NumPy array."""
    import torch

    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels, np.float32))
    with torch.inference_mode():
        return model(pixel_values=x).last_hidden_state


def use_official_interpolation(model):
    """Swap transformers' position interpolation for facebookresearch/dinov2's (offset 0.1, scale factor)."""
    import torch
    from torch import nn

    emb = model.embeddings

    def official(embeddings, height, width):
        npatch = embeddings.shape[1] - 1
        pos = emb.position_embeddings.float()
        N = pos.shape[1] - 1
        if npatch == N and height == width:
            return emb.position_embeddings
        dim = embeddings.shape[-1]
        M = int(math.sqrt(N))
        h0, w0 = height // emb.patch_size, width // emb.patch_size
        patch_pos = nn.functional.interpolate(
            pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic", antialias=False,
            scale_factor=(float(h0 + 0.1) / M, float(w0 + 0.1) / M),
        )
        assert (h0, w0) == tuple(patch_pos.shape[-2:])
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    emb.interpolate_pos_encoding = official
    return model


def hf_tokens(model, pixels: np.ndarray) -> np.ndarray:
    """pixels (B, 3, H, W) float32 -> last_hidden_state (B, T, D) as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
    return out.last_hidden_state.numpy()


def errors(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Relative max error (max|diff| / max|ref|) and the smallest per-row cosine."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    cos = float(np.min(np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))))
    return {"rel_max": rel, "cos_min": cos}
