"""Load any image file as an (H, W, 3) uint8 RGB array — the one pixel format every reader and model sees.

Real data sets are messier than the scenes generator: grayscale scans, palette PNGs, RGBA screenshots, 16-bit
medical or depth images. Rather than let each caller guess, everything is brought to 8-bit RGB here:

- grayscale (``L``, ``1``) and other colour spaces (``CMYK``, ``YCbCr``, ...) convert to RGB the way PIL does;
- palette images (``P``) are expanded through their palette;
- images with transparency (``RGBA``, ``LA``, ``PA``, palette + transparency) are **composited on black**
  (each channel multiplied by alpha / 255). Dropping the alpha channel instead would expose whatever colour the
  authoring tool left under fully transparent pixels, which is arbitrary; black is at least the same every time;
- 16-bit and 32-bit integer images (``I;16*``, ``I``) are read as 0..65535 and scaled to 0..255 (divide by 257,
  so 65535 -> 255 exactly); float images (``F``) are taken as 0..1 when no value exceeds 1, else as 0..255.

Pixels are returned as stored: EXIF orientation is *not* applied, because COCO's annotations refer to the stored
pixel grid too. Multi-frame files (GIF, TIFF stacks) give their first frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from detseg.errors import DataError

_HIGH_BIT_INTEGER_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_rgb(path: str | Path, image_id=None) -> np.ndarray:
    """Read ``path`` as an (H, W, 3) uint8 RGB array.

    Raises :class:`DataError` naming the file (and ``image_id`` when given) if it is missing, not an image, or
    truncated/corrupt.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise DataError(path, f"image file {what}", image_id=image_id)
    try:
        with Image.open(path) as image:
            image.load()  # decode now, inside the try: truncated data only shows up here
            return _to_rgb_array(image)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(path, f"image too large to decode safely: {error}", image_id=image_id) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # UnidentifiedImageError (not an image) and "image file is truncated" are both OSErrors.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(path, f"cannot read image: {reason}", image_id=image_id) from None


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Bring one decoded PIL image of any mode to (H, W, 3) uint8, following the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in _HIGH_BIT_INTEGER_MODES:
        gray = np.asarray(image).astype(np.float64)
        gray = np.clip(gray, 0, 65535) / 257.0
        return _gray_to_rgb(gray)
    if mode == "F":
        gray = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if gray.size and gray.max() <= 1.0:
            gray = gray * 255.0
        return _gray_to_rgb(np.clip(gray, 0, 255))
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.round(rgb).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) float in 0..255 -> (H, W, 3) uint8, rounding to nearest."""
    gray8 = np.round(gray).astype(np.uint8)
    return np.repeat(gray8[..., None], 3, axis=2)
