"""RGB PIL image -> normalised float32 array ``(3, H, W)``, H and W multiples of the patch (14).

Every route ends the same way: ``(v / 255 - mean) / std`` per channel with the ImageNet
``MEAN = (0.485, 0.456, 0.406)`` and ``STD = (0.229, 0.224, 0.225)``, in RGB order, channels first.

Routes (:data:`ROUTES`), with ``size`` (default 224, a positive multiple of 14):

``"resize-short"`` -- the retrieval default (the seed's ``resize_short_side``).
    Scale so the short side is ``size`` and the long side ``L = long * size / short`` (unrounded),
    then round each side to the nearest multiple of 14, ``max(14, round(L / 14) * 14)``
    (Python's ``round``), and resize once with PIL bicubic. Extreme aspect ratios: the long
    side is capped at ``MAX_ASPECT * size`` (4 x 224 = 896 px, 64 patches): when
    ``long / short > MAX_ASPECT`` the whole image is scaled so its long side is that cap,
    keeping the aspect ratio, and the short side (rounded the same way, at least 14) ends up
    below ``size``. A 100000 x 10 panorama becomes 896 x 14, not a 2-million-pixel strip.
    Small images are enlarged: a 1 x 1 image becomes 224 x 224.

``"center-crop"`` -- the seed's precision check.
    The central ``size x size`` pixels of the image, no resampling, with the offsets
    ``left = (W - size) // 2``, ``top = (H - size) // 2`` (transformers' ``center_crop``
    convention: an odd excess leaves the extra column/row on the right/bottom). An image
    smaller than ``size`` on either side is first resized with PIL bicubic so that its short
    side is ``size`` (long side ``max(size, round(long * size / short))``), then cropped the
    same way.

``"hf"`` -- exactly transformers' image processor for the DINOv2 checkpoints (the PIL backend,
    ``BitImageProcessorPil`` in transformers 5, ``BitImageProcessor`` in 4.x):
    resize the short side to ``S = 256`` and the long side to ``int(S * long / short)``
    (truncated) with PIL bicubic -- even when the size does not change --, centre-crop
    ``224 x 224`` with ``top = (h - 224) // 2``, ``left = (w - 224) // 2``, then
    ``float32(float64(v) * (1/255))``, minus ``float32(mean)``, divided by ``float32(std)``
    in float32. The result is bit-identical to ``processor(img)["pixel_values"]``. With another
    ``size`` the crop is ``size`` and ``S = round(size * 256 / 224)`` (transformers' processor
    configured with those two numbers).

The other routes normalise in float64 and round once to float32, so a flat colour ``v``
gives exactly ``float32((v / 255 - mean) / std)``; the two rules differ by at most 1 ulp.

When the enlarged intermediate image of the ``"hf"`` or small-image ``"center-crop"`` path
would exceed 2**24 pixels (aspect ratios beyond about 256:1, where transformers itself would
allocate that giant image), only the crop window is resampled (``Image.resize(..., box=...)``):
the same filter taps, but Pillow may then run its two 1-D passes in the other order, so
pixels can differ from resize-then-crop by a few grey levels there.

:func:`output_shape` gives the ``(H, W)`` a route produces from the decoded ``(width, height)``
alone, so callers can group images of equal shape before preprocessing; :func:`to_batch`
stacks equal shapes to ``(B, 3, H, W)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import ConfigError

__all__ = [
    "ROUTES",
    "PATCH",
    "MEAN",
    "STD",
    "MAX_ASPECT",
    "preprocess",
    "output_shape",
    "to_batch",
]

ROUTES = ("resize-short", "center-crop", "hf")
PATCH = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: "resize-short" caps the long side at MAX_ASPECT * size.
MAX_ASPECT = 4
#: transformers' DINOv2 processor: resize the short side to 256, crop 224.
HF_RESIZE = 256
HF_CROP = 224
_MAX_INTERMEDIATE_PIXELS = 1 << 24


def _check(route: str, size) -> int:
    if route not in ROUTES:
        raise ConfigError(f"unknown preprocessing route {route!r}; choose one of {', '.join(ROUTES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < PATCH or size % PATCH:
        raise ConfigError(f"preprocessing size must be a positive multiple of {PATCH}, got {size!r}")
    return int(size)


def _round14(length: float) -> int:
    return max(PATCH, round(length / PATCH) * PATCH)


def _resize_short_shape(width: int, height: int, size: int) -> tuple[int, int]:
    short, long = min(width, height), max(width, height)
    long_scaled = long * size / short
    cap = MAX_ASPECT * size
    if long_scaled > cap:
        new_long, new_short = cap, _round14(short * cap / long)
    else:
        new_long, new_short = _round14(long_scaled), _round14(size)
    return (new_long, new_short) if height >= width else (new_short, new_long)  # (H, W)


def _hf_resize(size: int) -> int:
    return HF_RESIZE if size == HF_CROP else round(size * HF_RESIZE / HF_CROP)


def _hf_resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: (H, W)."""
    target = _hf_resize(size)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def output_shape(width: int, height: int, route: str, size: int = 224) -> tuple[int, int]:
    """The ``(H, W)`` of :func:`preprocess`'s output for an RGB image of ``width x height``."""
    size = _check(route, size)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if route == "resize-short":
        return _resize_short_shape(width, height, size)
    return (size, size)


