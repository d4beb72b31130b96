"""The diffusers host: per-call identities, clean detach, gradients (also with checkpointing)."""

import pytest
import torch

from support.golden import position_ids
from support.make_golden import UNSEEN_CONFIG, random_model
from withanyone_core.checkpoints.adapter_files import load_adapter
from withanyone_core.hosts.diffusers import attach_adapter, flux_from_bfl_state

H, W = 64, 96


@pytest.fixture(scope="module")
def models():
    state = random_model(UNSEEN_CONFIG, torch.Generator().manual_seed(1))
    transformer = flux_from_bfl_state(state, axes_dims_rope=(16, 24, 24))
    adapter = load_adapter(state, num_double_blocks=UNSEEN_CONFIG["depth"])
    return transformer, adapter


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = position_ids(H, W, 5)
    return dict(
        hidden_states=torch.randn(batch, (H // 16) * (W // 16), 64, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, UNSEEN_CONFIG["context_in_dim"], generator=g),
        pooled_projections=torch.randn(batch, UNSEEN_CONFIG["vec_in_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )


def _ids(batch=2, n=2):
    return 20 * torch.randn(batch, n, 512), torch.randn(batch, n, 256, 768)


def test_detach_restores_base_model(models):
    transformer, adapter = models
    with torch.no_grad():
        base = transformer(**_inputs())[0]
        handle = attach_adapter(transformer, adapter)
        assert torch.equal(transformer(**_inputs())[0], base)  # attached but no identities: untouched
        with handle.conditioning(*_ids(), height=H, width=W, boxes=[[[0, 0, 48, 64], [40, 0, 96, 64]]] * 2):
            conditioned = transformer(**_inputs())[0]
        assert not torch.allclose(conditioned, base)
        assert torch.equal(transformer(**_inputs())[0], base)  # context ended
        handle.detach()
        assert torch.equal(transformer(**_inputs())[0], base)
    with pytest.raises(RuntimeError, match="detached"):
        with handle.conditioning(*_ids(), height=H, width=W):
            pass


def test_tokens_outside_boxes_unchanged_in_first_double_block(models):
    transformer, adapter = models
    handle = attach_adapter(transformer, adapter)
    seen = {}

    def probe(module, args, output):
        seen["img"] = output[1].detach().clone()

    hook = transformer.transformer_blocks[0].register_forward_hook(probe)
    try:
        with torch.no_grad():
            transformer(**_inputs(batch=1))
            base = seen.pop("img")
            with handle.conditioning(*_ids(batch=1, n=1), height=H, width=W, boxes=[[[0, 0, 16, 16]]]):
                transformer(**_inputs(batch=1))
    finally:
        hook.remove()
        handle.detach()
    # the identity hook was registered first, so the probe sees the block output plus residual
    changed = (seen["img"] - base).abs().amax(dim=-1)[0]
    assert changed[0] > 0 and torch.count_nonzero(changed[1:]) == 0


def _adapter_grads(transformer, adapter, checkpointing: bool) -> dict[str, torch.Tensor]:
    transformer.requires_grad_(False)
    adapter.train().requires_grad_(True)
    adapter.zero_grad()
    handle = attach_adapter(transformer, adapter)
    if checkpointing:
        handle.enable_gradient_checkpointing()
    try:
        with handle.conditioning(
            *_ids(), height=H, width=W, boxes=[[[0, 0, 48, 64], [40, 0, 96, 64]]] * 2, siglip_weight=1.0
        ):
            loss = transformer(**_inputs())[0].square().mean()
        loss.backward()  # after the conditioning block, as a trainer does: recomputation must keep identities
    finally:
        handle.detach()
        transformer.disable_gradient_checkpointing()
    return {name: p.grad.clone() for name, p in adapter.named_parameters()}


def test_gradients_flow_to_adapter_also_with_checkpointing(models):
    transformer, adapter = models
    torch.manual_seed(0)
    plain = _adapter_grads(transformer, adapter, checkpointing=False)
    torch.manual_seed(0)
    checkpointed = _adapter_grads(transformer, adapter, checkpointing=True)
    for name, grad in plain.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_enabled_on_the_transformer_directly_is_refused(models):
    transformer, adapter = models
    transformer.enable_gradient_checkpointing()
    handle = attach_adapter(transformer, adapter)
    try:
        with pytest.raises(RuntimeError, match="handle.enable_gradient_checkpointing"):
            with handle.conditioning(*_ids(), height=H, width=W):
                pass
        with torch.no_grad(), handle.conditioning(*_ids(), height=H, width=W):
            pass  # inference never checkpoints: allowed
    finally:
        handle.detach()
        transformer.disable_gradient_checkpointing()


def test_mismatched_adapter_is_refused(models):
    transformer, _ = models
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    with pytest.raises(ValueError, match="different FLUX model"):
        attach_adapter(transformer, IdentityAdapter(AdapterConfig(192, 3, 2, 2)))
    with pytest.raises(ValueError, match="hidden size"):
        attach_adapter(transformer, IdentityAdapter(AdapterConfig(128, 2, 1, 2)))


def test_kontext_reference_tokens_get_no_residual(models, monkeypatch):
    """A Kontext pipeline appends reference latents to ``hidden_states`` (ids (1, row, col)): the residual goes to
    the main image's tokens only, in every block, and the identity K/V is computed once for the whole
    sampling loop run inside one ``conditioning`` block."""
    from withanyone_core.adapter import IdentityAdapter, IdentityCrossAttention

    transformer, adapter = models
    handle = attach_adapter(transformer, adapter)
    seen, kv_calls = [], []
    original, original_kv = IdentityAdapter.block_residual, IdentityCrossAttention.identity_kv
    monkeypatch.setattr(
        IdentityAdapter,
        "block_residual",
        lambda self, i, img, inputs: seen.append(img.shape[1]) or original(self, i, img, inputs),
    )
    monkeypatch.setattr(
        IdentityCrossAttention, "identity_kv", lambda self, *a: kv_calls.append(1) or original_kv(self, *a)
    )
    inputs = _inputs(batch=1)
    main = inputs["hidden_states"].shape[1]
    ref_rows, ref_cols = 2, 3
    ref_ids = torch.zeros(ref_rows, ref_cols, 3)
    ref_ids[..., 0] = 1
    ref_ids[..., 1] = torch.arange(ref_rows)[:, None]
    ref_ids[..., 2] = torch.arange(ref_cols)[None, :]
    reference = torch.randn(1, ref_rows * ref_cols, 64, generator=torch.Generator().manual_seed(4))
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], reference], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids.reshape(-1, 3)], dim=0)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    with (
        torch.no_grad(),
        handle.conditioning(
            *_ids(batch=1), height=H, width=W, boxes=[[[0, 0, 48, 64], [40, 0, 96, 64]]], siglip_weight=1.0
        ),
    ):
        first = transformer(**inputs)[0]
        second = transformer(**inputs)[0]  # a second step of the same run
    handle.detach()
    assert seen == [main] * (2 * blocks)
    assert len(kv_calls) == 2 * blocks  # once per block and branch, not once per step
    assert first.shape[1] == main + ref_rows * ref_cols and torch.equal(first, second)
