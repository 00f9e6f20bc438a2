"""Pictures in and out of a generation: init images and inpainting masks checked and converted to float arrays,
decoded pixels converted to PIL images. Host-side NumPy + Pillow only.

Accepted inputs: a PIL image, a path, or a NumPy array ((H, W, 3) RGB for images, (H, W) for masks) as uint8
0..255, bool, or float 0..1. Sizes must match the request exactly; nothing is resized behind the caller's back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def init_image_pixels(image, height: int, width: int, n: int) -> np.ndarray:
    """An RGB init image of exactly (width, height) -> float32 (n, 3, H, W) in [0, 1]."""
    from PIL import Image

    image = _open(image, "init image", height, width)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an init image array must be (height, width, 3) RGB, got shape {image.shape}")
        pixels = _unit_range(image, "init image")
    elif isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"init image must be RGB, got mode {image.mode!r}; convert it with image.convert('RGB')")
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    else:
        raise TypeError(f"image must be a PIL image, a path or a NumPy array, got {type(image).__name__}")
    _check_size(pixels.shape, height, width, "init image")
    pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(pixels, (n, *pixels.shape)))


def inpainting_mask(mask, height: int, width: int) -> np.ndarray:
    """An inpainting mask of exactly (width, height) -> float32 (1, 1, H, W) of 0 (keep) and 1 (repaint).

    As diffusers: greyscale in [0, 1], binarised at 0.5 (RGB is converted to luminance first).
    """
    from PIL import Image

    mask = _open(mask, "mask image", height, width)
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[:, :, 0]
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be (height, width) greyscale, got shape {mask.shape}")
        values = _unit_range(mask, "mask image")
    elif isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1", "RGB"):
            raise ValueError(f"mask image must be greyscale (mode 'L' or '1') or RGB, got mode {mask.mode!r}; "
                             f"convert it with mask.convert('L') (white = repaint, black = keep)")
        values = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        raise TypeError(f"mask_image must be a PIL image, a path or a NumPy array, got {type(mask).__name__}")
    _check_size(values.shape, height, width, "mask image")
    return (values >= 0.5).astype(np.float32)[None, None]


def latent_mask(mask: np.ndarray) -> np.ndarray:
    """The pixel mask at latent size: nearest neighbour, i.e. every 8th pixel (torch's interpolate, diffusers)."""
    return np.ascontiguousarray(mask[:, :, ::8, ::8])


def _open(image, what: str, height: int, width: int):
    """Open a path, checking the size in its header before decoding: a small file can decode to GBs of pixels."""
    from PIL import Image

    if not isinstance(image, (str, Path)):
        return image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            opened = Image.open(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read {what} {image}: {exc}") from None
    width_got, height_got = opened.size
    _check_size((height_got, width_got), height, width, what)
    try:
        opened.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read {what} {image}: {exc}") from None
    return opened


def _unit_range(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 (0..255), bool, or float in [0, 1] -> float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{what} array must be uint8 (0..255), bool, or float (0..1), got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
        raise ValueError(f"{what} float array must hold values in [0, 1]; scale uint8 data by 1/255 or pass uint8")
    return array


def _check_size(shape: tuple[int, ...], height: int, width: int, what: str) -> None:
    got_h, got_w = shape[:2]
    if (got_h, got_w) != (height, width):
        raise ValueError(f"{what} is {got_w}x{got_h} but the requested size is {width}x{height}; "
                         f"pass width={got_w}, height={got_h} or resize it to {width}x{height}")


def to_pil(pixels: np.ndarray) -> list:
    """(N, 3, H, W) pixels in [0, 1] -> N RGB PIL images (rounded to 8 bits)."""
    from PIL import Image

    array = (pixels.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]
