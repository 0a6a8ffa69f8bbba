"""retrieval.preprocess: output shapes, exact normalisation, exact crops, transformers parity."""

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ConfigError
from retrieval.preprocess import MAX_ASPECT, MEAN, ROUTES, STD, output_shape, preprocess, to_batch

SIZES = [(498, 415), (421, 499), (224, 224), (1000, 300), (50, 30), (1, 1), (20000, 20), (300, 1000), (257, 230)]

# (width, height) -> (H, W) of "resize-short" at 224, worked out by hand from the documented rule
RESIZE_SHORT_224 = {
    (498, 415): (224, 266),  # 498 * 224 / 415 = 268.8 -> 19.2 patches -> 266
    (421, 499): (266, 224),  # 499 * 224 / 421 = 265.5 -> 18.96 patches -> 266
    (224, 224): (224, 224),
    (1000, 300): (224, 742),  # 746.7 -> 53.3 patches -> 742
    (50, 30): (224, 378),  # 373.3 -> 26.7 patches -> 378
    (1, 1): (224, 224),
    (20000, 20): (14, 896),  # aspect 1000 > 4: long side capped at 896, short 0.9 -> 14
    (300, 1000): (742, 224),  # aspect 3.33 <= 4: 746.7 -> 53.3 patches -> 742
    (257, 230): (224, 252),  # 250.3 -> 17.9 patches -> 252
}


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient(width, height):
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    arr = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(np.round(arr).astype(np.uint8))


def normalised(arr_hwc):
    """The documented normalisation, in float64, rounded once to float32."""
    x = arr_hwc.astype(np.float64) / 255.0
    return ((x - np.array(MEAN)) / np.array(STD)).astype(np.float32).transpose(2, 0, 1)


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("width, height", SIZES)
def test_output_shape_and_dtype(route, width, height):
    img = noise(width, height)
    out = preprocess(img, route)
    expected = RESIZE_SHORT_224[(width, height)] if route == "resize-short" else (224, 224)
    assert output_shape(width, height, route) == expected
    assert out.shape == (3, *expected)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert out.shape[1] % 14 == 0 and out.shape[2] % 14 == 0
    assert np.isfinite(out).all()


@pytest.mark.parametrize("size", [14, 112, 448, 518])
@pytest.mark.parametrize("width, height", [(498, 415), (50, 30), (1000, 300), (3, 2000)])
def test_other_sizes(size, width, height):
    for route in ROUTES:
        shape = output_shape(width, height, route, size)
        assert shape[0] % 14 == 0 and shape[1] % 14 == 0
        assert preprocess(noise(width, height), route, size).shape == (3, *shape)
        if route != "resize-short":
            assert shape == (size, size)
    h, w = output_shape(width, height, "resize-short", size)
    assert max(h, w) <= MAX_ASPECT * size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        assert min(h, w) == size


def test_resize_short_keeps_orientation_and_caps_panoramas():
    assert output_shape(100000, 10, "resize-short") == (14, 896)
    assert output_shape(10, 100000, "resize-short") == (896, 14)
    assert output_shape(4000, 1000, "resize-short") == (224, 896)  # exactly at the cap
    assert output_shape(5000, 1000, "resize-short") == (182, 896)  # 179.2 -> 12.8 patches -> 182
    out = preprocess(noise(100000, 10), "resize-short")
    assert out.shape == (3, 14, 896)


def test_resize_short_is_one_pil_bicubic_resize():
    img = noise(498, 415, seed=3)
    expected = normalised(np.asarray(img.resize((266, 224), Image.BICUBIC)))
    np.testing.assert_array_equal(preprocess(img, "resize-short"), expected)


def test_output_shape_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        output_shape(10, 10, "bilinear")
    for size in (0, 13, 225, -14, 224.0, True):
        with pytest.raises(ConfigError):
            output_shape(10, 10, "center-crop", size)
    with pytest.raises(ConfigError):
        preprocess(noise(4, 4), "nope")
    with pytest.raises(ValueError):
        output_shape(0, 10, "resize-short")


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 64, 200), (17, 93, 250)])
@pytest.mark.parametrize("route", ["resize-short", "center-crop"])
def test_flat_colour_normalisation_is_exact(route, colour):
    out = preprocess(Image.new("RGB", (300, 260), colour), route)
    v = np.array(colour, dtype=np.float64)
    expected = ((v / 255 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    for c in range(3):
        assert (out[c] == expected[c]).all()


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 64, 200)])
def test_flat_colour_hf_within_one_ulp(colour):
    out = preprocess(Image.new("RGB", (300, 260), colour), "hf")
    expected = (np.array(colour) / 255 - np.array(MEAN)) / np.array(STD)
    for c in range(3):
        assert np.abs(out[c] - expected[c]).max() <= 1e-6