def preprocess(img: Image.Image, route: str, size: int = 224) -> np.ndarray:
    """Normalised float32 array ``(3, H, W)`` of an RGB image, by ``route`` (see the module docstring).

    ``img`` should come from :func:`retrieval.decode.decode`; an image in another mode is first
    converted with :func:`retrieval.decode.to_rgb`.
    """
    size = _check(route, size)
    if img.mode != "RGB":
        from .decode import to_rgb

        img = to_rgb(img)
    width, height = img.size
    if route == "resize-short":
        out_h, out_w = _resize_short_shape(width, height, size)
        pixels = img if (out_w, out_h) == img.size else img.resize((out_w, out_h), Image.BICUBIC)
        return _normalise(np.asarray(pixels), _lut_exact())
    if route == "center-crop":
        if width >= size and height >= size:
            left, top = (width - size) // 2, (height - size) // 2
            return _normalise(np.asarray(img.crop((left, top, left + size, top + size))), _lut_exact())
        short, long = min(width, height), max(width, height)
        new_long = max(size, round(long * size / short))
        new_w, new_h = (new_long, size) if width >= height else (size, new_long)
        return _normalise(_resize_crop(img, new_w, new_h, size), _lut_exact())
    new_h, new_w = _hf_resized_shape(width, height, size)
    return _normalise(_resize_crop(img, new_w, new_h, size), _lut_hf())


def to_batch(arrays) -> np.ndarray:
    """Stack ``(3, H, W)`` arrays of one shape into a C-contiguous float32 ``(B, 3, H, W)``."""
    arrays = list(arrays)
    if not arrays:
        raise ValueError("to_batch needs at least one array")
    shape = arrays[0].shape
    if len(shape) != 3 or shape[0] != 3:
        raise ValueError(f"expected (3, H, W) arrays, got shape {shape}")
    for a in arrays:
        if a.shape != shape:
            raise ValueError(f"to_batch needs arrays of one shape; got {shape} and {a.shape} (group by output_shape)")
    return np.ascontiguousarray(np.stack(arrays).astype(np.float32, copy=False))


def _resize_crop(img: Image.Image, new_w: int, new_h: int, crop: int) -> np.ndarray:
    """Resize to ``new_w x new_h`` (bicubic), then take the central ``crop x crop``; as uint8 HWC."""
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    if new_w * new_h <= _MAX_INTERMEDIATE_PIXELS:
        resized = img.resize((new_w, new_h), Image.BICUBIC)
        return np.asarray(resized)[top : top + crop, left : left + crop]
    # Resample only the window: output pixel j of the full resize has its centre at
    # (j + 0.5) * W / new_w in the source, so the crop is the box starting at left * W / new_w.
    sx, sy = img.width / new_w, img.height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return np.asarray(img.resize((crop, crop), Image.BICUBIC, box=box))


def _normalise(pixels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) through a per-channel 256-entry table."""
    channels = np.moveaxis(pixels, -1, 0)
    out = np.empty(channels.shape, dtype=np.float32)
    for c in range(3):
        np.take(lut[c], channels[c], out=out[c], mode="clip")
    return out


@lru_cache(maxsize=None)
def _lut_exact() -> np.ndarray:
    v = np.arange(256, dtype=np.float64)
    lut = (v[None, :] / 255.0 - np.array(MEAN)[:, None]) / np.array(STD)[:, None]
    lut = lut.astype(np.float32)
    lut.flags.writeable = False
    return lut


@lru_cache(maxsize=None)
def _lut_hf() -> np.ndarray:
    # transformers: rescale = (uint8 as float64 * (1/255)).astype(float32); normalize in float32.
    v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(MEAN, dtype=np.float32)[:, None]
    std = np.array(STD, dtype=np.float32)[:, None]
    lut = ((v[None, :] - mean) / std).astype(np.float32)
    lut.flags.writeable = False
    return lut
