"""Face boxes for a multi-person layout, taken from an example photo or a mask.

The authors' mapping (their ``locate_bboxes`` / ``face_preserving_resize`` and the demo's
``resize_bbox``): a square window of the photo, as large as the photo allows and placed so
that it holds every face, is scaled uniformly into the output and centred there; the batch
script then makes every box square. They place the window at a random offset where it
fits; here it is centred on the faces (reproducible). Their bug is not copied: where the
faces do not fit in that window (two people at the edges of a wide photo), the authors
clip the boxes into degenerate ones; here the window grows, still uniformly scaled and
centred on the faces, so every face lands inside the output.

``framing="fill"`` uses a window with the output's aspect ratio instead of a square, so a
wide output is filled by the photo rather than holding a centred square.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..faces.analysis import Face, FaceAnalyzer, NoFaceError
from ..faces.images import to_rgb_uint8
from ..wording import count_noun

logger = logging.getLogger(__name__)

FRAMINGS = ("square", "fill")
# when the window must grow to hold the faces, this much of the faces' extent is added as a margin
# on each side, so the outermost faces do not touch the output's edges
GROW_MARGIN = 0.05
# faces narrower than this in the output cover only a couple of 16 px tokens: warn
SMALL_FACE_PX = 32


@dataclass(frozen=True)
class PhotoFraming:
    """Photo pixels -> output pixels: ``out = photo * scale + offset`` (uniform scale)."""

    scale: float
    offset_x: float
    offset_y: float

    def map_box(self, box) -> list[float]:
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        return [
            x1 * self.scale + self.offset_x,
            y1 * self.scale + self.offset_y,
            x2 * self.scale + self.offset_x,
            y2 * self.scale + self.offset_y,
        ]


def _place(lo: float, hi: float, size: float, extent: float) -> float:
    """Start of a window of ``size`` along an axis of the photo (0..extent) holding [lo, hi]."""
    if size <= extent:  # inside the photo, centred on the faces where the photo allows
        start = min(max((lo + hi) / 2 - size / 2, 0.0), extent - size)
    else:  # larger than the photo: centred on the faces
        start = (lo + hi) / 2 - size / 2
    return min(max(start, hi - size), lo)  # every face inside (boxes may stick out of the photo a little)


def photo_framing(
    boxes, image_width: int, image_height: int, width: int, height: int, framing: str = "square"
) -> PhotoFraming:
    """The uniform mapping of a photo's face ``boxes`` [n, 4] into a ``width x height`` output."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}; got {framing!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        raise ValueError("no face boxes to place")
    if not np.isfinite(boxes).all():
        raise ValueError("face boxes contain NaN or infinite coordinates")
    if image_width <= 0 or image_height <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"sizes must be positive: photo {image_width}x{image_height}, output {width}x{height}")
    lo_x, lo_y = float(boxes[:, 0].min()), float(boxes[:, 1].min())
    hi_x, hi_y = float(boxes[:, 2].max()), float(boxes[:, 3].max())
    if framing == "square":
        win_w = win_h = float(min(image_width, image_height))
    else:  # the largest window of the output's aspect ratio inside the photo
        aspect = width / height
        win_w = min(float(image_width), image_height * aspect)
        win_h = win_w / aspect
    span_x, span_y = hi_x - lo_x, hi_y - lo_y
    if span_x > win_w or span_y > win_h:  # the faces do not fit: zoom out (keeping the window's shape)
        grow = max(span_x / win_w, span_y / win_h) * (1 + 2 * GROW_MARGIN)
        win_w, win_h = win_w * grow, win_h * grow
    x0 = _place(lo_x, hi_x, win_w, float(image_width))
    y0 = _place(lo_y, hi_y, win_h, float(image_height))
    scale = min(width / win_w, height / win_h)
    # the window centred in the output (the demo's resize_bbox)
    return PhotoFraming(scale, (width - win_w * scale) / 2 - x0 * scale, (height - win_h * scale) / 2 - y0 * scale)


