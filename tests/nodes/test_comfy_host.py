"""The adapter as a ComfyUI-managed model (real ComfyUI modules, in-process, CPU).

Partial loading, fp16 streams, fp8 storage, identity K/V once per run, nothing cached after a
run, and coexistence with other block patches, EasyCache and a second Apply WithAnyone. The
FLUX is one ComfyUI's loaders accept (hidden 3072, 1 + 1 blocks, random weights); the adapter
is saved to a file and loaded through the pack's own loader (ComfyUI's manual-cast layers).
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from support.comfy_env import import_comfyui
from withanyone_core.layout import Layout
from withanyone_core.testing.comfy_models import flux_adapter, flux_state

H, W = 64, 96
BOXES = ((4.0, 4.0, 40.0, 44.0), (50.0, 10.0, 90.0, 60.0))


@pytest.fixture(scope="module")
def pack():
    import_comfyui()
    import importlib
    import sys

    from support.comfy_env import import_pack

    pack = sys.modules.get("withanyone_pack") or import_pack()
    for name in ("nodes.loaders", "nodes.patch", "nodes.sampling"):
        importlib.import_module(f"withanyone_pack.{name}")
    return pack


@pytest.fixture(scope="module")
def flux(pack):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(flux_state()), model_options={"dtype": torch.float32})


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    from withanyone_core.checkpoints.adapter_files import save_adapter

    path = tmp_path_factory.mktemp("adapter") / "withanyone.safetensors"
    save_adapter(flux_adapter(), path)
    return path


@pytest.fixture(scope="module")
def identities():
    g = torch.Generator().manual_seed(3)
    return 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)


def _load(pack, path, dtype="default"):
    return pack.nodes.loaders.load_adapter_patcher(str(path), dtype)


def _apply(pack, model, adapter, identities, boxes=BOXES, **kw):
    kw.setdefault("siglip_weight", 1.0)
    arcface, siglip = identities
    layout = None if boxes is None else Layout(W, H, boxes)
    return pack.nodes.patch.apply_withanyone(model, adapter, arcface, siglip, layout, **kw)


def _sample(patcher, seed=11, steps=3):
    import comfy.sample

    from withanyone_core.recipe import authors_sigmas

    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 4.0}]]
    latent = torch.zeros(1, 16, H // 8, W // 8)
    noise = torch.randn(latent.shape, generator=g)
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(
        patcher,
        noise,
        1.0,
        sampler,
        authors_sigmas(steps, H // 8, W // 8),
        cond,
        cond,
        latent,
        disable_pbar=True,
        seed=seed,
    )


def test_loader_uses_comfy_cast_layers_and_follows_the_model_dtype(pack, adapter_file):
    import comfy.ops

    patcher = _load(pack, adapter_file)
    adapter = patcher.model
    assert isinstance(adapter.ipa_arc[0].to_q, comfy.ops.manual_cast.Linear)
    assert isinstance(adapter.ipa_arc[0].norm2, comfy.ops.manual_cast.LayerNorm)
    assert adapter.weight_dtype == torch.float32  # CPU: fp32 (bf16 where the GPU supports it)
    fp8 = _load(pack, adapter_file, "fp8_e4m3fn").model
    assert fp8.weight_dtype == torch.float8_e4m3fn
    assert fp8.ipa_arc[0].norm2.weight.dtype == torch.bfloat16  # norms are never fp8
    bf16_bytes = sum(p.numel() * p.element_size() for p in _load(pack, adapter_file, "bf16").model.parameters())
    fp8_bytes = sum(p.numel() * p.element_size() for p in fp8.parameters())
    assert fp8_bytes < 0.51 * bf16_bytes


def test_adapter_and_siglip_get_the_patcher_class_comfyui_gives_its_own_models(
    pack, adapter_file, tmp_path, monkeypatch
):
    """ComfyUI started with dynamic VRAM rebinds comfy.model_patcher.CoreModelPatcher (to ModelPatcherDynamic, as
    its main.py does when comfy-aimdo works) and builds CLIP vision and ControlNets with it: so do the loaders.
    A ComfyUI without CoreModelPatcher (before 0.17) gets ModelPatcher."""
    import comfy.model_patcher

    from withanyone_core.testing.siglip import build_tiny_siglip

    class Rebound(comfy.model_patcher.ModelPatcher):  # stands in for ModelPatcherDynamic, which needs a GPU
        pass

    build_tiny_siglip(tmp_path / "tiny-siglip", hidden_size=768)
    monkeypatch.setattr(pack.nodes.loaders, "resolve_siglip", lambda name: str(tmp_path / name))
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Rebound, raising=False)
    assert type(_load(pack, adapter_file)) is Rebound
    siglip = pack.nodes.loaders.WithAnyoneSiglipLoader.execute("tiny-siglip").result[0]
    assert type(siglip.patcher) is Rebound
    monkeypatch.delattr(comfy.model_patcher, "CoreModelPatcher")
    assert type(_load(pack, adapter_file)) is comfy.model_patcher.ModelPatcher
    siglip = pack.nodes.loaders.WithAnyoneSiglipLoader.execute("tiny-siglip").result[0]
    assert type(siglip.patcher) is comfy.model_patcher.ModelPatcher


def test_partial_load_gives_the_same_latent_as_a_full_load(pack, flux, adapter_file, identities, monkeypatch):
    """ComfyUI's lowvram path (ModelPatcher.load with a memory budget) leaves most adapter modules offloaded
    with cast-on-use weights; sampling must match a full load. The CPU has no VRAM budget, so ComfyUI
    would load fully: the test wraps load_models_gpu to re-load the adapter with a budget of 30 % of its
    size, which is exactly what ComfyUI does on a card where it does not fit."""
    import comfy.model_management as mm

    full = _sample(_apply(pack, flux, _load(pack, adapter_file), identities))
    adapter = _load(pack, adapter_file)
    budget = int(0.3 * adapter.model_size())
    original = mm.load_models_gpu
    partial_states = []

    def load_then_partial(models, *args, **kwargs):
        result = original(models, *args, **kwargs)
        if adapter in models:
            adapter.load(mm.get_torch_device(), lowvram_model_memory=budget)
            offloaded = [m for m in adapter.model.modules() if getattr(m, "prev_comfy_cast_weights", None) is not None]
            partial_states.append((adapter.model.model_lowvram, len(offloaded)))
        return result

    monkeypatch.setattr(mm, "load_models_gpu", load_then_partial)
    partial = _sample(_apply(pack, flux, adapter, identities))
    assert partial_states and all(lowvram and count > 0 for lowvram, count in partial_states)
    assert torch.allclose(partial, full, atol=1e-6, rtol=1e-6)


def test_streams_beyond_fp16_range_stay_finite(pack, adapter_file, identities):
    """FLUX streams exceed fp16's range. (a) A bf16 MODEL whose stream holds values of 2e5 with an adapter
    stored in fp16 (--fp16-unet): the first release cast the stream to the adapter's fp16 before its
    LayerNorm (inf, then NaN); now the norm runs in float32 on an upcast copy and the projections in the
    MODEL's bf16. (b) An fp16 MODEL whose stream sits at fp16's limit: the sum is clamped as ComfyUI's FLUX
    clamps its own stream."""
    from withanyone_core.host import IdentityRequest, IdentityRun
    from withanyone_core.layout import TokenGrid

    adapter = _load(pack, adapter_file, "fp16").model
    grid = TokenGrid.for_pixels(H, W)
    run = IdentityRun(adapter, IdentityRequest(identities[0], identities[1], Layout(W, H, BOXES), 1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    stream = torch.randn(1, grid.num_tokens, 3072, generator=g) * 2e4
    stream[0, :, :16] = 2e5  # beyond fp16's 65504

    bf16 = stream.to(torch.bfloat16)
    out = run.add_residual(0, bf16, run.inputs(grid, 1, "cpu", torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    expected = adapter.block_residual(0, stream, run.inputs(grid, 1, "cpu", torch.float32))
    residual = adapter.block_residual(0, bf16, run.inputs(grid, 1, "cpu", torch.bfloat16))
    assert (residual.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    naive = torch.nn.functional.layer_norm(bf16.to(torch.float16)[:, :8], (3072,))  # the first release's cast
    assert not torch.isfinite(naive).all()

    fp16 = stream.clamp(-65504, 65504).to(torch.float16)
    out16 = run.add_residual(0, fp16, run.inputs(grid, 1, "cpu", torch.float16))
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()


def test_fp8_storage_runs_within_a_stated_error(pack, flux, adapter_file, identities, caplog):
    """fp8 (e4m3fn) adapter weights, scaled per tensor and cast on use: the latent stays within 10 % of the
    identities' own effect of the fp32 result (measured 0.057; unscaled e4m3fn, where these small weights fall
    into its subnormals, gave 0.12; bf16: 0.004); the numbers go to the log."""
    reference = _sample(_apply(pack, flux, _load(pack, adapter_file, "fp32"), identities))
    base = _sample(flux)
    effect = (reference - base).norm()
    errors = {}
    for dtype in ("bf16", "fp8_e4m3fn"):
        out = _sample(_apply(pack, flux, _load(pack, adapter_file, dtype), identities))
        assert torch.isfinite(out).all()
        errors[dtype] = float((out - reference).norm() / effect)
    logging.getLogger(__name__).info("adapter storage error relative to the identity effect: %s", errors)
    assert errors["bf16"] < 0.02
    assert errors["fp8_e4m3fn"] < 0.10


def test_identity_kv_once_per_run_and_nothing_cached_after(pack, flux, adapter_file, identities, monkeypatch):
    from withanyone_core import host
    from withanyone_core.adapter import IdentityCrossAttention

    runs, kv_calls, kv_refs = [], [], []
    original_init, original_kv = host.IdentityRun.__init__, IdentityCrossAttention.identity_kv

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        runs.append(self)

    def kv(self, id_tokens, dtype):
        out = original_kv(self, id_tokens, dtype)
        kv_calls.append(1)
        kv_refs.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(host.IdentityRun, "__init__", init)
    monkeypatch.setattr(IdentityCrossAttention, "identity_kv", kv)
    patched = _apply(pack, flux, _load(pack, adapter_file), identities)
    _sample(patched, steps=4)
    assert len(runs) == 1 and runs[0].encode_count == 1
    assert len(kv_calls) == 4  # 2 blocks x 2 branches, for 4 steps
    assert runs[0].cached_tensors == 0  # released when sampling ended
    gc.collect()
    assert all(ref() is None for ref in kv_refs)  # no K/V tensor survives the run
    _sample(patched, steps=2)  # a second run of the same MODEL starts afresh
    assert len(runs) == 2 and len(kv_calls) == 8


def _pulid_style_patch(calls, scale=0.3):
    """Stands in for PuLID-Flux's double-block patch: runs the block, adds its own image residual, and is set with
    set_model_patch_replace (replacing whatever was there). The real pack cannot run here (it needs its own
    EVA-CLIP and insightface models); what matters to coexistence is this calling convention."""

    direction = torch.randn(3072, generator=torch.Generator().manual_seed(7))  # not constant: survives LayerNorm

    def patch(args, extra):
        out = extra["original_block"](args)
        calls.append(1)
        out["img"] = out["img"] + scale * out["img"].std() * direction.to(out["img"])
        return out

    return patch


def test_coexists_with_a_pulid_style_patch_before_and_after(pack, flux, adapter_file, identities):
    adapter = _load(pack, adapter_file)
    calls = []
    base = _sample(flux)
    only_ids = _sample(_apply(pack, flux, adapter, identities))
    pulid = flux.clone()
    pulid.set_model_patch_replace(_pulid_style_patch(calls), "dit", "double_block", 0)
    only_pulid = _sample(pulid)
    assert calls and not torch.allclose(only_pulid, base, atol=1e-3)

    calls.clear()
    before = _sample(_apply(pack, pulid, adapter, identities))  # PuLID first, then WithAnyone
    assert calls, "the patch that was already there must keep running"
    after_model = _apply(pack, flux, adapter, identities)
    after_model.set_model_patch_replace(_pulid_style_patch(calls), "dit", "double_block", 0)
    calls.clear()
    after = _sample(after_model)  # PuLID replaced WithAnyone's double-block patch: both still act
    assert calls
    for both in (before, after):
        assert not torch.allclose(both, only_pulid, atol=1e-4)  # the identities act
        assert not torch.allclose(both, only_ids, atol=1e-4)  # and so does the other patch
    assert torch.allclose(before, after, atol=1e-5)  # same order either way: the other patch's block, then ids


def test_two_apply_nodes_add_their_people(pack, flux, adapter_file, identities):
    """Apply(person 1) then Apply(person 2) with disjoint boxes equals one Apply with both people."""
    adapter = _load(pack, adapter_file)
    arcface, siglip = identities
    both = _sample(_apply(pack, flux, adapter, identities))
    first = _apply(pack, flux, adapter, (arcface[:1], siglip[:1]), boxes=BOXES[:1])
    stacked = _apply(pack, first, adapter, (arcface[1:], siglip[1:]), boxes=BOXES[1:])
    loaded = stacked.get_additional_models_with_key("withanyone")
    assert len(loaded) == 1 and loaded[0].model is adapter.model  # the adapter is loaded once
    assert torch.allclose(_sample(stacked), both, atol=1e-5)
    assert not torch.allclose(_sample(first), both, atol=1e-4)


def test_easycache_keeps_working_with_identities(pack, flux, adapter_file, identities):
    from comfy_extras.nodes_easycache import EasyCacheNode

    adapter = _load(pack, adapter_file)
    patched = _apply(pack, flux, adapter, identities)
    cached = EasyCacheNode.execute(
        patched.clone(), reuse_threshold=0.2, start_percent=0.0, end_percent=1.0, verbose=False
    ).result[0]
    cached_base = EasyCacheNode.execute(
        flux.clone(), reuse_threshold=0.2, start_percent=0.0, end_percent=1.0, verbose=False
    ).result[0]
    out, out_base = _sample(cached, steps=6), _sample(cached_base, steps=6)
    assert torch.isfinite(out).all()
    assert (out - out_base).norm() > 0.5 * (_sample(patched, steps=6) - _sample(flux, steps=6)).norm()


def test_sampler_node_reports_progress_previews_and_stops_on_interrupt(
    pack, flux, adapter_file, identities, monkeypatch
):
    """The WithAnyone sampler drives ComfyUI's progress bar with a latent preview at every step (as the stock
    KSampler does; the server forwards both to the browser) and stops at the next step on an interrupt."""
    import comfy.model_management as mm
    import comfy.utils
    import latent_preview
    from withanyone_pack.nodes.types import Identities

    monkeypatch.setattr(latent_preview.args, "preview_method", latent_preview.LatentPreviewMethod.Latent2RGB)
    updates = []
    monkeypatch.setattr(
        comfy.utils,
        "PROGRESS_BAR_HOOK",
        lambda value, total, preview, node_id=None: updates.append((value, total, preview)),
    )
    node = pack.nodes.sampling.WithAnyoneSampler
    cond = [[torch.randn(1, 7, 768), {"pooled_output": torch.randn(1, 768)}]]
    args = dict(
        model=flux,
        positive=cond,
        negative=cond,
        adapter=_load(pack, adapter_file),
        identities=Identities(identities[0], identities[1], (1, 1)),
        layout=Layout(W, H, BOXES),
        seed=1,
        steps=3,
        cfg=1.0,
        sampler_name="euler",
        schedule="withanyone (authors)",
        guidance=4.0,
        batch_size=1,
        siglip_share=0.0,
        weight_mode="share",
        id_weight=1.0,
        siglip_weight=0.0,
    )
    node.execute(**args)
    assert [(v, t) for v, t, _ in updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(p is not None for _, _, p in updates)  # a preview image with every step

    def interrupt(value, total, preview, node_id=None):
        mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(**{**args, "steps": 4})
    finally:
        mm.interrupt_current_processing(False)
