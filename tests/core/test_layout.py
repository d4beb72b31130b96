"""withanyone_core.layout: the Layout value (validation, rescaling, text and presets, colours), and layout -> token
membership: vectorised, exact against the reference's loop-built mask."""

import random

import numpy as np
import pytest
import torch

from support.reference_flux import reference_mask
from withanyone_core.layout import (
    COLORS,
    PRESETS,
    Layout,
    TokenGrid,
    batch_layouts,
    box_colors,
    box_token_ranges,
    boxes_membership,
    build_layout,
    layout_from_preset,
    layout_from_text,
    parse_boxes,
    preset_boxes,
    rescale_boxes,
)


def _random_boxes(rng, n, height, width):
    boxes = []
    for _ in range(n):
        x1 = rng.uniform(-0.2 * width, 0.9 * width)
        y1 = rng.uniform(-0.2 * height, 0.9 * height)
        boxes.append([x1, y1, x1 + rng.uniform(1, 0.7 * width), y1 + rng.uniform(1, 0.7 * height)])
    return boxes


@pytest.mark.parametrize("seed", range(6))
def test_membership_equals_reference_mask_random(seed):
    rng = random.Random(seed)
    height, width = rng.choice([(256, 256), (384, 512), (512, 320), (1024, 768)])
    n = rng.randint(1, 4)
    boxes = [_random_boxes(rng, n, height, width) for _ in range(2)]
    for id_len in (8, 264):
        expected = reference_mask(boxes, height, width, id_len, num_heads=1, num_ids=n)[:, 0]
        layout = build_layout(boxes, TokenGrid.for_pixels(height, width, padded=False), n, 2)
        assert torch.equal(layout.token_mask(id_len), expected)


def test_rounding_floor_start_ceil_end_and_clipping():
    grid = TokenGrid(rows=4, cols=5)  # 64 x 80 pixels
    ranges = box_token_ranges(torch.tensor([[15.9, 16.0, 16.1, 47.99], [-40.0, -1.0, 500.0, 31.0]]), grid)
    assert ranges.tolist() == [[0, 1, 2, 3], [0, 0, 5, 2]]
    empty = boxes_membership(torch.tensor([[[100.0, 100.0, 120.0, 120.0]]]), grid)
    assert not empty.any()


def test_overlap_attends_jointly():
    grid = TokenGrid.for_pixels(64, 64)
    layout = build_layout([[[0, 0, 40, 40], [20, 20, 64, 64]]], grid, 2, 1)
    allowed = layout.allowed[0].reshape(4, 4, 2)
    assert allowed[1, 1].tolist() == [True, True]  # token at pixels 16..32 is in both boxes
    assert allowed[0, 0].tolist() == [True, False]
    assert allowed[3, 3].tolist() == [False, True]


def test_padded_grid_for_sizes_not_multiple_of_16():
    assert TokenGrid.for_pixels(1000, 1080) == TokenGrid(63, 68)  # ComfyUI pads
    assert TokenGrid.for_pixels(1000, 1080, padded=False) == TokenGrid(62, 67)  # reference crops
    assert TokenGrid.for_latent(125, 135) == TokenGrid(63, 68)
    layout = build_layout([[[1000, 990, 1080, 1000]]], TokenGrid.for_pixels(1000, 1080), 1, 1)
    # the last padded row/column is reachable
    assert layout.allowed[0].reshape(63, 68, 1)[62, 67, 0]


def test_no_layout_and_mixed_batch():
    grid = TokenGrid(2, 2)
    assert build_layout(None, grid, 3, 2).allowed is None
    layout = build_layout([None, [[0, 0, 16, 16]]], grid, 1, 2)
    assert layout.allowed[0].all()  # item without layout: every token attends to everyone
    assert layout.allowed[1, :, 0].tolist() == [True, False, False, False]


def test_single_box_list_broadcasts_to_batch():
    layout = build_layout([[[0, 0, 16, 16]]], TokenGrid(2, 2), 1, 3)
    assert layout.allowed.shape == (3, 4, 1)


@pytest.mark.parametrize(
    "boxes,match",
    [
        ([[[0, 0, 10, 10]]], "2 identities"),
        ([[[0, 0, 10, 10], [0, 0, 5, 5]], [[0, 0, 1, 1], [1, 1, 2, 2]], [[0, 0, 1, 1]]], "batch has 2"),
        ([[[0, 0, float("nan"), 10], [0, 0, 5, 5]]], "NaN"),
    ],
)
def test_bad_layouts_are_refused_clearly(boxes, match):
    with pytest.raises(ValueError, match=match):
        build_layout(boxes, TokenGrid(4, 4), 2, 2 if len(boxes) > 1 else 1)


def test_memory_is_linear_in_tokens():
    layout = build_layout([[[0, 0, 300, 300]] * 4], TokenGrid.for_pixels(1024, 1024), 4, 1)
    assert layout.allowed.shape == (1, 4096, 4)  # not [B, heads, L, n * 264]


# ---------------------------------------------------------------------------------------------- the Layout value
def test_layout_keeps_its_boxes_as_floats_on_its_canvas():
    layout = Layout(
        1024,
        768,
        [[100, 50, 300, 250], np.array([400.5, 60, 600, 260], dtype=np.float32), torch.tensor([700, 70, 900, 270])],
    )
    assert layout.boxes == ((100.0, 50.0, 300.0, 250.0), (400.5, 60.0, 600.0, 260.0), (700.0, 70.0, 900.0, 270.0))
    assert all(type(v) is float for box in layout.boxes for v in box)
    assert layout.size == (1024, 768) and layout.num_persons == 3
    # past the edge, even outside the canvas: a box covers the tokens it overlaps (none there)
    assert Layout(64, 64, [[-10, -10, 8, 8], [70, 70, 90, 90]]).num_persons == 2
    assert hash(layout) == hash(Layout(1024, 768, layout.boxes))  # immutable, usable as a cache key