def _square_and_clip(box: list[float], width: int, height: int) -> list[float]:
    """The batch script's squaring (shorter side grown about the centre), clipped to the output."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w > h:
        y1, y2 = y1 - (w - h) / 2, y2 + (w - h) / 2
    else:
        x1, x2 = x1 - (h - w) / 2, x2 + (h - w) / 2
    return [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]


def map_face_boxes(
    boxes, image_width: int, image_height: int, width: int, height: int, framing: str = "square", square: bool = True
) -> tuple[list[list[float]], PhotoFraming]:
    """Face boxes of a photo -> boxes in the output, in the input order, and the mapping used.

    Every box is valid (x1 < x2, y1 < y2) and inside ``[0, width] x [0, height]``; a face that
    would not be raises a ValueError naming it (k-th of the given boxes).
    """
    mapping = photo_framing(boxes, image_width, image_height, width, height, framing)
    out = []
    for k, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        mapped = mapping.map_box(box)
        mapped = (
            _square_and_clip(mapped, width, height)
            if square
            else [max(0.0, mapped[0]), max(0.0, mapped[1]), min(float(width), mapped[2]), min(float(height), mapped[3])]
        )
        if not (mapped[2] - mapped[0] >= 1 and mapped[3] - mapped[1] >= 1):
            raise ValueError(
                f"face {k + 1} (photo box {[round(float(v)) for v in box]}) does not land inside the "
                f"{width}x{height} output (got {[round(v, 1) for v in mapped]}): is its detection box empty?"
            )
        out.append(mapped)
    return out, mapping


def fit_boxes(
    boxes, image_width: int, image_height: int, width: int, height: int, framing: str = "square"
) -> list[list[float]]:
    """Map face boxes of an ``image_width x image_height`` photo into a ``width x height`` layout.

    Square boxes (clipped at the output's edges), ordered left to right by their centres.
    """
    mapped, _ = map_face_boxes(boxes, image_width, image_height, width, height, framing)
    return sorted(mapped, key=lambda b: (b[0] + b[2]) / 2)


@dataclass(frozen=True)
class PhotoLayout:
    """A layout taken from a photo: the kept faces left to right, and what was left out."""

    boxes: list[list[float]]  # output pixels; box k belongs to person k (left to right)
    faces: list[Face]  # the kept faces, in the same order (photo pixels)
    dropped: list[Face] = field(default_factory=list)  # detected but not taken (lower scores)
    mapping: PhotoFraming | None = None

    def dropped_boxes(self) -> list[list[float]]:
        """Where the faces left out would be in the output (for the preview; may lie outside)."""
        return [self.mapping.map_box(f.bbox) for f in self.dropped] if self.mapping else []


def layout_from_faces(
    faces: list[Face],
    image_width: int,
    image_height: int,
    width: int,
    height: int,
    max_faces: int | None = None,
    image_name: str = "layout image",
    framing: str = "square",
) -> PhotoLayout:
    """Keep the ``max_faces`` faces with the highest detection scores (the authors' order), place them
    left to right."""
    if not faces:
        raise NoFaceError(
            f"no face found in the {image_name}: use a photo with the people placed as you want them, "
            "or give the boxes as text"
        )
    ranked = sorted(faces, key=lambda f: -f.score)
    kept, dropped = (ranked, []) if max_faces is None else (ranked[:max_faces], ranked[max_faces:])
    kept = sorted(kept, key=lambda f: float(f.bbox[0] + f.bbox[2]))
    mapped, mapping = map_face_boxes(
        np.stack([f.bbox for f in kept]), image_width, image_height, width, height, framing
    )
    if dropped:
        logger.warning(
            "the %s has %s; kept the %s with the highest detection scores (people = %d), numbered left to right; "
            "left out: %s",
            image_name,
            count_noun(len(faces), "face"),
            count_noun(len(kept), "face"),
            max_faces,
            "; ".join(f"box [{', '.join(f'{v:.0f}' for v in f.bbox)}] score {f.score:.2f}" for f in dropped),
        )
    elif max_faces is not None and len(kept) < max_faces:
        logger.warning(
            "the %s has only %s but people = %d: the layout has %s",
            image_name,
            count_noun(len(kept), "face"),
            max_faces,
            count_noun(len(kept), "box", "boxes"),
        )
    for k, box in enumerate(mapped):
        side = min(box[2] - box[0], box[3] - box[1])
        if side < SMALL_FACE_PX:
            logger.warning(
                "face %d of the %s is only %.0f px in the %dx%d output: the faces are far apart in the "
                "photo; crop the photo closer or use a larger output",
                k + 1,
                image_name,
                side,
                width,
                height,
            )
    return PhotoLayout(mapped, kept, dropped, mapping)


def layout_from_photo(
    analyzer: FaceAnalyzer,
    image: np.ndarray,
    width: int,
    height: int,
    image_name: str = "layout image",
    max_faces: int | None = None,
    framing: str = "square",
) -> PhotoLayout:
    """Detect the faces of ``image`` and place them in a ``width x height`` output (see :func:`layout_from_faces`)."""
    image = to_rgb_uint8(image, image_name)
    faces = analyzer.detect(image)
    return layout_from_faces(faces, image.shape[1], image.shape[0], width, height, max_faces, image_name, framing)


def layout_boxes_from_image(
    analyzer: FaceAnalyzer,
    image: np.ndarray,
    width: int,
    height: int,
    image_name: str = "layout image",
    max_faces: int | None = None,
    framing: str = "square",
) -> list[list[float]]:
    """Boxes ``[x1, y1, x2, y2]`` in a ``width x height`` output, one per face, left to right."""
    return layout_from_photo(analyzer, image, width, height, image_name, max_faces, framing).boxes


def boxes_from_mask(
    mask: np.ndarray,
    width: int,
    height: int,
    max_regions: int | None = None,
    threshold: float = 0.5,
    min_area_fraction: float = 1e-4,
    mask_name: str = "layout mask",
) -> list[list[float]]:
    """One box per connected region of ``mask`` (> ``threshold``), left to right, in a ``width x height`` output.

    The mask is stretched to the output size (its corners are the output's corners). Regions
    smaller than ``min_area_fraction`` of the mask are specks and ignored; with more regions than
    ``max_regions`` the largest are kept.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"{mask_name}: expected one H x W mask, got shape {mask.shape}")
    if not np.isfinite(mask).all():
        raise ValueError(f"{mask_name} contains NaN or infinite values")
    mh, mw = mask.shape
    if abs(mw / mh - width / height) > 0.01 * (width / height):
        logger.warning(
            "%s is %dx%d but the output is %dx%d: the mask is stretched to the output", mask_name, mw, mh, width, height
        )
    labels, count = ndimage.label(mask > threshold, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        raise ValueError(
            f"{mask_name} has no region above {threshold}: paint one blob per person's face (white on black)"
        )
    areas = ndimage.sum_labels(np.ones_like(mask), labels, index=np.arange(1, count + 1))
    slices = ndimage.find_objects(labels)
    regions = [(float(a), s) for a, s in zip(areas, slices) if a >= min_area_fraction * mh * mw]
    if not regions:
        raise ValueError(
            f"{mask_name}: its {count_noun(count, 'region')} are all smaller than "
            f"{min_area_fraction:.2%} of the mask; paint larger blobs"
        )
    if len(regions) < count:
        logger.info(
            "%s: ignored %d specks below %.2f%% of its area", mask_name, count - len(regions), 100 * min_area_fraction
        )
    regions.sort(key=lambda r: -r[0])
    if max_regions is not None and len(regions) > max_regions:
        logger.warning(
            "%s has %s; kept the %d largest (people = %d)",
            mask_name,
            count_noun(len(regions), "region"),
            max_regions,
            max_regions,
        )
        regions = regions[:max_regions]
    elif max_regions is not None and len(regions) < max_regions:
        logger.warning(
            "%s has only %s but people = %d: the layout has %s",
            mask_name,
            count_noun(len(regions), "region"),
            max_regions,
            count_noun(len(regions), "box", "boxes"),
        )
    sx, sy = width / mw, height / mh
    boxes = [[s[1].start * sx, s[0].start * sy, s[1].stop * sx, s[0].stop * sy] for _, s in regions]
    return sorted(boxes, key=lambda b: (b[0] + b[2]) / 2)


def box_masks(boxes, width: int, height: int) -> np.ndarray:
    """``[n, height, width]`` float32 masks, 1 inside each box (pixels whose centre lies in it)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((boxes.shape[0], height, width), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        c0, c1 = max(0, math.ceil(x1 - 0.5)), min(width, math.ceil(x2 - 0.5))
        r0, r1 = max(0, math.ceil(y1 - 0.5)), min(height, math.ceil(y2 - 0.5))
        out[k, r0:r1, c0:c1] = 1.0
    return out
