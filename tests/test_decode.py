"""retrieval.decode: real files written by Pillow, decoded back; every failure is a specific ImageError."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from retrieval.decode import DEFAULT_MAX_PIXELS, REASONS, ImageInfo, decode, describe, open_path, to_rgb
from retrieval.errors import ImageError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(img):
    return np.asarray(img).astype(int)


def close(actual, expected, tol=6):
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected))


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png16(arr, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): arr is (H, W, C) uint16."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def png_declaring(width, height):
    """A valid tiny PNG whose IHDR is patched to declare width x height (a decompression bomb)."""
    data = encode(Image.new("1", (8, 8)), "PNG")
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


def expect_error(data, reason, **kw):
    with pytest.raises(ImageError) as info:
        decode(data, "http://example.test/x", **kw)
    assert info.value.reason == reason, str(info.value)
    assert info.value.source == "http://example.test/x"
    assert str(info.value).startswith("http://example.test/x: ")
    assert "\n" not in str(info.value)
    return info.value


# --- ordinary images ---------------------------------------------------------------------


def test_jpeg_rgb():
    src = Image.new("RGB", (40, 30), (200, 30, 60))
    img = decode(encode(src, "JPEG", quality=95), "a.jpg")
    assert img.mode == "RGB" and img.size == (40, 30) and img.format == "JPEG"
    assert close(img.getpixel((20, 15)), (200, 30, 60))
    assert describe(img) == ImageInfo("JPEG", 40, 30)
    assert img.info["source_mode"] == "RGB"


def test_png_rgb_is_lossless():
    arr = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    img = decode(encode(Image.fromarray(arr), "PNG"), "a.png")
    assert img.format == "PNG" and img.size == (23, 17)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grey_l_becomes_grey_rgb():
    img = decode(encode(Image.new("L", (5, 4), 77), "PNG"), "g.png")
    assert img.mode == "RGB" and img.getpixel((2, 2)) == (77, 77, 77)
    assert img.info["source_mode"] == "L"


def test_one_bit():
    arr = np.zeros((6, 8), dtype=bool)
    arr[:, ::2] = True
    img = decode(encode(Image.fromarray(arr), "PNG"), "bw.png")
    assert img.info["source_mode"] == "1"
    out = pixels(img)
    assert (out[:, ::2] == 255).all() and (out[:, 1::2] == 0).all()


def test_cmyk_jpeg_adobe_inverted():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # libjpeg writes the APP14 marker; the samples are stored inverted
    img = decode(data, "cmyk.jpg")
    assert img.info["source_mode"] == "CMYK" and img.format == "JPEG"
    assert close(img.getpixel((8, 8)), RED)


def test_sixteen_bit_grey_png_scaled_by_257():
    values = np.array([0, 128, 129, 257, 385, 386, 1000, 32896, 40000, 65278, 65535], dtype=np.uint16)
    data = encode(Image.fromarray(np.tile(values, (3, 1))), "PNG")
    assert data[24] == 16  # bit depth in IHDR
    img = decode(data, "grey16.png")
    assert img.info["source_mode"] == "I;16"
    expected = np.array([0, 0, 1, 1, 1, 2, 4, 128, 156, 254, 255])
    np.testing.assert_array_equal(pixels(img)[1, :, 0], expected)
    np.testing.assert_array_equal(pixels(img)[1, :, 2], expected)
    # Pillow's own convert would have clipped everything above 255 to white
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((7, 0)) == WHITE


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    v = np.array([0, 255, 256, 385, 32896, 65280, 65535], dtype=np.uint16)
    data = png16(np.stack([v, v[::-1], v], axis=-1)[None], color_type=2)
    img = decode(data, "rgb16.png")
    assert img.info["source_mode"] == "RGB"  # Pillow 13 reduces 16-bit RGB to 8 bits itself
    np.testing.assert_array_equal(pixels(img)[0, :, 0], v // 256)
    np.testing.assert_array_equal(pixels(img)[0, :, 1], v[::-1] // 256)
    assert np.abs(pixels(img)[0, :, 0] - (v.astype(int) + 128) // 257).max() <= 1


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16B", [0, 257, 386, 65535], [0, 1, 2, 255]),
        ("I", [-5, 257, 70000, 65535], [0, 1, 255, 255]),
        ("F", [-3.0, 12.4, 12.6, 300.0], [0, 12, 13, 255]),
    ],
)
def test_wide_modes_in_memory(mode, values, expected):
    dtype = {"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    arr = np.array([values], dtype=dtype)
    src = Image.fromarray(arr) if mode != "I;16B" else Image.frombytes("I;16B", (4, 1), arr.tobytes())
    assert src.mode == mode
    np.testing.assert_array_equal(pixels(to_rgb(src))[0, :, 1], expected)


def test_float_tiff_is_clipped():
    arr = np.array([[-10.0, 0.4, 99.5, 1e6]], dtype=np.float32)
    img = decode(encode(Image.fromarray(arr), "TIFF"), "f.tif")
    assert img.info["source_mode"] == "F"
    np.testing.assert_array_equal(pixels(img)[0, :, 0], [0, 0, 100, 255])


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "RGBX"])
def test_other_colour_spaces_convert(mode):
    src = Image.new("RGB", (4, 4), (200, 40, 90)).convert(mode)
    out = to_rgb(src)
    assert out.mode == "RGB"
    assert close(out.getpixel((1, 1)), (200, 40, 90), tol=12)


# --- transparency -----------------------------------------------------------------------


def test_rgba_transparent_is_white_and_half_alpha_blends():
    arr = np.zeros((4, 6, 4), dtype=np.uint8)
    arr[..., :3] = (10, 20, 30)
    arr[:, :2, 3] = 0  # transparent
    arr[:, 2:4, 3] = 255  # opaque
    arr[:, 4:, 3] = 128  # half
    img = decode(encode(Image.fromarray(arr, "RGBA"), "PNG"), "rgba.png")
    assert img.mode == "RGB" and img.info["source_mode"] == "RGBA"
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((2, 0)) == (10, 20, 30)
    assert close(img.getpixel((5, 0)), (132, 137, 142), tol=1)  # 0.5 * c + 0.5 * 255


def test_la_png():
    arr = np.zeros((3, 4, 2), dtype=np.uint8)
    arr[..., 0] = 60
    arr[:, 2:, 1] = 255
    img = decode(encode(Image.fromarray(arr, "LA"), "PNG"), "la.png")
    assert img.info["source_mode"] == "LA"
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((3, 2)) == (60, 60, 60)


def test_palette_with_transparency():
    src = Image.new("P", (6, 4), 0)
    src.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    for x in range(3):
        for y in range(4):
            src.putpixel((x, y), 1)
    data = encode(src, "PNG", transparency=0)  # index 0 (blue) transparent: tRNS chunk
    assert b"tRNS" in data
    img = decode(data, "p.png")
    assert img.info["source_mode"] == "P"
    assert img.getpixel((0, 0)) == RED and img.getpixel((5, 3)) == WHITE


def test_palette_without_transparency():
    src = Image.new("P", (3, 3), 1)
    src.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    assert decode(encode(src, "PNG"), "p.png").getpixel((1, 1)) == (0, 128, 0)


def test_rgb_colour_key_transparency():
    src = Image.new("RGB", (4, 2), (1, 2, 3))
    src.putpixel((0, 0), (9, 9, 9))
    img = decode(encode(src, "PNG", transparency=(1, 2, 3)), "key.png")
    assert img.getpixel((0, 0)) == (9, 9, 9) and img.getpixel((3, 1)) == WHITE


def test_pa_in_memory():
    src = Image.new("PA", (2, 2))
    src.putpalette([255, 0, 0] * 256)
    out = to_rgb(src)  # alpha 0 everywhere
    assert out.getpixel((0, 0)) == WHITE


# --- orientation, animation -------------------------------------------------------------


def oriented_jpeg(orientation):
    """40 wide x 20 tall, red 10x10 block at the stored top-left, green elsewhere."""
    src = Image.new("RGB", (40, 20), GREEN)
    src.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(src, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_rotates_clockwise():
    img = decode(oriented_jpeg(6), "o6.jpg")
    assert img.size == (20, 40) and describe(img) == ImageInfo("JPEG", 20, 40)
    assert close(img.getpixel((15, 4)), RED)  # stored top-left -> displayed top-right
    assert close(img.getpixel((4, 4)), GREEN) and close(img.getpixel((15, 35)), GREEN)


def test_exif_orientation_8_rotates_counter_clockwise():
    img = decode(oriented_jpeg(8), "o8.jpg")
    assert img.size == (20, 40)
    assert close(img.getpixel((4, 35)), RED)  # stored top-left -> displayed bottom-left
    assert close(img.getpixel((4, 4)), GREEN) and close(img.getpixel((15, 35)), GREEN)


def test_exif_orientation_1_untouched():
    img = decode(oriented_jpeg(1), "o1.jpg")
    assert img.size == (40, 20) and close(img.getpixel((4, 4)), RED)


def frames(colours, size=(12, 8)):
    return [Image.new("RGB", size, c) for c in colours]


def test_animated_gif_first_frame():
    first, *rest = frames([RED, GREEN, BLUE])
    data = encode(first, "GIF", save_all=True, append_images=rest, duration=50, loop=0)
    probe = Image.open(io.BytesIO(data))
    assert probe.n_frames == 3
    img = decode(data, "anim.gif")
    assert img.format == "GIF" and img.getpixel((5, 5)) == RED


def test_animated_webp_first_frame():
    first, *rest = frames([BLUE, RED, GREEN])
    data = encode(first, "WEBP", save_all=True, append_images=rest, duration=50, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = decode(data, "anim.webp")
    assert img.format == "WEBP" and img.getpixel((5, 5)) == BLUE


def test_apng_first_frame():
    first, *rest = frames([GREEN, RED])
    data = encode(first, "PNG", save_all=True, append_images=rest, duration=50)
    assert b"acTL" in data
    img = decode(data, "anim.png")
    assert img.format == "PNG" and img.getpixel((5, 5)) == GREEN


# --- failures ---------------------------------------------------------------------------


def test_empty():
    expect_error(b"", "empty")


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>\n",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10" fill="red"/></svg>\n',
        b"just some text\n",
        b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS is refused (Ghostscript)
    ],
    ids=["html", "svg", "text", "pdf", "eps"],
)
def test_not_an_image(data):
    expect_error(data, "not-an-image")


def test_random_bytes():
    rng = np.random.default_rng(1234)
    for _ in range(20):
        expect_error(rng.bytes(int(rng.integers(1, 4000))), "not-an-image")


def test_truncated_jpeg():
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr), "JPEG")
    err = expect_error(data[: len(data) // 2], "truncated")
    assert "JPEG" in err.problem


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_truncated_other_formats(fmt):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr), fmt)
    expect_error(data[: len(data) * 2 // 3], "truncated")


def test_corrupt_data_is_undecodable():
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(arr), "PNG"))
    data[60:80] = b"\x00" * 20  # inside the IDAT stream: CRC and deflate both break
    expect_error(bytes(data), "undecodable")


def test_broken_header_with_known_signature_is_undecodable():
    err = expect_error(b"GIF89a\x00", "undecodable")
    assert "GIF" in err.problem


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's TIFF plugin warns about corrupt tags
def test_damaged_files_only_raise_image_error():
    """Every prefix and some byte flips of real files: decoded, or an ImageError -- nothing else."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for fmt in ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]:
        data = encode(Image.fromarray(arr), fmt)
        for n in np.linspace(1, len(data) - 1, 25).astype(int):
            try:
                decode(data[:n], fmt)
            except ImageError as exc:
                assert exc.reason in REASONS
        for _ in range(10):
            flipped = bytearray(data)
            flipped[int(rng.integers(0, len(data)))] ^= 0xFF
            try:
                decode(bytes(flipped), fmt)
            except ImageError as exc:
                assert exc.reason in REASONS


