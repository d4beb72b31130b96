"""Layout -> token membership: vectorised, exact against the reference's loop-built mask."""

import random

import pytest
import torch

from reference_flux import reference_mask
from withanyone_core.layout import TokenGrid, box_token_ranges, boxes_membership, build_layout


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
