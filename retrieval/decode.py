"""Bytes or a file -> a fully decoded 8-bit RGB PIL image, or an :class:`ImageError`.

Content is judged by decoding it, never by the file name or a content type. Every failure
is an :class:`~retrieval.errors.ImageError` whose ``reason`` is one of :data:`REASONS`:

``"empty"``         0 bytes.
``"not-an-image"``  Pillow cannot identify the data (HTML, SVG, text, PDF, EPS, random bytes...).
``"truncated"``     the data ends before the image does.
``"too-large"``     the declared width x height is above ``max_pixels`` (a decompression bomb);
                    checked from the header, before any pixel is decoded.
``"undecodable"``   any other decoding failure (a corrupt stream, an unsupported variant...).
``"unreadable"``    :func:`open_path` only: the file is missing or cannot be read.

What comes back
---------------
:func:`decode` and :func:`open_path` return a loaded ``PIL.Image.Image`` in mode ``"RGB"``
(8 bits per channel). Two facts about the original travel with it:

* ``image.format`` -- the source format as Pillow names it (``"JPEG"``, ``"PNG"``, ``"GIF"``,
  ``"WEBP"``, ``"TIFF"``, ``"MPO"``...); an APNG is ``"PNG"``.
* ``image.size`` -- ``(width, height)`` *after* the EXIF orientation was applied, i.e. as a
  viewer shows it.
* ``image.info["source_mode"]`` -- the Pillow mode the data decoded to before the RGB
  conversion (``"CMYK"``, ``"I;16"``, ``"P"``...), for diagnostics.

:func:`describe` packs the first two into an :class:`ImageInfo` ``(format, width, height)``.

Conversion to RGB (see also docs/images.md)
-------------------------------------------
* EXIF orientation (tags 2-8) is applied with the table of ``PIL.ImageOps.exif_transpose``;
  an unreadable EXIF block is ignored (the pixels are still fine).
* Animated GIF / WebP / APNG (and multi-page TIFF, MPO): the first frame only.
* Anything with transparency -- an alpha band (RGBA, LA, PA, La, RGBa) or a ``transparency``
  entry (P with tRNS, L/RGB with a transparent colour key, GIF) -- is composited over opaque
  white with ``Image.alpha_composite`` (the rule transformers' ``convert_to_rgb`` uses).
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer ``I``: clipped to
  0..65535, then scaled to 8 bits as ``round(v / 257)`` (65535 -> 255, 257*k -> k).
  Pillow's own ``convert("RGB")`` clips such values at 255, which turns most of the image white.
* 16-bit RGB / RGBA / grey+alpha PNGs: Pillow 13 decodes them straight to 8-bit ``RGB`` /
  ``RGBA`` keeping the high byte, ``v // 256``; that differs from ``round(v / 257)`` by at most
  one level and is kept as is.
* ``F`` (32-bit float): NaN -> 0, clipped to 0..255, rounded to the nearest integer.
* 16-bit, 32-bit integer and float images are converted a strip of rows at a time (about 262,000 pixels
  each): the conversion needs no more than the 8-bit result plus a few MB, not full-size 64-bit copies.
* ``1`` (bilevel) -> 0 / 255; ``L`` -> grey RGB; ``CMYK`` (including Adobe's inverted CMYK
  JPEGs, which Pillow's JPEG decoder un-inverts), ``YCbCr``, ``HSV``, ``RGBX``, ``P`` without
  transparency, ``LAB``: Pillow's ``convert("RGB")`` (``LAB`` through ``PIL.ImageCms`` to sRGB
  where Pillow cannot convert it itself).
* ICC colour profiles are ignored: pixel values are used as stored (as transformers does).

Thread safety: nothing global is changed. In particular ``Image.MAX_IMAGE_PIXELS`` and the
warnings filters are left alone; the size limit is our own check of ``img.size``. Pillow's
own ``DecompressionBombError`` (declared size above ``2 * Image.MAX_IMAGE_PIXELS``) and, when
warnings are errors, ``DecompressionBombWarning`` are reported as ``"too-large"`` too. When
the declared size is between ``Image.MAX_IMAGE_PIXELS`` and ``2 *`` that, Pillow emits its
warning while opening, before our check rejects the image (with the default ``max_pixels``);
``cli.py`` ignores that warning, as the rejection already says it.

EPS data is never handed to Pillow's EPS plugin (it runs Ghostscript on the input); it is
reported as ``"not-an-image"``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

__all__ = [
    "REASONS",
    "DEFAULT_MAX_PIXELS",
    "ImageInfo",
    "decode",
    "open_path",
    "describe",
    "to_rgb",
]

REASONS = ("empty", "not-an-image", "truncated", "too-large", "undecodable", "unreadable")

#: Pillow's default ``Image.MAX_IMAGE_PIXELS`` (a 1/4 GB RGB image), fixed here so that a
#: caller's change to Pillow's global does not change our limit.
DEFAULT_MAX_PIXELS = 89_478_485

# Formats Pillow may identify that we refuse to hand over: EPS runs Ghostscript on the data.
_REFUSED_FORMATS = frozenset({"EPS"})

# Errors Pillow and its plugins raise on bad data. UnidentifiedImageError is an OSError.
# zlib.error: a corrupt deflate stream inside some plugins; RuntimeError: the AVIF decoder.
_DECODE_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    ZeroDivisionError,
    OverflowError,
)

# Errors reading EXIF: a broken EXIF block only costs the orientation.
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error)

# EXIF orientation -> transpose, the table of PIL.ImageOps.exif_transpose.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# File signatures, used only to word the message when Pillow cannot identify the data.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageInfo(NamedTuple):
    """What :func:`describe` reports: the source format and the displayed size."""

    format: str | None
    width: int
    height: int


def describe(img: Image.Image) -> ImageInfo:
    """``ImageInfo(format, width, height)`` of an image returned by :func:`decode`.

    ``format`` is the source file format (``img.format``; ``None`` for an image not made by
    :func:`decode`), ``width``/``height`` the size after EXIF orientation.
    """
    return ImageInfo(img.format, img.width, img.height)


def open_path(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read ``path`` and :func:`decode` it; a missing or unreadable file is reason ``"unreadable"``."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        problem = exc.strerror or str(exc) or type(exc).__name__
        raise ImageError(source, f"cannot read the file: {problem}", "unreadable") from exc
    return decode(data, source, max_pixels=max_pixels)


def decode(data: bytes, source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to a loaded 8-bit RGB ``PIL.Image.Image`` (see the module docstring).

    ``source`` names the input in error messages (a path or URL). ``max_pixels`` bounds the
    declared width x height, checked before decoding. Raises :class:`ImageError` with one of
    the reasons ``"empty"``, ``"not-an-image"``, ``"truncated"``, ``"too-large"``, ``"undecodable"``.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    source = str(source)
    if not data:
        raise ImageError(source, "empty (0 bytes)", "empty")

    fmt = None
    try:
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
        fmt = img.format
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                source,
                f"too large: {width}x{height} = {width * height} pixels declared, the limit is {max_pixels}",
                "too-large",
            )
        if width < 1 or height < 1:
            raise ImageError(source, f"{fmt} image declares an empty size {width}x{height}", "undecodable")
        img.load()  # decode the (first) frame fully, here, so that a truncated file fails now
        orientation = _orientation(img)
        source_mode = img.mode
        rgb = to_rgb(img)
        if orientation in _ORIENTATION:
            rgb = rgb.transpose(_ORIENTATION[orientation])
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(source, f"too large: {exc}", "too-large") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(source, data) from exc
    except _DECODE_ERRORS as exc:
        raise _classify(source, data, fmt, exc) from exc

    if rgb is img:  # never hand back the file object (it keeps the compressed bytes alive)
        rgb = img.copy()
    rgb.format = fmt
    rgb.info = {"source_mode": source_mode}
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit ``RGB`` by the rules of this module.

    Does not apply EXIF orientation (:func:`decode` does). Returns ``img`` itself when it is
    already ``RGB`` without a transparent colour key.
    """
    mode = img.mode
    transparency = img.info.get("transparency")
    if mode in _SIXTEEN_BIT_MODES:
        keyed = isinstance(transparency, int)
        grey = np.empty((img.height, img.width), np.uint8)
        alpha = np.empty((img.height, img.width), np.uint8) if keyed else None
        for y, block in _row_strips(img):  # a strip at a time: no full-size int64 copies
            values = block.astype(np.int64)
            grey[y:y + len(values)] = (np.clip(values, 0, 65535) + 128) // 257
            if keyed:
                alpha[y:y + len(values)] = np.where(values == transparency, 0, 255)
        if keyed:
            return _over_white(Image.fromarray(np.stack([grey, alpha], axis=-1), "LA").convert("RGBA"))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.empty((img.height, img.width), np.uint8)
        for y, block in _row_strips(img):
            values = np.nan_to_num(block.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            grey[y:y + len(values)] = np.floor(np.clip(values, 0.0, 255.0) + 0.5)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA
        img = img.convert("LA")
    if transparency is not None or any(band in ("A", "a") for band in img.getbands()):
        return _over_white(img.convert("RGBA"))
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError:
        if mode != "LAB":  # an older Pillow may not convert LAB itself
            raise
        return _lab_to_rgb(img)


def _row_strips(img: Image.Image, pixels: int = 1 << 18):
    """``(top row, array)`` for successive horizontal strips of about ``pixels`` pixels of ``img``, so that
    converting a 16-bit or float image within the pixel limit never makes full-size 64-bit copies (a
    89-megapixel float image would need 700 MB per copy)."""
    step = max(1, pixels // max(1, img.width))
    for y in range(0, img.height, step):
        yield y, np.asarray(img.crop((0, y, img.width, min(img.height, y + step))))


def _over_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(img, transform)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _EXIF_ERRORS:
        return 1
    return value if isinstance(value, int) else 1


def _allowed_formats() -> list[str]:
    Image.init()
    return [name for name in Image.OPEN if name not in _REFUSED_FORMATS]


def _unidentified(source: str, data: bytes) -> ImageError:
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return ImageError(source, f"starts like a {name} file but its header cannot be read", "undecodable")
    if _riff_webp_truncated(data):
        return ImageError(source, "truncated WEBP data", "truncated")
    return ImageError(source, "not an image (Pillow cannot identify the data)", "not-an-image")


def _classify(source: str, data: bytes, fmt: str | None, exc: BaseException) -> ImageError:
    what = fmt or "image"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in detail.lower() or _riff_webp_truncated(data):
        return ImageError(source, f"truncated {what} data: {detail}", "truncated")
    return ImageError(source, f"cannot decode the {what} data: {detail}", "undecodable")


def _riff_webp_truncated(data: bytes) -> bool:
    """A WebP file is a RIFF container whose header declares its length: shorter data is cut."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < struct.unpack("<I", data[4:8])[0] + 8