def test_decompression_bomb_png_rejected_before_decoding():
    data = png_declaring(30000, 30000)
    assert len(data) < 200
    err = expect_error(data, "too-large")
    assert "30000" in err.problem or "pixels" in err.problem


def test_declared_size_between_pil_limits_rejected_by_our_check():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        err = expect_error(png_declaring(10000, 10000), "too-large")
    assert "10000x10000" in err.problem
    assert Image.MAX_IMAGE_PIXELS == before  # no global state touched


def test_max_pixels_argument():
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    expect_error(data, "too-large", max_pixels=399)
    assert decode(data, "ok.png", max_pixels=400).size == (20, 20)
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_decompression_bomb_warning_as_error_is_too_large():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        expect_error(png_declaring(10000, 10000), "too-large", max_pixels=10**9)


# --- files ------------------------------------------------------------------------------


def test_open_path_judges_content_not_extension(tmp_path):
    path = tmp_path / "really-a-png.jpg"
    Image.new("RGB", (7, 5), BLUE).save(path, "PNG")
    img = open_path(path)
    assert img.format == "PNG" and img.size == (7, 5) and img.getpixel((3, 3)) == BLUE
    assert open_path(str(path)).format == "PNG"


def test_open_path_html_with_image_extension(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("<html><body>moved</body></html>")
    with pytest.raises(ImageError) as info:
        open_path(path)
    assert info.value.reason == "not-an-image" and info.value.source == str(path)


def test_open_path_missing_and_directory(tmp_path):
    for path in (tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageError) as info:
            open_path(path)
        assert info.value.reason == "unreadable"
        assert info.value.source == str(path)


def test_open_path_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        open_path(path)
    assert info.value.reason == "empty"


def test_bytes_like_input():
    data = encode(Image.new("RGB", (3, 3), RED), "PNG")
    assert decode(bytearray(data), "b").getpixel((1, 1)) == RED
    assert decode(memoryview(data), "m").getpixel((1, 1)) == RED


# ---------------------------------------------------------------- issue 10: memory of 16-bit and float images


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_images_convert_without_full_size_64_bit_copies(mode):
    """A 9-megapixel 16-bit, 32-bit integer or float image: the conversion's NumPy allocations stay under
    3 bytes per pixel (before: full-size int64/float64 copies, 17+ bytes per pixel; at the pixel limit that
    was gigabytes)."""
    import tracemalloc

    w, h = 3000, 3000
    if mode == "F":
        arr = np.random.default_rng(0).uniform(-10, 300, (h, w)).astype(np.float32)
        img = Image.fromarray(arr, "F")
        want = np.floor(np.clip(arr[:5, :5].astype(np.float64), 0, 255) + 0.5)
    else:
        arr = (np.arange(w * h, dtype=np.int64) * 7 % 70000).reshape(h, w)
        img = Image.fromarray(arr.astype(np.uint16 if mode == "I;16" else np.int32))
        if mode == "I;16":
            arr = arr.astype(np.uint16)
        want = (np.clip(arr[:5, :5], 0, 65535) + 128) // 257
    assert img.mode == mode
    img.load()
    tracemalloc.start()
    try:
        out = to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and out.size == (w, h)
    assert np.array_equal(np.asarray(out)[:5, :5, 0], want)
    assert peak < 3 * w * h, f"{peak / 1e6:.0f} MB for {w * h / 1e6:.0f} megapixels"