@pytest.mark.parametrize(
    "boxes,message",
    [
        (
            [[0, 0, 10, 10], [5, 5, 10]],
            r"layout box 2 \(\[5, 5, 10\]\) has 3 numbers: give four numbers x1, y1, x2, y2 "
            r"in pixels of the 64x32 canvas",
        ),
        ([[0, 0, 10, 10, 1]], r"layout box 1 .* has 5 numbers: give four numbers"),
        (
            [[0, 0, float("nan"), 10]],
            r"layout box 1 \(\[0, 0, nan, 10\]\) has a coordinate that is not a finite number",
        ),
        ([[0, 0, 10, 10], [0, float("-inf"), 10, 10]], r"layout box 2 .* not a finite number .*give four numbers"),
        (
            [[20, 0, 10, 10]],
            r"layout box 1 \(\[20, 0, 10, 10\]\) is empty or inverted: x2 must exceed x1 and y2 must "
            r"exceed y1 \(give the top-left corner first",
        ),
        ([[0, 5, 10, 5]], r"layout box 1 .* is empty or inverted"),
        ([[0, "a", 10, 10]], r"layout box 1 .*'a' is not a number: give four numbers"),
        ([[0, True, 10, 10]], r"layout box 1 .*True is not a number"),
        ([[0, [1, 2], 10, 10]], r"layout box 1 .* is not a number"),
        ([5.0], r"layout box 1 \(5.0\) is not a list of coordinates: give four numbers"),
        (["0,0,10,10"], r"layout box 1 .* is not a list of coordinates"),
        ("0,0,10,10", r"layout boxes must be a list of \[x1, y1, x2, y2\] boxes, one per person; got str"),
        (7, r"layout boxes must be a list of .* got int"),
    ],
)
def test_layout_refuses_bad_boxes_naming_the_box_and_what_to_give(boxes, message):
    with pytest.raises(ValueError, match=message):
        Layout(64, 32, boxes)


@pytest.mark.parametrize("width,height", [(0, 64), (64, -1), (64.5, 64), (True, 64), ("64", 64), (None, 64)])
def test_layout_refuses_a_canvas_that_is_not_whole_positive_pixels(width, height):
    with pytest.raises(
        ValueError,
        match=r"layout (width|height) must be a positive whole number of pixels, got .*: "
        r"give the size of the canvas the boxes are drawn on",
    ):
        Layout(width, height, [[0, 0, 8, 8]])


def test_layout_rescales_uniformly_and_centred():
    layout = Layout(512, 512, [[96, 96, 288, 288]])
    assert layout.boxes_in((512, 512)) == [[96.0, 96.0, 288.0, 288.0]]
    assert layout.rescaled(1024, 1024) == Layout(1024, 1024, [[192, 192, 576, 576]])
    wide = Layout(512, 512, [[0, 0, 512, 512]]).rescaled(1024, 768)
    assert wide.size == (1024, 768) and wide.boxes == ((128.0, 0.0, 896.0, 768.0),)  # square kept, centred
    assert layout.boxes_in((1024, 768)) == rescale_boxes(layout.boxes, (512, 512), (1024, 768))


def test_batch_layouts_one_list_for_all_images_or_one_entry_per_image():
    box = [0, 0, 16, 16]
    assert batch_layouts([box], 32, 32) == (Layout(32, 32, [box]),)
    assert batch_layouts([[box], None], 32, 32) == (Layout(32, 32, [box]), None)
    assert batch_layouts(torch.tensor([[box], [box]]), 32, 32) == (Layout(32, 32, [box]),) * 2
    with pytest.raises(ValueError, match="layout box 1 .* is empty or inverted"):
        batch_layouts([[[16, 0, 0, 16]]], 32, 32)


def test_identity_request_takes_a_layout_not_loose_boxes():
    from withanyone_core.host import IdentityRequest

    arcface = torch.zeros(1, 512)
    layout = Layout(512, 512, [[0, 0, 256, 256]])
    assert IdentityRequest(arcface, None, layout).layout is layout
    assert IdentityRequest(arcface, None, [layout, None]).layout == (layout, None)
    for loose in ([[0, 0, 256, 256]], ((0, 0, 256, 256),), (512, 512), "0,0,256,256"):
        with pytest.raises(
            TypeError,
            match=r"layout must be a Layout, one Layout \(or None\) per image, or None; got "
            r".*: build it with withanyone_core.layout.Layout\(width, height, boxes\)",
        ):
            IdentityRequest(arcface, None, loose)


def test_text_and_preset_layouts_are_the_parsed_boxes():
    assert layout_from_text("0.1,0.2,0.4,0.6\n600 100 900 500", 1000, 500) == Layout(
        1000, 500, parse_boxes("0.1,0.2,0.4,0.6\n600 100 900 500", 1000, 500)
    )
    for people in PRESETS:
        assert layout_from_preset(people, 768, 512).boxes == tuple(preset_boxes(people, 768, 512))
    for bad in (0, 5, True, "2"):
        with pytest.raises(ValueError, match="a preset layout is for 1 to 4 people"):
            layout_from_preset(bad, 768, 768)


def test_box_colors_start_with_the_four_and_never_repeat():
    colors = box_colors(12)
    assert colors[:4] == ["#{:02x}{:02x}{:02x}".format(*c) for c in COLORS] and len(set(colors)) == 12
