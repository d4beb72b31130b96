"""Layouts from a photo's face boxes or a mask's regions (withanyone_core.layout.photo), no models needed."""

import logging
import random

import numpy as np
import pytest

from withanyone_core.faces import Face, NoFaceError
from withanyone_core.layout.photo import (
    box_masks,
    boxes_from_mask,
    fit_boxes,
    layout_from_faces,
    map_face_boxes,
    photo_framing,
)

# two people at the very edges of a 1920x1080 photo: the pack's old aspect-ratio window gave
# [0, 284, -166, 474] for one of them and the preview crashed in PIL
EDGE_FACES = np.array([[0.0, 290.0, 190.0, 468.0], [1745.0, 300.0, 1920.0, 470.0]])


def _assert_valid(boxes, width, height):
    for x1, y1, x2, y2 in boxes:
        assert np.isfinite([x1, y1, x2, y2]).all()
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (x1, y1, x2, y2)


@pytest.mark.parametrize("framing", ["square", "fill"])
@pytest.mark.parametrize("size", [(768, 768), (1024, 512), (512, 1024), (1344, 768)])
def test_faces_at_both_edges_of_a_wide_photo_land_inside(framing, size):
    width, height = size
    out = fit_boxes(EDGE_FACES, 1920, 1080, width, height, framing)
    _assert_valid(out, width, height)
    assert out[0][0] < out[1][0]
    # uniform scale: the two faces keep their relative size and distance
    mapped, mapping = map_face_boxes(EDGE_FACES, 1920, 1080, width, height, framing, square=False)
    ratio = (mapped[1][0] - mapped[0][0]) / (EDGE_FACES[1][0] - EDGE_FACES[0][0])
    assert ratio == pytest.approx(mapping.scale)
    assert (mapped[0][3] - mapped[0][1]) / (EDGE_FACES[0][3] - EDGE_FACES[0][1]) == pytest.approx(mapping.scale)
    window = 1080 if framing == "square" else min(1920, 1080 * width / height)
    if window < 1920:  # the window had to grow: by the margin, so the outermost faces keep off the edges
        assert mapped[0][0] > 0 and mapped[1][2] < width
        assert (mapped[0][0] + mapped[1][2]) / 2 == pytest.approx(width / 2)  # the group centred
    else:  # the photo's own window holds them: its full width
        assert mapped[0][0] == pytest.approx(0) and mapped[1][2] == pytest.approx(width)


