"""The host contract (withanyone_core.host): layout rescaling, per-run caching and its lifetime, main tokens only."""

import pytest
import torch

from withanyone_core.adapter import AdapterConfig, IdentityAdapter
from withanyone_core.host import IdentityRequest, IdentityRun
from withanyone_core.layout import Layout, TokenGrid, rescale_boxes

CFG = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=1, num_single_blocks=1)


def test_rescale_is_uniform_and_centred():
    # the authors' resize_bbox maps their 512 x 512 layouts into W x H this way (without their int truncation)
    assert rescale_boxes([[96, 96, 288, 288]], (512, 512), (1024, 1024)) == [[192, 192, 576, 576]]
    ((x1, y1, x2, y2),) = rescale_boxes([[0, 0, 512, 512]], (512, 512), (1024, 768))
    assert (x2 - x1, y2 - y1) == (768, 768) and (x1, y1) == (128, 0)  # square kept, centred horizontally
    with pytest.raises(ValueError, match="positive"):
        rescale_boxes([[0, 0, 1, 1]], (0, 512), (512, 512))


def test_request_boxes_for_another_size():
    req = IdentityRequest(torch.zeros(1, 512), None, Layout(512, 512, ((0, 0, 256, 256),)))
    assert req.boxes_for((512, 512)) == [[[0.0, 0.0, 256.0, 256.0]]]
    assert req.boxes_for((1024, 512)) == [[[256.0, 0.0, 512.0, 256.0]]]
    assert IdentityRequest(torch.zeros(1, 512), None).boxes_for((64, 64)) is None


def test_run_caches_for_the_run_and_releases_everything():
    torch.manual_seed(0)
    adapter = IdentityAdapter(CFG).eval()
    req = IdentityRequest(
        20 * torch.randn(2, 512), torch.randn(2, 256, 768), Layout(64, 32, ((0, 0, 32, 32), (32, 0, 64, 32))), 1.0, 1.0
    )
    run = IdentityRun(adapter, req)
    grid = TokenGrid.for_pixels(32, 64)
    img = torch.randn(2, grid.num_tokens + 5, 128)  # 5 reference tokens after the main image
    with torch.no_grad():
        inputs = run.inputs(grid, 2, "cpu")
        assert run.inputs(grid, 2, "cpu") is inputs  # the same plan for every step
        out = run.add_residual(0, img, inputs)
        again = run.add_residual(0, img, inputs)
    assert torch.equal(out, again) and run.encode_count == 1
    assert torch.equal(out[:, grid.num_tokens :], img[:, grid.num_tokens :])  # reference tokens untouched
    assert not torch.equal(out[:, : grid.num_tokens], img[:, : grid.num_tokens])
    assert run.cached_tensors > 0
    run.release()
    assert run.cached_tensors == 0


def test_per_image_identities_serve_a_cond_uncond_batch():
    """Identities and boxes given per image serve a batch that repeats those images (cond + uncond)."""
    torch.manual_seed(1)
    adapter = IdentityAdapter(CFG).eval()
    arcface, siglip = 20 * torch.randn(2, 1, 512), torch.randn(2, 1, 256, 768)  # one person, two images
    run = IdentityRun(adapter, IdentityRequest(arcface, siglip, [Layout(32, 32, [(0, 0, 16, 16)]), None], 1.0, 0.5))
    grid = TokenGrid.for_pixels(32, 32)  # 2 x 2 tokens; the box covers token 0 only
    img = torch.randn(2, grid.num_tokens, 128).repeat(2, 1, 1)  # images 0, 1, 0, 1
    with torch.no_grad():
        out = run.add_residual(1, img, run.inputs(grid, 4, "cpu"))
    assert torch.equal(out[2:], out[:2])  # the copies get the same residual
    assert not torch.equal(out[0, 0], img[0, 0]) and torch.equal(out[0, 1:], img[0, 1:])  # image 0: its box only
    assert (out[1] != img[1]).any(dim=-1).all()  # image 1 has no layout: every token sees the person
    with pytest.raises(ValueError, match="cannot serve a batch of 3"):
        run.inputs(grid, 3, "cpu")
