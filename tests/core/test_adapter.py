"""The identity adapter: sparse region attention is exact, tokens, batches, gradients."""

import pytest
import torch

from support.reference_flux import _perceiver_ca, reference_mask
from withanyone_core.adapter import AdapterConfig, IdentityAdapter
from withanyone_core.layout import TokenGrid

CFG = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=1, num_single_blocks=1)


def _adapter(seed=0):
    torch.manual_seed(seed)
    adapter = IdentityAdapter(CFG)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "norm" in name or name.endswith(".2.weight") or name.endswith(".2.bias"):
                p.add_(0.3 * torch.randn_like(p))
    return adapter.eval()


def _dense_reference(adapter, block, img, arcface, siglip, boxes, height, width, id_weight, siglip_weight):
    """The reference's computation: dense masks, attention over all tokens."""
    sd = adapter.state_dict()
    b, n = arcface.shape[:2]
    d = CFG.hidden_size
    tokens = adapter.encode_identities(arcface, siglip)
    arc_mask = sig_mask = None
    if boxes is not None:
        arc_mask = reference_mask(boxes, height, width, 8, CFG.num_heads, n)
        sig_mask = reference_mask(boxes, height, width, 264, CFG.num_heads, n)
    out = id_weight * _perceiver_ca(sd, f"ipa_arc.{block}", tokens.arc, img, arc_mask, CFG.num_heads)
    out = out + siglip_weight * _perceiver_ca(sd, f"ipa_sig.{block}", tokens.sig, img, sig_mask, CFG.num_heads)
    assert out.shape == (b, img.shape[1], d)
    return out


@pytest.mark.parametrize(
    "batch,n,boxes,size",
    [
        (1, 1, [[[40, 30, 140, 150]]], (192, 256)),
        (2, 2, [[[0, 0, 100, 100], [60, 60, 200, 190]], [[10.5, 20.7, 90.2, 80.9], [150, 10, 250, 120]]], (192, 256)),
        (1, 3, [[[-30, -30, 80, 80], [50, 50, 120, 160], [100, 0, 300, 100]]], (160, 256)),
        (2, 4, [[[0, 0, 64, 64], [64, 0, 128, 64], [0, 64, 64, 128], [32, 32, 96, 96]]] * 2, (128, 128)),
        (2, 2, None, (128, 160)),
    ],
)
def test_sparse_residual_equals_dense_reference(batch, n, boxes, size):
    adapter = _adapter()
    height, width = size
    grid = TokenGrid.for_pixels(height, width, padded=False)
    img = torch.randn(batch, grid.num_tokens, CFG.hidden_size)
    arcface = 20 * torch.randn(batch, n, 512)
    siglip = torch.randn(batch, n, 256, 768)
    inputs = adapter.prepare(arcface, siglip, grid, boxes, id_weight=0.7, siglip_weight=1.3)
    with torch.no_grad():
        ours = adapter.block_residual(1, img, inputs)
        ref = _dense_reference(adapter, 1, img, arcface, siglip, boxes, height, width, 0.7, 1.3)
    assert (ours - ref).abs().max() <= 1e-5
    if boxes is not None:
        outside = ~inputs.layout.covered
        assert torch.count_nonzero(ours[outside]) == 0  # exactly zero outside every box


def test_tokens_layout_per_person():
    adapter = _adapter()
    arc = 20 * torch.randn(3, 4, 512)
    tokens = adapter.encode_identities(arc, torch.randn(3, 4, 256, 768))
    assert tokens.arc.shape == (3, 4 * 8, 128)
    assert tokens.sig.shape == (3, 4 * 264, 128)
    # person order is kept: person 2's ArcFace tokens depend only on person 2's embedding
    arc2 = arc.clone()
    arc2[:, 2] += 1
    t2 = adapter.encode_identities(arc2, torch.zeros(3, 4, 256, 768))
    t1 = adapter.encode_identities(arc, torch.zeros(3, 4, 256, 768))
    changed = (t1.arc - t2.arc).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(16, 24))
    sig_changed = (t1.sig - t2.sig).abs().amax(dim=(0, 2)) > 0
    assert sig_changed.nonzero().flatten().tolist() == list(range(2 * 264 + 256, 3 * 264))


