"""Reading photos into one convention: RGB uint8 ``H x W x 3`` numpy arrays, upright.

:func:`load_image` (files) and :func:`decode_image` (encoded bytes, e.g. a tar member) are
the one photo reader of the pack: prepare, the trainer's datasets, the MultiID-2M stream
and its references, the landmark pass and the benchmark runner all read through them, so
they all see the same pixels a photo viewer (and ComfyUI's LoadImage) shows:

- the EXIF orientation is applied (a phone photo stored sideways with orientation 6 is
  returned upright, 640 x 480, and boxes found on it are upright boxes);
- every Pillow mode becomes RGB: grey (L, LA, 1), 16-bit (I;16*, I), palette (P, with or
  without transparency), CMYK, YCbCr, RGBA; alpha is dropped (the colour under it is kept,
  as ComfyUI's LoadImage keeps it);
- a photo above ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) is refused from its
  header, before any pixel is decoded, with :class:`ImageTooLargeError` naming it and the
  limit; Pillow's own decompression-bomb guard is replaced by this limit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# 150 megapixels (e.g. 12000 x 12500): far above any camera photo, below what would exhaust memory
DEFAULT_MAX_PIXELS = 150_000_000
EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # the transposes and the 90/270 degree rotations
_PILLOW_LIMIT = threading.Lock()


class ImageReadError(ValueError):
    """An image that cannot be read; the message names it and says what to do."""


class ImageTooLargeError(ImageReadError):
    """An image above the pixel limit (a decompression bomb or a huge scan); nothing was decoded."""


def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Grayscale, RGBA, 16-bit and float ([0, 1]) arrays -> RGB uint8."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageReadError(f"{name}: expected an H x W (x channels) image, got shape {arr.shape}")
    if arr.shape[-1] in (2, 4):  # drop alpha (grey+alpha or RGBA); faces are read from the colour
        logger.debug("%s: alpha channel ignored", name)
        arr = arr[..., :-1]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray((arr.astype(np.float32) / 257.0).round().astype(np.uint8))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{name} contains NaN or infinite pixels")
        return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):  # e.g. PIL's 32-bit "I" mode holding 16-bit data
        wide = arr.size and int(arr.max()) > 255
        scaled = arr.astype(np.float32) / (257.0 if wide else 1.0)
        return np.ascontiguousarray(scaled.round().clip(0, 255).astype(np.uint8))
    raise ImageReadError(f"{name}: unsupported pixel type {arr.dtype}")


def _limit(max_pixels: int | None) -> int | None:
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if int(max_pixels) <= 0:
        return None  # 0: no limit
    return int(max_pixels)


def too_large_message(name: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{name} is {width}x{height} ({width * height / 1e6:.3g} megapixels), above the limit of "
        f"{max_pixels / 1e6:g} megapixels: downscale it, or raise the limit (prepare: --max-image-pixels, "
        "trainer: data.max_image_pixels)"
    )


def _open(fh, name: str, max_pixels: int | None):
    """``Image.open`` (the header only) with our pixel limit in place of Pillow's decompression-bomb guard:
    the caller checks the size against ``max_pixels`` before any pixel is decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fh)
        except Image.DecompressionBombError:
            with _PILLOW_LIMIT:  # open the header once more without Pillow's guard, to read the size
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    fh.seek(0)
                    return Image.open(fh)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved


def upright_size(img) -> tuple[int, int]:
    """(width, height) as shown: the header's size with the EXIF orientation applied."""
    width, height = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block: the photo is read as stored  # noqa: BLE001
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _pixels(img, name: str) -> np.ndarray:
    """A loaded Pillow image -> RGB uint8, upright."""
    from PIL import ImageOps

    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block: keep the stored orientation, say so  # noqa: BLE001
        logger.warning("%s: EXIF orientation unreadable (%s); the photo is read as stored", name, exc)
        upright = img
    img = upright if upright is not None else img
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(img)
    elif mode == "F":
        arr = np.asarray(img)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img)
    elif mode == "P" or mode == "PA":
        arr = np.asarray(img.convert("RGBA"))  # a palette with transparency converts through RGBA
    else:  # CMYK, YCbCr, LAB, HSV, 1, RGBX, La, RGBa ...
        arr = np.asarray(img.convert("RGB"))
    return to_rgb_uint8(arr, name)


@contextlib.contextmanager
def _opened(fh, name: str, max_pixels: int | None, unreadable: str):
    """The image's header, open and within ``max_pixels`` (:class:`ImageTooLargeError` otherwise); a file that
    is no image raises :class:`ImageReadError` with ``unreadable`` (``{name}``, ``{exc}``) as its message."""
    from PIL import UnidentifiedImageError

    limit = _limit(max_pixels)
    try:
        img = _open(fh, name, limit)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(unreadable.format(name=name, exc=exc)) from exc
    with img:
        width, height = img.size
        if limit is not None and width * height > limit:
            raise ImageTooLargeError(too_large_message(name, width, height, limit))
        yield img


def _read(fh, name: str, max_pixels: int | None) -> np.ndarray:
    unreadable = "{name} could not be read as an image ({exc}); re-export it as PNG or JPEG"
    with _opened(fh, name, max_pixels, unreadable) as img:
        try:
            img.load()
            return _pixels(img, name)
        except ImageReadError:
            raise
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            raise ImageReadError(
                f"{name} could not be decoded ({type(exc).__name__}: {exc}); re-export it as PNG or JPEG"
            ) from exc


def load_image(source: str | os.PathLike | np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """A file path or an array -> RGB uint8, upright. Unreadable files raise :class:`ImageReadError`
    (:class:`ImageTooLargeError` above ``max_pixels``; None = :data:`DEFAULT_MAX_PIXELS`, 0 = no limit)."""
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source)
    path = Path(source)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with open(path, "rb") as fh:
            return _read(fh, path.name, max_pixels)
    except PermissionError as exc:
        raise ImageReadError(f"{path} cannot be opened ({exc}); check its permissions") from exc


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes (a tar member, an upload) -> RGB uint8, exactly as :func:`load_image` reads files."""
    return _read(io.BytesIO(data), name, max_pixels)


def image_size(data: bytes, name: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of encoded image bytes as :func:`decode_image` would return them, from the header only."""
    with _opened(io.BytesIO(data), name, max_pixels, "{name} is not an image ({exc})") as img:
        return upright_size(img)
