"""Image preprocessing: parity with transformers' Gemma4ImageProcessorPil for every budget and several aspect ratios,
image modes, EXIF orientation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_gemma import image
from edge_gemma.image import ImageError


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("transformers")
    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    return {budget: Gemma4ImageProcessorPil(max_soft_tokens=budget) for budget in image.SUPPORTED_SOFT_TOKENS}


def _noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2, "CMYK": 4}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    # smooth-ish content so that resampling is exercised on realistic gradients, plus noise
    base = rng.integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(base, mode)


def _compare(ours: image.ImagePatches, ref_out, i=0):
    n = ours.num_soft_tokens
    assert n == int(ref_out["num_soft_tokens_per_image"][i])
    ref_pix = np.asarray(ref_out["pixel_values"][i])
    ref_pos = np.asarray(ref_out["image_position_ids"][i])
    assert ours.pixel_values.shape == ref_pix.shape and ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.position_ids, ref_pos)
    np.testing.assert_allclose(ours.pixel_values, ref_pix, atol=1 / 255, rtol=0)  # the brief's tolerance
    assert np.array_equal(ours.pixel_values, ref_pix)  # and in fact bit-exact: same Pillow resize, same rescale


SIZES = {
    "tiny": (5, 7),
    "vga": (640, 480),
    "square": (224, 224),
    "hd_panorama": (1920, 1080),
    "panoramic": (2000, 100),
    "extreme_panorama": (3000, 20),
    "portrait": (300, 900),
    "extreme_portrait": (16, 1500),
}


@pytest.mark.parametrize("budget", image.SUPPORTED_SOFT_TOKENS)
@pytest.mark.parametrize("name", list(SIZES))
def test_matches_reference(ref, budget, name):
    w, h = SIZES[name]
    img = _noise(w, h, seed=w + h)
    ours = image.preprocess(img, max_soft_tokens=budget)
    _compare(ours, ref[budget](img, return_tensors="np"))
    assert ours.num_soft_tokens == image.num_image_tokens(h, w, budget) <= budget


def test_known_sizes():
    # gemma4-architecture.md section 6, measured with the reference at budget 280
    assert image.target_size(480, 640) == (672, 912) and image.num_image_tokens(480, 640) == 266
    assert image.target_size(224, 224) == (768, 768) and image.num_image_tokens(224, 224) == 256
    assert image.target_size(1080, 1920) == (576, 1056) and image.num_image_tokens(1080, 1920) == 264


def test_patch_layout():
    """Patch k holds pixels (row-in-patch, col-in-patch, channel) of grid cell (y, x) = divmod(k, W/16)."""
    img = _noise(96, 48, seed=3)
    out = image.preprocess(img, max_soft_tokens=70)
    th, tw = out.size
    assert (th, tw) == (240, 528)  # sqrt(630 * 256 / (96 * 48)) * (48, 96), floored to multiples of 48
    pixels = np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC), np.float64) / 255
    k = 7
    x, y = out.position_ids[k]
    patch = pixels[16 * y:16 * y + 16, 16 * x:16 * x + 16, :].reshape(-1)
    np.testing.assert_allclose(out.pixel_values[k], patch, atol=1e-7)
    n = out.num_soft_tokens * 9
    assert (out.position_ids[n:] == -1).all() and not out.pixel_values[n:].any()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "P_transparent"])
def test_image_modes_match_reference(ref, mode):
    if mode.startswith("P"):
        img = _noise(120, 80, seed=5).quantize(colors=16)
        if mode == "P_transparent":
            img.info["transparency"] = 3
    else:
        img = _noise(120, 80, seed=6, mode=mode)
    _compare(image.preprocess(img, 140), ref[140](img, return_tensors="np"))


def test_sixteen_bit_grayscale():
    """A 16-bit image equals the 8-bit image it scales down to (the reference would clip it to white)."""
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # mode I;16
    assert sixteen.mode == "I;16"
    a = image.preprocess(sixteen, 70)
    b = image.preprocess(Image.fromarray(eight, "L"), 70)
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
    as_i = Image.fromarray(eight.astype(np.int32) * 257, "I")
    np.testing.assert_array_equal(image.preprocess(as_i, 70).pixel_values, b.pixel_values)


def test_exif_orientation(tmp_path):
    img = _noise(90, 30, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = image.load_image(path)
    assert loaded.size == (30, 90)  # upright: portrait
    out = image.preprocess(path, 70)
    assert out.size[0] > out.size[1]  # height > width after resize
    np.testing.assert_array_equal(out.pixel_values, image.preprocess(loaded, 70).pixel_values)


def test_bytes_and_paths_agree(tmp_path):
    img = _noise(50, 40, seed=9)
    path = tmp_path / "x.png"
    img.save(path)
    a = image.preprocess(path, 70)
    b = image.preprocess(path.read_bytes(), 70)
    c = image.preprocess(img, 70)
    np.testing.assert_array_equal(a.pixel_values, c.pixel_values)
    np.testing.assert_array_equal(b.pixel_values, c.pixel_values)


def test_bad_images(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: image file is empty"):
        image.preprocess(empty)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(ImageError, match=r"corrupt\.jpg: not a readable image"):
        image.preprocess(corrupt)
    truncated = tmp_path / "truncated.png"
    _noise(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ImageError, match=r"truncated\.png: not a readable image"):
        image.preprocess(truncated)
    with pytest.raises(ImageError, match="no such image file"):
        image.preprocess(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"max_soft_tokens: expected one of \(70, 140, 280, 560, 1120\), found 300"):
        image.preprocess(_noise(10, 10), max_soft_tokens=300)
    with pytest.raises(ImageError, match="expected a path, bytes or PIL.Image"):
        image.preprocess(12345)


def test_a_decompression_bomb_is_a_clear_error_stating_the_limit(tmp_path):
    """A 20000 x 20000 PNG (a few hundred KB on disk, 400 M pixels): Pillow's bomb guard, as an ImageError naming
    the file and the pixel limit, not a DecompressionBombError traceback."""
    import io

    from PIL import Image

    from edge_gemma.image import ImageError, load_image

    path = tmp_path / "huge.png"
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match=r"huge.png: the image is too large to read safely \(at most [\d,]+ pixels"):
        load_image(path)
