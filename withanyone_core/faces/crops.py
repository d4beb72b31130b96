"""Face crops: insightface's ArcFace-aligned 112x112 crop and the reference's SigLIP crop."""

from __future__ import annotations

import numpy as np

SIGLIP_CROP_SIZE = 512


def _landmarks(face_or_kps) -> np.ndarray:
    kps = getattr(face_or_kps, "kps", face_or_kps)
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks [5, 2], got shape {kps.shape}")
    return kps


def arcface_crop(image: np.ndarray, face_or_kps, size: int = 112) -> np.ndarray:
    """The 112x112 crop ArcFace sees: similarity transform of the 5 landmarks onto insightface's template."""
    from insightface.utils import face_align

    return face_align.norm_crop(image, landmark=_landmarks(face_or_kps), image_size=size)


def square_box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """The reference's square box: integer box, shorter side grown about the centre, clipped."""
    x1, y1, x2, y2 = (int(v) for v in np.asarray(bbox, dtype=np.float64)[:4])
    w, h = x2 - x1, y2 - y1
    if w > h:
        diff = w - h
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
    elif h > w:
        diff = h - w
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
    return max(0, x1), max(0, y1), min(width, x2), min(height, y2)


def siglip_crop(
    image: np.ndarray, face_or_bbox, size: int = SIGLIP_CROP_SIZE, matte: np.ndarray | None = None
) -> np.ndarray:
    """The reference's crop for SigLIP: the face box squared about its centre, clipped, resized (Lanczos).

    ``matte`` (``H x W`` in [0, 1], 1 = the person, at the image's size) blanks the background
    as the authors' optional matting does: they run BiRefNet on the 512 px crop and paste the
    crop onto black through the matte, i.e. ``crop * matte``. Here the matte is cropped and
    resized with the same box, so any background-removal mask of the photo can be used.
    """
    from PIL import Image

    bbox = getattr(face_or_bbox, "bbox", face_or_bbox)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = square_box(bbox, w, h)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"face box {list(np.asarray(bbox)[:4])} lies outside the {w}x{h} image")
    region = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2]))
    crop = np.asarray(region.resize((size, size), Image.LANCZOS))
    if matte is None:
        return crop
    matte = np.asarray(matte, dtype=np.float32)
    if matte.shape != (h, w):
        raise ValueError(f"matte of shape {matte.shape} does not match the {w}x{h} image; resize it first")
    if not np.isfinite(matte).all():
        raise ValueError("matte contains NaN or infinite values")
    alpha = Image.fromarray(np.ascontiguousarray(np.clip(matte[y1:y2, x1:x2], 0.0, 1.0)))  # mode "F"
    alpha = np.clip(np.asarray(alpha.resize((size, size), Image.BILINEAR)), 0.0, 1.0)[..., None]
    return (crop.astype(np.float32) * alpha).round().astype(np.uint8)