def test_many_persons_no_fixed_limit():
    adapter = _adapter()
    n = 6
    grid = TokenGrid(4, 4)
    boxes = [[[16 * i % 64, 0, 16 * i % 64 + 16, 64] for i in range(n)]]
    inputs = adapter.prepare(torch.randn(1, n, 512), torch.randn(1, n, 256, 768), grid, boxes)
    assert adapter.block_residual(0, torch.randn(1, 16, 128), inputs).shape == (1, 16, 128)


def test_gradients_reach_adapter_and_image():
    adapter = _adapter().train()
    grid = TokenGrid(4, 4)
    img = torch.randn(2, 16, 128, requires_grad=True)
    inputs = adapter.prepare(
        torch.randn(2, 2, 512), torch.randn(2, 2, 256, 768), grid, [[[0, 0, 32, 32], [32, 32, 64, 64]]] * 2
    )
    adapter.block_residual(0, img, inputs).square().sum().backward()
    assert img.grad.abs().sum() > 0
    for name, p in adapter.named_parameters():
        if name.startswith(("ipa_arc.0", "ipa_sig.0", "arcface_in", "siglip_in")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_weight_branch_is_skipped_and_exact():
    adapter = _adapter()
    grid = TokenGrid(4, 4)
    args = (torch.randn(1, 2, 512), torch.randn(1, 2, 256, 768), grid, [[[0, 0, 32, 32], [32, 32, 64, 64]]])
    img = torch.randn(1, 16, 128)
    both = adapter.block_residual(0, img, adapter.prepare(*args, id_weight=1.0, siglip_weight=1.0))
    arc_only = adapter.block_residual(0, img, adapter.prepare(*args, id_weight=1.0, siglip_weight=0.0))
    sig_only = adapter.block_residual(0, img, adapter.prepare(*args, id_weight=0.0, siglip_weight=1.0))
    assert torch.allclose(both, arc_only + sig_only, atol=1e-6)
    none = adapter.block_residual(0, img, adapter.prepare(*args, id_weight=0.0, siglip_weight=0.0))
    assert torch.count_nonzero(none) == 0


def test_repeat_for_cond_uncond_batches():
    adapter = _adapter()
    grid = TokenGrid(4, 4)
    inputs = adapter.prepare(torch.randn(1, 1, 512), torch.randn(1, 1, 256, 768), grid, [[[0, 0, 32, 32]]])
    img = torch.randn(3, 16, 128)
    res = adapter.block_residual(1, img, inputs.repeat(3))
    single = adapter.block_residual(1, img[1:2], inputs)
    assert torch.allclose(res[1:2], single, atol=1e-6)
    with pytest.raises(ValueError, match="repeat"):
        adapter.block_residual(1, img, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_residual_keeps_image_dtype(dtype):
    adapter = _adapter().to(torch.float32)
    grid = TokenGrid(4, 4)
    inputs = adapter.prepare(torch.randn(1, 1, 512), torch.randn(1, 1, 256, 768), grid, [[[0, 0, 32, 32]]])
    res = adapter.block_residual(0, torch.randn(1, 16, 128, dtype=dtype), inputs)
    assert res.dtype == dtype and torch.isfinite(res).all()


def test_bad_identity_shapes_are_explained():
    adapter = _adapter()
    with pytest.raises(ValueError, match="ArcFace embeddings must have shape"):
        adapter.encode_identities(torch.randn(1, 2, 256), torch.randn(1, 2, 256, 768))
    with pytest.raises(ValueError, match="SigLIP features must have shape"):
        adapter.encode_identities(torch.randn(1, 2, 512), torch.randn(1, 3, 256, 768))
    with pytest.raises(IndexError):
        adapter.block_residual(
            5,
            torch.randn(1, 16, 128),
            adapter.prepare(torch.randn(1, 1, 512), torch.randn(1, 1, 256, 768), TokenGrid(4, 4)),
        )
