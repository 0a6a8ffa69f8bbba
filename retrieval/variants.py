"""The DINOv2 family: model shapes, the pinned official files, and the expected parameter table.

Parameters are plain dicts keyed by the hub checkpoint's own names (transformers' save format,
e.g. ``encoder.layer.0.attention.attention.query.weight``); ``weights.py`` renames the other formats
into these names. A ``ModelConfig`` is derived from the parameters' shapes: no flag names the variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HUB_BASE_URL = "https://huggingface.co"

# name: (dim, depth, hub repo, sha256 of model.safetensors or None, size in bytes (approx.) or None)
OFFICIAL = {
    "small": (384, 12, "facebook/dinov2-small", "ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1"),
    "base": (768, 12, "facebook/dinov2-base", "d73036b56966966d07975d696bde331762f37297e2f095de8cea0040c3aa0841"),
    "large": (1024, 24, "facebook/dinov2-large", "399fba97a95f22c36834418bc69373364a99af3a1153da1c0fb31db567c92e23"),
    "giant": (1536, 40, "facebook/dinov2-giant", "917d3c470db999d32a312f8542149be91c7cbac61ee8fb4b67ae3d82b79ce21f"),
    "small-reg": (384, 12, "facebook/dinov2-with-registers-small", None),
    "base-reg": (768, 12, "facebook/dinov2-with-registers-base", None),
    "large-reg": (1024, 24, "facebook/dinov2-with-registers-large", None),
    "giant-reg": (1536, 40, "facebook/dinov2-with-registers-giant", None),
}
DEFAULT_VARIANT = "base"
SIZE_NAMES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
HEAD_DIM = 64  # every DINOv2 variant uses 64-wide heads; the head count is dim // 64


def hub_url(variant: str, base_url: str = HUB_BASE_URL) -> str:
    """Address of a variant's ``model.safetensors`` under a hub base address."""
    repo = OFFICIAL[variant][2]
    return f"{base_url.rstrip('/')}/{repo}/resolve/main/model.safetensors"


def swiglu_hidden(dim: int) -> int:
    """SwiGLU hidden width: two thirds of 4*dim rounded up to a multiple of 8 (4096 for giant)."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    depth: int
    ffn: str = "mlp"  # "mlp" (fc1/GELU/fc2) or "swiglu" (giant)
    hidden: int = 0  # FFN hidden width; 0 means the variant's default
    registers: int = 0  # register tokens (0, or 4 for the with-registers variants)
    patch: int = 14
    grid: int = 37  # the position table covers a grid x grid patch grid (518x518 input)
    eps: float = 1e-6

    def __post_init__(self):
        if self.hidden == 0:
            object.__setattr__(self, "hidden", swiglu_hidden(self.dim) if self.ffn == "swiglu" else 4 * self.dim)

    @property
    def heads(self) -> int:
        return max(1, self.dim // HEAD_DIM)

    @property
    def variant(self) -> str:
        """small/base/large/giant (+ '-reg'); a non-standard width is named by its numbers."""
        name = SIZE_NAMES.get(self.dim, f"vit-d{self.dim}")
        return name + ("-reg" if self.registers else "")

    @property
    def description(self) -> str:
        return (f"{self.variant} (dim {self.dim}, depth {self.depth}, heads {self.heads}, {self.ffn} FFN,"
                f" {self.registers} registers, patch {self.patch})")


def official_config(variant: str, depth: int | None = None) -> ModelConfig:
    """The config of an official variant; ``depth`` may be reduced for tests."""
    dim, full_depth = OFFICIAL[variant][:2]
    return ModelConfig(
        dim=dim,
        depth=full_depth if depth is None else depth,
        ffn="swiglu" if dim == 1536 else "mlp",
        registers=4 if variant.endswith("-reg") else 0,
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a checkpoint for ``cfg``, in hub names, with its shape."""
    d, p = cfg.dim, cfg.patch
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, cfg.grid * cfg.grid + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    if cfg.registers:
        shapes["embeddings.register_tokens"] = (1, cfg.registers, d)
    for i in range(cfg.depth):
        pre = f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            shapes[pre + norm + ".weight"] = (d,)
            shapes[pre + norm + ".bias"] = (d,)
        for proj in ("query", "key", "value"):
            shapes[pre + f"attention.attention.{proj}.weight"] = (d, d)
            shapes[pre + f"attention.attention.{proj}.bias"] = (d,)
        shapes[pre + "attention.output.dense.weight"] = (d, d)
        shapes[pre + "attention.output.dense.bias"] = (d,)
        shapes[pre + "layer_scale1.lambda1"] = (d,)
        shapes[pre + "layer_scale2.lambda1"] = (d,)
        if cfg.ffn == "swiglu":
            shapes[pre + "mlp.weights_in.weight"] = (2 * cfg.hidden, d)
            shapes[pre + "mlp.weights_in.bias"] = (2 * cfg.hidden,)
            shapes[pre + "mlp.weights_out.weight"] = (d, cfg.hidden)
            shapes[pre + "mlp.weights_out.bias"] = (d,)
        else:
            shapes[pre + "mlp.fc1.weight"] = (cfg.hidden, d)
            shapes[pre + "mlp.fc1.bias"] = (cfg.hidden,)
            shapes[pre + "mlp.fc2.weight"] = (d, cfg.hidden)
            shapes[pre + "mlp.fc2.bias"] = (d,)
    return shapes


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Randomly initialised float32 parameters of the real shapes, reproducible from ``seed``.

    For tests, benchmarks and trying the tool offline: the pretrained weights cannot always be had.
    Weights follow transformers' init scale (std 0.02); norms, biases and LayerScale get random values
    too, and the position table a larger spread, so that every parameter and every interpolation
    behaviour changes the output measurably.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "embeddings.mask_token":
            arr = np.zeros(shape, np.float32)
        elif name in ("embeddings.position_embeddings", "embeddings.cls_token", "embeddings.register_tokens"):
            arr = rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "lambda1":
            arr = rng.uniform(0.1, 1.0, size=shape).astype(np.float32)
        elif ("norm" in name) and leaf == "weight":
            arr = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "bias":
            arr = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        else:
            arr = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        params[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return params