def test_preview_of_the_edge_case_draws(tmp_path):
    """The layout node's preview drawing accepts every box (it crashed in PIL on inverted ones)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (768, 768))
    for box in fit_boxes(EDGE_FACES, 1920, 1080, 768, 768):
        ImageDraw.Draw(canvas).rectangle(box, outline=(255, 0, 0), width=3)


def test_faces_that_fit_follow_the_authors_square_window():
    """Faces inside one square of the photo: the authors' crop (a min(W, H) square holding every face)
    scaled uniformly into the output and centred (their resize_bbox), with the window centred on the faces."""
    faces = np.array([[700.0, 300.0, 800.0, 420.0], [1000.0, 320.0, 1090.0, 430.0]])
    mapped, mapping = map_face_boxes(faces, 1920, 1080, 1024, 768, "square", square=False)
    x0 = (700 + 1090) / 2 - 540  # the 1080 square centred on the faces
    scale = 768 / 1080
    assert mapping.scale == pytest.approx(scale)
    offset_x = (1024 - 768) / 2  # the square centred in the wide output
    np.testing.assert_allclose(
        mapped[0], [(700 - x0) * scale + offset_x, 300 * scale, (800 - x0) * scale + offset_x, 420 * scale]
    )
    # window clamped to the photo where centring would leave it
    left = np.array([[10.0, 100.0, 110.0, 200.0]])
    mapped, _ = map_face_boxes(left, 1920, 1080, 768, 768, square=False)
    np.testing.assert_allclose(mapped[0], [10 * 768 / 1080, 100 * 768 / 1080, 110 * 768 / 1080, 200 * 768 / 1080])


def test_boxes_are_squared_like_the_batch_script_and_clipped_at_the_edges():
    out = fit_boxes(np.array([[100.0, 100.0, 160.0, 220.0]]), 512, 512, 512, 512)
    assert out == [[70.0, 100.0, 190.0, 220.0]]
    edge = fit_boxes(np.array([[0.0, 100.0, 40.0, 220.0]]), 512, 512, 512, 512)
    assert edge == [[0.0, 100.0, 80.0, 220.0]]  # squared to 120 wide about x=20, clipped at 0


@pytest.mark.parametrize("seed", range(40))
def test_fit_boxes_properties_random(seed):
    rng = random.Random(seed)
    image_w, image_h = rng.choice([(1920, 1080), (1080, 1920), (640, 640), (4000, 3000), (300, 1200)])
    width, height = rng.choice([(768, 768), (512, 512), (1024, 576), (576, 1024), (1344, 768)])
    n = rng.randint(1, 6)
    boxes = []
    for _ in range(n):
        side = rng.uniform(8, 0.6 * min(image_w, image_h))
        x1 = rng.uniform(-0.05 * side, image_w - 0.95 * side)  # detections may stick out a little
        y1 = rng.uniform(-0.05 * side, image_h - 0.95 * side)
        boxes.append([x1, y1, x1 + side * rng.uniform(0.7, 1.3), y1 + side])
    boxes = np.array(boxes)
    framing = rng.choice(["square", "fill"])
    out = fit_boxes(boxes, image_w, image_h, width, height, framing)
    assert len(out) == n
    _assert_valid(out, width, height)
    centres = [(b[0] + b[2]) / 2 for b in out]
    assert centres == sorted(centres)  # left to right
    mapped, mapping = map_face_boxes(boxes, image_w, image_h, width, height, framing, square=False)
    # every face wholly inside the output (before squaring), with one uniform scale
    for box, (x1, y1, x2, y2) in zip(boxes, mapped):
        assert -1e-6 <= x1 and x2 <= width + 1e-6 and -1e-6 <= y1 and y2 <= height + 1e-6
        assert (x2 - x1) == pytest.approx((box[2] - box[0]) * mapping.scale)
        assert (y2 - y1) == pytest.approx((box[3] - box[1]) * mapping.scale)
    # the mapping keeps the left-to-right order of the photo's faces
    photo_order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
    mapped_order = np.argsort([(b[0] + b[2]) / 2 for b in mapped], kind="stable")
    assert list(photo_order) == list(mapped_order)


def test_bad_face_boxes_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        photo_framing(np.array([[0, 0, np.nan, 10]]), 100, 100, 64, 64)
    with pytest.raises(ValueError, match="framing must be one of square, fill"):
        photo_framing(np.array([[0, 0, 10, 10]]), 100, 100, 64, 64, framing="crop")
    with pytest.raises(ValueError, match=r"face 2 \(photo box \[50, 50, 50, 60\]\) does not land inside"):
        map_face_boxes(np.array([[0, 0, 10, 10], [50, 50, 50, 60]]), 100, 100, 64, 64, square=False)


def _faces(*specs):
    return [Face(bbox=np.array(b, np.float32), kps=np.zeros((5, 2), np.float32), score=s) for b, s in specs]


def test_layout_from_faces_people_limit_order_and_far_apart_warning(caplog):
    faces = _faces(([900, 100, 1000, 200], 0.9), ([100, 100, 200, 200], 0.5), ([500, 100, 600, 200], 0.8))
    placed = layout_from_faces(faces, 1100, 400, 768, 768, max_faces=2)
    assert [f.score for f in placed.faces] == [0.8, 0.9]  # the two surest, left to right
    assert [f.score for f in placed.dropped] == [0.5]
    dropped = placed.dropped_boxes()[0]
    assert dropped[2] < placed.boxes[0][0]  # the left-out face is left of the kept ones
    with pytest.raises(NoFaceError, match="no face found in the layout image"):
        layout_from_faces([], 100, 100, 64, 64)
    tiny = _faces(([0, 0, 20, 20], 0.9), ([3980, 0, 4000, 20], 0.9))
    with caplog.at_level(logging.WARNING):
        placed = layout_from_faces(tiny, 4000, 300, 512, 512)
    _assert_valid(placed.boxes, 512, 512)
    assert "face 1 of the layout image is only" in caplog.text and "far apart" in caplog.text


def test_boxes_from_mask_regions_left_to_right_largest_kept(caplog):
    mask = np.zeros((100, 200), np.float32)
    mask[10:30, 150:180] = 1.0  # right, 600 px
    mask[20:60, 20:60] = 0.9  # left, 1600 px
    mask[50:60, 90:100] = 1.0  # middle, 100 px
    mask[95, 5] = 1.0  # a speck (1 px < 0.01 % ... kept out by min_area_fraction)
    boxes = boxes_from_mask(mask, 400, 200, min_area_fraction=1e-3)
    assert boxes == [[40.0, 40.0, 120.0, 120.0], [180.0, 100.0, 200.0, 120.0], [300.0, 20.0, 360.0, 60.0]]
    with caplog.at_level(logging.WARNING):
        two = boxes_from_mask(mask, 400, 200, max_regions=2, min_area_fraction=1e-3)
    assert two == [boxes[0], boxes[2]]  # the two largest, left to right
    assert "layout mask has 3 regions; kept the 2 largest (people = 2)" in caplog.text
    with pytest.raises(ValueError, match="no region above 0.5"):
        boxes_from_mask(np.full((10, 10), 0.2, np.float32), 64, 64)
    with pytest.raises(ValueError, match="NaN"):
        boxes_from_mask(np.full((10, 10), np.nan, np.float32), 64, 64)
    diagonal = np.eye(8, dtype=np.float32)  # 8-connected: one region
    assert boxes_from_mask(diagonal, 8, 8) == [[0.0, 0.0, 8.0, 8.0]]


def test_box_masks_cover_the_box_pixels():
    masks = box_masks([[0, 0, 16, 16], [10.4, 2.6, 20.5, 8.0]], 32, 16)
    assert masks.shape == (2, 16, 32) and masks.dtype == np.float32
    assert masks[0, :16, :16].all() and masks[0].sum() == 256
    assert masks[1].nonzero()[1].min() == 10 and masks[1].nonzero()[1].max() == 19  # centres 10.5 .. 19.5
    assert masks[1].nonzero()[0].min() == 3 and masks[1].nonzero()[0].max() == 7
