"""The reference implementation for parity tests: transformers' Dinov2Model / Dinov2WithRegistersModel
built from the same parameters our encoder uses (torch and transformers needed; tests import this lazily).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np


def hf_model(params: dict, cfg):
    """A transformers model loaded the way users load the hub files: config.json + model.safetensors."""
    import torch
    from safetensors.numpy import save_file
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, mlp_ratio=4,
        image_size=cfg.grid * cfg.patch, patch_size=cfg.patch, layer_norm_eps=cfg.eps,
        use_swiglu_ffn=cfg.ffn == "swiglu",
    )
    if cfg.registers:
        config, cls = Dinov2WithRegistersConfig(num_register_tokens=cfg.registers, **common), Dinov2WithRegistersModel
    else:
        config, cls = Dinov2Config(**common), Dinov2Model
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()},
                  str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = cls.from_pretrained(tmp)
    model.eval()
    torch.set_grad_enabled(False)
    return model


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
