"""Reading images into one convention: RGB uint8 ``H x W x 3`` numpy arrays."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image that cannot be read; the message names it and says what to do."""


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


def load_image(source: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A file path or an array -> RGB uint8. Unreadable files raise :class:`ImageReadError`."""
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source)
    from PIL import Image, UnidentifiedImageError

    path = Path(source)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(img).astype(np.uint16)
            elif img.mode in ("I", "F"):
                arr = np.asarray(img)
            elif img.mode in ("L", "LA", "RGB", "RGBA"):
                arr = np.asarray(img)
            else:
                arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(
            f"{path.name} could not be read as an image ({exc}); re-export it as PNG or JPEG"
        ) from exc
    return to_rgb_uint8(arr, path.name)
