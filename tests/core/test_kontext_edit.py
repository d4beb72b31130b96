"""The WithAnyone.Ke face-edit recipe (withanyone_core.faces.edit): faces, boxes, blur, aspect."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from withanyone_core.faces import Face, NoFaceError, edit


def _face(x1, y1, x2, y2, score=0.9):
    return Face(bbox=np.array([x1, y1, x2, y2], dtype=np.float32), kps=np.zeros((5, 2), np.float32), score=score)


def _authors_round_trip(box, width, height, start):
    """gradio_edit.py's path for one box, step by step: face_preserving_resize (integer box, the square crop at
    ``start``, scale to 512, integer) then resize_bbox back to the photo (uniform scale, centred, integer)."""
    b = [int(v) for v in box]
    if width > height:
        square = height
        b[0] -= start
        b[2] -= start
    else:
        square = width
        b[1] -= start
        b[3] -= start
    factor = 512 / square
    b = [int(v * factor) for v in b]
    s = min(width / 512, height / 512)
    ox, oy = (width - 512 * s) / 2, (height - 512 * s) / 2
    return (int(b[0] * s + ox), int(b[1] * s + oy), int(b[2] * s + ox), int(b[3] * s + oy))


@pytest.mark.parametrize("size", [(1000, 1000), (1024, 1024), (777, 777), (1040, 1000), (1000, 1080)])
def test_round_trip_matches_the_authors_steps(size):
    width, height = size
    rng = np.random.default_rng(width + height)
    start = (max(width, height) - min(width, height)) // 2  # a centred crop (theirs is random on non-square)
    for _ in range(50):
        x1, y1 = rng.uniform(-20, width * 0.7), rng.uniform(-20, height * 0.7)
        box = (x1, y1, x1 + rng.uniform(30, 300), y1 + rng.uniform(30, 300))
        ours = edit.authors_round_trip(box, width, height)
        assert ours == _authors_round_trip(box, width, height, start)
        assert max(abs(a - b) for a, b in zip(ours, box)) < 3.0  # only truncation


def test_plan_keeps_four_best_scores_orders_and_blurs_only_large_faces():
    faces = [
        _face(10, 10, 130, 140, 0.70),
        _face(600, 20, 720, 150, 0.95),
        _face(300, 300, 380, 390, 0.90),
        _face(800, 600, 950, 760, 0.80),
        _face(50, 700, 200, 860, 0.60),
    ]
    plan = edit.plan_face_edit(faces, 1000, 1000)
    assert [b[0] for b in plan.photo_boxes] == [600, 300, 800, 10]  # score order, the fifth dropped
    assert plan.dropped == ((50.0, 700.0, 200.0, 860.0),)
    assert (plan.width, plan.height) == (992, 992)  # floored to multiples of 16
    assert plan.boxes == tuple(
        tuple(float(v) for v in edit.authors_round_trip(b, 1000, 1000)) for b in plan.photo_boxes
    )
    assert len(plan.blur_boxes) == 3  # the 80 x 90 face is edited but not blurred
    assert all(b[2] - b[0] >= 100 and b[3] - b[1] >= 100 for b in plan.blur_boxes)
    left = edit.plan_face_edit(faces, 1000, 1000, order="left to right")
    assert [b[0] for b in left.photo_boxes] == [10, 300, 600, 800]
    exact = edit.plan_face_edit(faces, 1000, 1000, box_mapping="exact")
    assert exact.boxes[0] == pytest.approx([600 * 0.992, 20 * 0.992, 720 * 0.992, 150 * 0.992])
    one = edit.plan_face_edit([_face(-30.5, 40, 170, 260)], 1000, 1000)  # one face, partly outside: fine
    assert one.boxes[0][0] < 0 and len(one.blur_boxes) == 1
    with pytest.raises(NoFaceError, match="no face found"):
        edit.plan_face_edit([], 1000, 1000)


def test_aspect_limit_is_the_authors_and_can_be_lifted(caplog):
    wide = [_face(100, 100, 300, 320), _face(1500, 200, 1700, 420)]
    with pytest.raises(ValueError, match="aspect 2.00"):
        edit.plan_face_edit(wide, 2000, 1000)
    edit.plan_face_edit(wide, 1080, 1000)  # 1.08 is inside 0.9-1.1
    with caplog.at_level(logging.WARNING):
        plan = edit.plan_face_edit(wide, 2000, 1000, aspect_limit="off", box_mapping="exact")
    assert "trained on square" in caplog.text
    assert (plan.width, plan.height) == (2000, 992)
    assert plan.boxes[1] == pytest.approx([1500, 200 * 0.992, 1700, 420 * 0.992])  # the detected face, on target
    lifted = edit.plan_face_edit(wide, 2000, 1000, aspect_limit="off")  # the authors' round trip, centred crop
    assert all(abs(a - b) < 3 for box, det in zip(lifted.boxes, plan.photo_boxes) for a, b in zip(box, det))


def test_blur_changes_only_the_boxes_and_equals_a_crop_blur_paste():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    boxes = [(20, 30, 150, 170), (100, 120, 260, 290), (350, 250, 420, 330)]  # overlapping, past the edge
    out = edit.blur_faces(photo, boxes)
    inside = np.zeros(photo.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        inside[max(0, y1) : y2, max(0, x1) : x2] = True
    assert np.array_equal(out[~inside], photo[~inside])
    assert np.abs(out[inside].astype(int) - photo[inside]).mean() > 30
    expected = Image.fromarray(photo)
    for x1, y1, x2, y2 in boxes:
        x2, y2 = min(400, x2), min(300, y2)
        expected.paste(Image.fromarray(photo).crop((x1, y1, x2, y2)).filter(ImageFilter.GaussianBlur(15)), (x1, y1))
    assert np.array_equal(out, np.asarray(expected))
    ref = edit.reference_image(out, 384, 288)
    assert ref.shape == (288, 384, 3)


def test_megapixels_scaling_keeps_the_aspect():
    assert edit.scaled_for_megapixels(4000, 3000, 0) == (4000, 3000)
    w, h = edit.scaled_for_megapixels(4000, 3000, 1.0)
    assert abs(w * h - 1024 * 1024) < 3000 and abs(w / h - 4 / 3) < 0.01
