"""The encode stage: weights file -> loaded model; preprocessed images -> feature rows, in order.

``EncoderSettings`` holds every choice that changes a vector; it is validated once when built.
Images of equal preprocessed shape are batched together (resize-short gives several shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import model as M
from .errors import ConfigError
from .preprocess import ROUTES, preprocess
from .weights import file_sha256, load_params

PRECISIONS = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class EncoderSettings:
    preprocess: str = "resize-short"
    interpolation: str = "hf"
    pooling: str = "cls"
    batch_size: int = 8
    precision: str = "float32"

    def __post_init__(self):
        if self.preprocess not in ROUTES:
            raise ConfigError(f"--preprocess {self.preprocess!r}: expected one of {', '.join(ROUTES)}")
        if self.interpolation not in M.INTERPOLATIONS:
            raise ConfigError(f"--interpolation {self.interpolation!r}: expected one of {', '.join(M.INTERPOLATIONS)}")
        if self.pooling not in M.POOLINGS:
            raise ConfigError(f"--pooling {self.pooling!r}: expected one of {', '.join(M.POOLINGS)}")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"--batch-size {self.batch_size}: expected a whole number from 1 to 4096")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")


@dataclass
class Encoder:
    model: M.Model
    settings: EncoderSettings
    weights_path: Path
    _sha256: str | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        """Width of one feature row."""
        return M.feature_dim(self.model.cfg, self.settings.pooling)

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_path)
        return self._sha256

    def record(self) -> dict:
        """What identifies the vectors this encoder makes (stored with a gallery)."""
        return {
            "variant": self.model.cfg.variant,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.settings.preprocess,
            "interpolation": self.settings.interpolation,
            "pooling": self.settings.pooling,
            "dim": self.dim,
        }


def load_encoder(weights_path, settings: EncoderSettings) -> Encoder:
    params, cfg = load_params(weights_path)
    model = M.prepare(params, cfg, dtype=PRECISIONS[settings.precision])
    return Encoder(model=model, settings=settings, weights_path=Path(weights_path))


def encode_pixels(encoder: Encoder, arrays: list) -> np.ndarray:
    """Preprocessed images [(3, H, W)] -> features (N, dim) float32, rows in input order.

    Equal shapes are stacked into batches of at most ``batch_size``.
    """
    out = np.empty((len(arrays), encoder.dim), np.float32)  # (N, dim)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    bs = encoder.settings.batch_size
    for idx in by_shape.values():
        for start in range(0, len(idx), bs):
            chunk = idx[start:start + bs]
            pixels = np.stack([arrays[i] for i in chunk])  # (b, 3, H, W)
            feats = M.embed(encoder.model, pixels, interpolation=encoder.settings.interpolation,
                            pooling=encoder.settings.pooling)  # (b, dim)
            out[chunk] = feats
    return out


def encode_images(encoder: Encoder, images: list) -> np.ndarray:
    """Decoded RGB images -> features (N, dim) float32, rows in input order."""
    return encode_pixels(encoder, [preprocess(img, encoder.settings.preprocess) for img in images])


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    f = np.asarray(features, np.float64)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return (f / np.where(n == 0, 1, n)).astype(np.float32)
