"""Gemma 4 image preprocessing in numpy/Pillow: load, resize to the token budget, rescale, patchify, positions.

Matches ``transformers``' ``Gemma4ImageProcessorPil`` (image_processing_pil_gemma4.py) bit for bit on 8-bit RGB:

1. Convert to RGB: an image with transparency is composited onto white, anything else uses Pillow's
   ``convert("RGB")`` (grayscale, palette, CMYK ...). 16-bit and 32-bit grayscale (``I;16``, ``I``, ``F``), which
   Pillow would clip to 255, are first scaled to 8 bits (the reference does not handle them).
2. Aspect-preserving bicubic resize (Pillow ``BICUBIC``) to the largest size with both sides multiples of
   48 = patch 16 x pooling 3 whose patch count fits ``max_soft_tokens * 9``. Small images are upscaled.
3. Rescale to [0, 1] (``uint8 * (1/255)`` in float64, then float32); no mean/std normalisation.
4. Patchify into (num_patches, 16*16*3) in (row-in-patch, col-in-patch, channel) order, patches row-major;
   positions are (x=column, y=row) of each patch. Pad to ``max_soft_tokens * 9`` patches with zero pixels and
   position (-1, -1).

Each image becomes ``num_patches / 9`` soft tokens (3x3 pooling in the vision encoder).
:func:`load_image` applies the EXIF orientation of a file, as ``transformers.image_utils.load_image`` does.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "ImageError",
    "ImagePatches",
    "PATCH_SIZE",
    "POOLING_KERNEL",
    "SUPPORTED_SOFT_TOKENS",
    "load_image",
    "num_image_tokens",
    "preprocess",
    "target_size",
    "to_rgb",
]

PATCH_SIZE = 16
POOLING_KERNEL = 3
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280


class ImageError(ValueError):
    """An image cannot be read or processed; the message names the file or the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePatches:
    """One image ready for the vision encoder."""

    pixel_values: np.ndarray  # (max_patches, 768) float32 in [0, 1], zero rows past num_patches
    position_ids: np.ndarray  # (max_patches, 2) int64 (x, y), (-1, -1) for padding
    num_soft_tokens: int  # num_patches / 9
    size: tuple[int, int]  # (height, width) after resizing


def load_image(source) -> Image.Image:
    """A Pillow image from a path, bytes or a Pillow image, with EXIF orientation applied and pixels loaded."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        name, opener = "image bytes", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: image file is empty (0 bytes)")
        name, opener = str(path), path
    else:
        raise ImageError(f"load_image: expected a path, bytes or PIL.Image, found {type(source).__name__}")
    try:
        image = Image.open(opener)
        image.load()
    except Image.DecompressionBombError as e:  # Pillow's guard against decompression bombs (not an OSError)
        raise ImageError(f"{name}: the image is too large to read safely (at most {Image.MAX_IMAGE_PIXELS:,} "
                         f"pixels; {e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # a broken EXIF block should not hide the picture
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return image


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` grayscale -> ``L`` by scaling the full range of the mode to 0..255."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 65535.0
    elif image.mode == "I":
        # 32-bit containers usually hold 16-bit data (PNG 16-bit opens as I or I;16 depending on Pillow)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        scaled = array.astype(np.float64) / top
    else:  # "F": floats, assumed in [0, 1]
        scaled = array.astype(np.float64)
    return Image.fromarray(np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image as the reference converts it (transparency composited onto white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_8bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ImageError(f"max_soft_tokens: expected one of {SUPPORTED_SOFT_TOKENS}, found {max_soft_tokens!r}")


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> tuple[int, int]:
    """(height, width) after the aspect-preserving resize (``get_aspect_ratio_preserving_size`` of the reference)."""
    _check_budget(max_soft_tokens)
    if height <= 0 or width <= 0:
        raise ImageError(f"image size: expected positive height and width, found {height}x{width}")
    max_patches = max_soft_tokens * POOLING_KERNEL**2
    target_px = max_patches * PATCH_SIZE**2
    factor = math.sqrt(target_px / (height * width))
    side = POOLING_KERNEL * PATCH_SIZE
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    max_side = (max_patches // POOLING_KERNEL**2) * side
    if th == 0 and tw == 0:  # pragma: no cover - impossible for positive sizes (factor keeps the area)
        raise ImageError(f"image size {height}x{width}: resizes to 0x0")
    if th == 0:  # extreme panorama: one row of 48 px
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:  # extreme portrait
        tw, th = side, min(int(math.floor(height / width)) * side, max_side)
    if th * tw > target_px:  # pragma: no cover - guarded by the reference, unreachable with the rules above
        raise ImageError(f"image size {height}x{width}: resizing to {th}x{tw} exceeds {max_patches} patches")
    return th, tw


def num_image_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> int:
    """Soft tokens an image of this size becomes: (H/16)(W/16)/9 after resizing."""
    th, tw = target_size(height, width, max_soft_tokens)
    return (th // PATCH_SIZE) * (tw // PATCH_SIZE) // POOLING_KERNEL**2


def preprocess(image, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> ImagePatches:
    """Pixel patches and positions of one image (path, bytes or Pillow image) for the vision encoder."""
    _check_budget(max_soft_tokens)
    rgb = to_rgb(load_image(image))
    width, height = rgb.size
    th, tw = target_size(height, width, max_soft_tokens)
    if (th, tw) != (height, width):
        rgb = rgb.resize((tw, th), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)

    ph, pw = th // PATCH_SIZE, tw // PATCH_SIZE
    patches = pixels.reshape(ph, PATCH_SIZE, pw, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(ph * pw, PATCH_SIZE * PATCH_SIZE * 3)  # (num_patches, 768)
    grid_x, grid_y = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(ph * pw, 2).astype(np.int64)  # (num_patches, 2)

    max_patches = max_soft_tokens * POOLING_KERNEL**2
    pixel_values = np.zeros((max_patches, patches.shape[1]), np.float32)
    pixel_values[: len(patches)] = patches
    position_ids = np.full((max_patches, 2), -1, np.int64)
    position_ids[: len(patches)] = positions
    return ImagePatches(
        pixel_values=pixel_values,
        position_ids=position_ids,
        num_soft_tokens=(ph * pw) // POOLING_KERNEL**2,
        size=(th, tw),
    )
