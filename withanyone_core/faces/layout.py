"""Face boxes for a multi-person layout, taken from an example photo.

Like the reference's ``locate_bboxes``: detect every face, fit the photo into the target
size with a crop that keeps all faces (the reference crops to a square at a random
offset; here the crop has the target's aspect ratio and is centred on the faces, so the
result is reproducible), scale the boxes, make them square and order them left to right.
"""

from __future__ import annotations

import numpy as np

from .analysis import FaceAnalyzer, NoFaceError
from .images import to_rgb_uint8


def fit_boxes(boxes: np.ndarray, image_width: int, image_height: int, width: int, height: int) -> list[list[float]]:
    """Map face boxes of an ``image_width x image_height`` photo into a ``width x height`` layout."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    target_aspect = width / height
    # the largest window of the target aspect ratio inside the photo
    win_w = min(image_width, image_height * target_aspect)
    win_h = win_w / target_aspect
    fx1, fy1 = boxes[:, 0].min(), boxes[:, 1].min()
    fx2, fy2 = boxes[:, 2].max(), boxes[:, 3].max()
    # centred on the faces, then clamped to the photo
    x0 = float(np.clip((fx1 + fx2) / 2 - win_w / 2, 0, image_width - win_w))
    y0 = float(np.clip((fy1 + fy2) / 2 - win_h / 2, 0, image_height - win_h))
    scale = width / win_w
    out = []
    for x1, y1, x2, y2 in boxes:
        x1, x2 = (x1 - x0) * scale, (x2 - x0) * scale
        y1, y2 = (y1 - y0) * scale, (y2 - y0) * scale
        w, h = x2 - x1, y2 - y1
        if w > h:
            y1, y2 = y1 - (w - h) / 2, y2 + (w - h) / 2
        else:
            x1, x2 = x1 - (h - w) / 2, x2 + (h - w) / 2
        out.append([max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)])
    return sorted(out, key=lambda b: (b[0] + b[2]) / 2)


def layout_boxes_from_image(analyzer: FaceAnalyzer, image: np.ndarray, width: int, height: int,
                            image_name: str = "layout image", max_faces: int | None = None) -> list[list[float]]:
    """Boxes ``[x1, y1, x2, y2]`` in a ``width x height`` output, one per face, left to right."""
    image = to_rgb_uint8(image, image_name)
    faces = analyzer.detect(image)
    if not faces:
        raise NoFaceError(
            f"no face found in the {image_name}: use a photo with the people placed as you want them, "
            "or give the boxes as text"
        )
    if max_faces is not None:
        faces = faces[:max_faces]  # the largest ones
    boxes = np.stack([f.bbox for f in faces])
    return fit_boxes(boxes, image.shape[1], image.shape[0], width, height)
