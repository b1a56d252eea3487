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

Size. An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 million, e.g. 12,000 x 7,500; PIL's own
decompression-bomb threshold, which a user may raise) is refused with a DataError from its header alone, before
anything is decoded: decoding it would take gigabytes, and a corrupt or hostile header can claim any size.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from detseg.errors import DataError, error_reason

_HIGH_BIT_INTEGER_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# PIL warns on stderr about damage it works around (corrupt EXIF, odd chunks) and on opening an image above its
# size limit. detseg reads such a file or refuses it with its own DataError naming it (check_pixel_count), so the
# warnings would only break the CLI's promise of one line per problem.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# What PIL raises on corrupt or non-image files: UnidentifiedImageError and "image file is truncated" are OSErrors;
# some format plugins fail on garbage headers with the others.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_pixel_count(file, width: int, height: int, image_id=None) -> None:
    """A DataError (naming ``file``) for an image of more pixels than PIL's limit (see the module docstring)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise DataError(file, f"image of {width}x{height} = {width * height:,} pixels is too large to decode safely "
                        f"(PIL.Image.MAX_IMAGE_PIXELS = {limit:,})", image_id=image_id)


def first_file(candidates) -> Path | None:
    """The first of ``candidates`` that is a file, or None. A name the OS refuses to look up (longer than 255
    bytes, say: a json's file_name can be anything) is no file rather than an OSError."""
    for candidate in candidates:
        try:
            if Path(candidate).is_file():
                return Path(candidate)
        except OSError:
            continue
    return None


def read_image_size(path: str | Path, image_id=None) -> tuple[int, int]:
    """(width, height) from the header of image file ``path`` (a few bytes read); a DataError naming the file if it
    is not an image PIL can read, or too large to decode."""
    try:
        with Image.open(path) as image:
            size = image.size
    except _READ_ERRORS as error:
        raise DataError(path, f"cannot read image header: {error_reason(error)}", image_id=image_id) from None
    check_pixel_count(path, *size, image_id=image_id)
    return size


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
            check_pixel_count(path, *image.size, image_id=image_id)
            image.load()  # decode now, inside the try: truncated data only shows up here
            return _to_rgb_array(image)
    except DataError:
        raise
    except _READ_ERRORS as error:
        raise DataError(path, f"cannot read image: {error_reason(error)}", image_id=image_id) from None


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
        rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4) uint8
        # round(c * alpha / 255) in 16-bit integers, not float64 (4x the memory): c * alpha + 127 <= 65152, and
        # c * alpha / 255 is never exactly halfway (that would need 2 * c * alpha, even, = 255 * odd).
        return ((rgba[..., :3] * rgba[..., 3:].astype(np.uint16) + 127) // 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) float in 0..255 -> (H, W, 3) uint8, rounding to nearest."""
    gray8 = np.round(gray).astype(np.uint8)
    return np.repeat(gray8[..., None], 3, axis=2)