@pytest.mark.parametrize("width, height", [(498, 415), (421, 499), (300, 257), (225, 225), (224, 500)])
def test_center_crop_is_the_exact_central_pixels(width, height):
    img = noise(width, height, seed=width)
    left, top = (width - 224) // 2, (height - 224) // 2
    crop = np.asarray(img)[top : top + 224, left : left + 224]
    np.testing.assert_array_equal(preprocess(img, "center-crop"), normalised(crop))


def test_center_crop_of_small_image_resizes_short_side_first():
    img = noise(100, 50, seed=5)
    resized = np.asarray(img.resize((448, 224), Image.BICUBIC))
    np.testing.assert_array_equal(preprocess(img, "center-crop"), normalised(resized[:, 112:336]))
    # one side large enough, the other not: still resized (short side 120 -> 224)
    img = noise(600, 120, seed=6)
    resized = np.asarray(img.resize((1120, 224), Image.BICUBIC))
    np.testing.assert_array_equal(preprocess(img, "center-crop"), normalised(resized[:, 448:672]))


def test_extreme_aspect_center_crop_does_not_build_giant_intermediate():
    out = preprocess(gradient(3, 30000), "center-crop")  # full resize would be 224 x 2.24M
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    out = preprocess(gradient(30000, 2), "hf")
    assert out.shape == (3, 224, 224)


def test_non_rgb_input_is_converted():
    grey = Image.new("L", (230, 230), 100)
    out = preprocess(grey, "center-crop")
    np.testing.assert_array_equal(out, preprocess(Image.new("RGB", (230, 230), (100,) * 3), "center-crop"))
    rgba = Image.new("RGBA", (230, 230), (0, 0, 0, 0))
    np.testing.assert_array_equal(preprocess(rgba, "hf"), preprocess(Image.new("RGB", (230, 230), (255,) * 3), "hf"))


def test_tiny_image_every_route():
    img = Image.new("RGB", (1, 1), (10, 200, 30))
    for route in ROUTES:
        out = preprocess(img, route)
        assert out.shape == (3, 224, 224)
        assert np.allclose(out, out[:, :1, :1], atol=1e-6)  # still a flat colour


# --- batches ----------------------------------------------------------------------------


def test_to_batch():
    arrays = [preprocess(noise(498, 415, seed=s), "resize-short") for s in range(3)]
    batch = to_batch(arrays)
    assert batch.shape == (3, 3, 224, 266) and batch.dtype == np.float32 and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch[1], arrays[1])
    assert to_batch(a.astype(np.float64) for a in arrays).dtype == np.float32
    with pytest.raises(ValueError):
        to_batch([arrays[0], preprocess(noise(50, 30), "resize-short")])
    with pytest.raises(ValueError):
        to_batch([])


def test_output_shape_groups_without_decoding():
    shapes = {}
    for w, h in [(498, 415), (500, 417), (421, 499), (224, 224)]:
        shapes.setdefault(output_shape(w, h, "resize-short"), []).append(preprocess(noise(w, h), "resize-short"))
    assert sorted(shapes) == [(224, 224), (224, 266), (266, 224)]
    assert to_batch(shapes[(224, 266)]).shape == (2, 3, 224, 266)


# --- transformers parity ----------------------------------------------------------------


def hf_processor(size=224):
    transformers = pytest.importorskip("transformers")
    # transformers 5: BitImageProcessorPil is the PIL backend (BitImageProcessor needs torchvision);
    # transformers 4: BitImageProcessor is the PIL ("slow") processor.
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    resize = 256 if size == 224 else round(size * 256 / 224)
    # the settings of facebook/dinov2-*'s preprocessor_config.json, built locally (no hub)
    return cls(
        do_resize=True,
        size={"shortest_edge": resize},
        resample=3,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=0.00392156862745098,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


HF_IMAGES = [
    ("noise", 498, 415),
    ("noise", 421, 499),
    ("noise", 224, 224),
    ("noise", 256, 256),
    ("gradient", 1000, 300),
    ("gradient", 50, 30),
    ("noise", 1, 1),
    ("gradient", 3, 700),
    ("noise", 257, 1000),
    ("gradient", 640, 480),
    ("noise", 255, 255),
]


@pytest.mark.parametrize("kind, width, height", HF_IMAGES)
def test_hf_route_matches_transformers(kind, width, height):
    proc = hf_processor()
    img = noise(width, height, seed=width + height) if kind == "noise" else gradient(width, height)
    ref = proc(img, return_tensors="np")["pixel_values"][0]
    ours = preprocess(img, "hf")
    assert ours.shape == ref.shape == (3, 224, 224)
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("size", [112, 448])
def test_hf_route_other_sizes_match_transformers(size):
    proc = hf_processor(size)
    img = noise(333, 517, seed=size)
    ref = proc(img, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(img, "hf", size) - ref).max() <= 1e-6
