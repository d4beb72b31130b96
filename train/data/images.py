"""Pixels: the one image reader, the training crop rules and the reference crops.

Every photo (8-bit, 16-bit, grey, palette, CMYK, RGBA; EXIF-rotated) is read by ``withanyone_core.faces.load_image``,
the reader ``prepare.py`` uses too, so both see the same RGB uint8 pixels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SIGLIP_CROP = 512
CROP_RULES = ("keep_faces", "center")
# a face leaves the ID losses when less than this share of its box is inside the crop
MIN_VISIBLE_FACE = 0.75


def load_rgb(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 image, upright (EXIF orientation applied); raises OSError/ValueError for missing, unreadable
    or over-large (above ``max_pixels``) files."""
    from withanyone_core.faces import load_image

    return load_image(path, max_pixels)


def square_crop(image: np.ndarray, box: Sequence[float], size: int = SIGLIP_CROP) -> np.ndarray:
    """The reference's SigLIP crop: box squared about its centre, clipped, resized to ``size``."""
    from withanyone_core.faces import siglip_crop

    return siglip_crop(image, np.asarray(box, dtype=np.float32), size=size)


def choose_window(size: int, target: int, face_lo: float, face_hi: float, rule: str, rng: random.Random | None) -> int:
    """Start of a ``target``-long window in ``[0, size]``.

    ``center``: the middle. ``keep_faces`` (the authors' rule): a random start among those
    that keep the faces' extent ``[face_lo, face_hi]`` inside; when no start can, the
    window is centred on the faces.
    """
    limit = size - target
    if limit <= 0:
        return 0
    if rule == "center":
        return limit // 2
    low, high = max(0, int(np.ceil(face_hi)) - target), min(limit, int(np.floor(face_lo)))
    if low <= high:
        return rng.randint(low, high) if rng is not None else (low + high) // 2
    return int(min(limit, max(0, round((face_lo + face_hi) / 2 - target / 2))))


def crop_to_bucket(
    image: np.ndarray,
    width: int,
    height: int,
    boxes: np.ndarray | None = None,
    rule: str = "center",
    rng: random.Random | None = None,
) -> tuple[np.ndarray, float, float, float]:
    """Resize to cover ``width x height`` and crop; returns image, scale, x offset, y offset.

    ``boxes`` ``[n, 4]`` in the photo's pixels steer the ``keep_faces`` rule.
    """
    from PIL import Image

    if rule not in CROP_RULES:
        raise ValueError(f"crop rule must be one of {CROP_RULES}, got {rule!r}")
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    if boxes is not None and len(boxes):
        b = np.asarray(boxes, dtype=np.float64) * scale
        extent_x, extent_y = (b[:, 0].min(), b[:, 2].max()), (b[:, 1].min(), b[:, 3].max())
    else:
        extent_x, extent_y, rule = (0.0, new_w), (0.0, new_h), "center"
    x0 = choose_window(new_w, width, *extent_x, rule, rng)
    y0 = choose_window(new_h, height, *extent_y, rule, rng)
    return np.array(resized[y0 : y0 + height, x0 : x0 + width]), scale, float(x0), float(y0)


def fit_to_bucket(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, float, float, float]:
    """Resize to cover ``width x height`` and centre-crop; returns image, scale, x offset, y offset."""
    return crop_to_bucket(image, width, height, rule="center")


def faces_inside(boxes: torch.Tensor, landmarks: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[n]`` bool: the face is whole enough in the crop for the ID losses.

    All five landmarks inside and at least :data:`MIN_VISIBLE_FACE` of the box area inside;
    a face cut by the crop would otherwise be aligned on padding.
    """
    x1, y1 = boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height)
    x2, y2 = boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)
    visible = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    lm_in = (
        (landmarks[..., 0] >= 0) & (landmarks[..., 0] < width) & (landmarks[..., 1] >= 0) & (landmarks[..., 1] < height)
    ).all(dim=-1)
    return lm_in & (visible / area >= MIN_VISIBLE_FACE)
