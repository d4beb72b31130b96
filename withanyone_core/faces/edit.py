"""The face-edit recipe of WithAnyone.Ke (the authors' ``gradio_edit.py`` and Kontext pipeline).

From a source photo: detect its faces (antelopev2), keep up to 4 (the detector's order, i.e.
highest score first), map their boxes into the frame the model samples, blur every face of
at least 100 x 100 px with a Gaussian of radius 15, and use the blurred photo as the FLUX.1
Kontext reference. The faces' boxes become the layout (box k = identity k), the target has
the photo's size floored to a multiple of 16, and the reference is the blurred photo resized
(LANCZOS) to that size.

What the authors do, step by step, and what is kept:

- Box mapping (``box_mapping="authors"``, the default): their demo sends the detected boxes
  through a 512-px square (``face_preserving_resize``: integer boxes, a square crop, scale,
  integer again) and back to the photo (``resize_bbox``: uniform scale, centred, integer), then
  uses those boxes unscaled on the 16-floored target. This is reproduced with one change: on a
  photo that is not square their crop offset is random while the way back assumes a centred
  one, so boxes drift by up to half the aspect surplus; here the crop is centred, so the round
  trip only truncates (under 2 px). ``box_mapping="exact"`` keeps the detector's boxes and
  scales them to the target.
- Their square crop reads the second face unconditionally (``face_bboxes[1]``), so a photo with
  one face fails, and a face partly outside the photo (a negative coordinate) aborts it; neither
  is copied: any number of faces from 1 to 4 works, partly outside faces are clipped by the layout.
- Aspect: their pipeline refuses photos outside 0.9 < w / h < 1.1 ("trained on square images").
  Nothing in the maths needs it here (target and reference token grids, the reference's own
  position ids and the box mapping work at any size), so ``aspect_limit="off"`` lifts it; the
  default keeps the authors' check, since the model saw square photos in training.
- Blur: each face region is cut from the original photo, blurred on its own (PIL's
  GaussianBlur, so the blur does not reach past the box) and pasted back, in face order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .analysis import Face, NoFaceError

logger = logging.getLogger(__name__)

MAX_EDIT_FACES = 4
BLUR_MIN_FACE = 100  # px on both sides, in the photo
BLUR_RADIUS = 15
ROUND_TRIP_SIDE = 512  # the authors' square working frame for boxes
AUTHORS_ASPECT = (0.9, 1.1)  # exclusive bounds on width / height
BOX_MAPPINGS = ("authors", "exact")
FACE_ORDERS = ("detection score", "left to right")
ASPECT_LIMITS = ("authors (0.9-1.1)", "off")
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class FaceEditPlan:
    """What the edit needs: the target size, the boxes on it, and which of them get blurred."""

    width: int  # target = reference size in pixels (multiples of 16)
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # on the target, person order
    blur_boxes: tuple[tuple[int, int, int, int], ...]  # in the photo's pixels
    photo_boxes: tuple[tuple[float, float, float, float], ...]  # the detector's, in the photo's pixels
    dropped: tuple[tuple[float, float, float, float], ...] = ()  # faces beyond the fourth, in the photo


def check_aspect(width: int, height: int, aspect_limit: str = ASPECT_LIMITS[0]) -> None:
    if aspect_limit not in ASPECT_LIMITS:
        raise ValueError(f"unknown aspect limit {aspect_limit!r}: use one of {', '.join(ASPECT_LIMITS)}")
    ratio = width / height
    lo, hi = AUTHORS_ASPECT
    if aspect_limit == ASPECT_LIMITS[0] and not lo < ratio < hi:
        raise ValueError(
            f"the source photo is {width}x{height} (aspect {ratio:.2f}); WithAnyone.Ke was trained on square photos "
            f"and the authors accept only aspects between {lo} and {hi}. Crop the photo to near-square, or set "
            "aspect_limit to 'off' (the pack maps boxes correctly at any aspect; results may be weaker)"
        )
    if not lo < ratio < hi:
        logger.warning(
            "WithAnyone Face Edit: aspect %.2f is outside the authors' 0.9-1.1; the model was trained on square photos",
            ratio,
        )


def select_edit_faces(
    faces: list[Face], order: str = FACE_ORDERS[0], max_faces: int = MAX_EDIT_FACES
) -> tuple[list[Face], list[Face]]:
    """(kept, dropped): the ``max_faces`` highest-scoring faces (the authors keep the detector's first
    four, which it sorts by score), in ``order``: by score (the authors') or left to right."""
    if order not in FACE_ORDERS:
        raise ValueError(f"unknown face order {order!r}: use one of {', '.join(FACE_ORDERS)}")
    ranked = sorted(faces, key=lambda f: -f.score)
    kept, dropped = ranked[:max_faces], ranked[max_faces:]
    if order == "left to right":
        kept = sorted(kept, key=lambda f: (float(f.bbox[0]) + float(f.bbox[2])) / 2)
    return kept, dropped


def target_size(width: int, height: int) -> tuple[int, int]:
    """The authors' target (and reference) size: the photo's, floored to multiples of 16."""
    w, h = PIXELS_PER_TOKEN * (width // PIXELS_PER_TOKEN), PIXELS_PER_TOKEN * (height // PIXELS_PER_TOKEN)
    if w < PIXELS_PER_TOKEN or h < PIXELS_PER_TOKEN:
        raise ValueError(f"the source photo ({width}x{height}) is smaller than 16 px on a side")
    return w, h


def authors_round_trip(box, width: int, height: int, side: int = ROUND_TRIP_SIDE) -> tuple[int, int, int, int]:
    """A detected box through the authors' 512-px square and back to the photo (integers, centred crop)."""
    square = min(width, height)
    off_x = (width - square) // 2 if width > height else 0
    off_y = (height - square) // 2 if height > width else 0
    scale = side / square
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    there = [int((x1 - off_x) * scale), int((y1 - off_y) * scale), int((x2 - off_x) * scale), int((y2 - off_y) * scale)]
    back = min(width / side, height / side)
    dx, dy = (width - side * back) / 2, (height - side * back) / 2
    return (int(there[0] * back + dx), int(there[1] * back + dy), int(there[2] * back + dx), int(there[3] * back + dy))


def plan_face_edit(
    faces: list[Face],
    width: int,
    height: int,
    *,
    order: str = FACE_ORDERS[0],
    box_mapping: str = BOX_MAPPINGS[0],
    aspect_limit: str = ASPECT_LIMITS[0],
    min_blur_face: int = BLUR_MIN_FACE,
    image_name: str = "the source photo",
) -> FaceEditPlan:
    """Boxes on the target and faces to blur for a ``width x height`` photo with ``faces`` detected."""
    if box_mapping not in BOX_MAPPINGS:
        raise ValueError(f"unknown box mapping {box_mapping!r}: use one of {', '.join(BOX_MAPPINGS)}")
    check_aspect(width, height, aspect_limit)
    if not faces:
        raise NoFaceError(
            f"no face found in {image_name}: WithAnyone.Ke replaces the faces of the photo, so it needs "
            "at least one (use a photo where each face is at least 64 px wide, or lower the face "
            "analyzer's detection threshold)"
        )
    kept, dropped = select_edit_faces(faces, order)
    if dropped:
        logger.info(
            "WithAnyone Face Edit: %d faces found, the %d with the highest detection scores are edited",
            len(faces),
            len(kept),
        )
    tw, th = target_size(width, height)
    photo_boxes = tuple(tuple(float(v) for v in f.bbox[:4]) for f in kept)
    if box_mapping == "authors":
        mapped = [authors_round_trip(b, width, height) for b in photo_boxes]
        blur = tuple(mapped)
        boxes = tuple(tuple(float(v) for v in b) for b in mapped)  # photo pixels, used on the target as is
    else:
        sx, sy = tw / width, th / height
        boxes = tuple((x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in photo_boxes)
        blur = tuple(tuple(int(v) for v in b) for b in photo_boxes)
    blur = tuple(b for b in blur if b[2] - b[0] >= min_blur_face and b[3] - b[1] >= min_blur_face)
    small = len(kept) - len(blur)
    if small:
        logger.info(
            "WithAnyone Face Edit: %d face(s) smaller than %d px are edited but not blurred (as the authors)",
            small,
            min_blur_face,
        )
    return FaceEditPlan(tw, th, boxes, blur, photo_boxes, tuple(tuple(float(v) for v in f.bbox[:4]) for f in dropped))


def blur_faces(image: np.ndarray, boxes, radius: float = BLUR_RADIUS) -> np.ndarray:
    """RGB uint8 photo with each box's region Gaussian-blurred on its own (cut from the original, pasted back)."""
    from PIL import Image, ImageFilter

    original = Image.fromarray(np.ascontiguousarray(image))
    out = original.copy()
    w, h = original.size
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = max(0, int(x1)), max(0, int(y1)), min(w, int(x2)), min(h, int(y2))
        if x2 <= x1 or y2 <= y1:
            continue
        region = original.crop((x1, y1, x2, y2)).filter(ImageFilter.GaussianBlur(radius=radius))
        out.paste(region, (x1, y1))
    return np.asarray(out)


def reference_image(blurred: np.ndarray, width: int, height: int) -> np.ndarray:
    """The Kontext reference: the blurred photo resized (LANCZOS) to the target size, as the authors."""
    from PIL import Image

    photo = Image.fromarray(np.ascontiguousarray(blurred))
    if photo.size == (width, height):
        return np.asarray(photo)
    return np.asarray(photo.resize((width, height), Image.Resampling.LANCZOS))


def scaled_for_megapixels(width: int, height: int, megapixels: float) -> tuple[int, int]:
    """A size of about ``megapixels`` with the photo's aspect (0: the photo's own, as the authors)."""
    if megapixels <= 0:
        return width, height
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    return max(PIXELS_PER_TOKEN, round(width * scale)), max(PIXELS_PER_TOKEN, round(height * scale))
