"""WithAnyone patches on ComfyUI's own FLUX (real ComfyUI modules, in-process).

The FLUX is one that ComfyUI's loaders accept (hidden 3072, 24 heads, 1 double + 1 single
block, BFL layout, random weights); the same weights run in the core's diffusers host as
the reference for the patched model's output.
"""

from __future__ import annotations

import copy

import pytest
import torch

from support.comfy_env import import_comfyui
from withanyone_core.layout import Layout
from withanyone_core.testing.comfy_models import FLUX_CONFIG, flux_adapter, flux_state

H, W = 64, 96  # pixels: an 8 x 12 latent, 4 x 6 tokens
BOXES = ((4.0, 4.0, 40.0, 44.0), (50.0, 10.0, 90.0, 60.0))


@pytest.fixture(scope="module")
def flux():
    import_comfyui()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    state = flux_state()
    model = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options={"dtype": torch.float32})
    adapter = flux_adapter()
    adapter_patcher = comfy.model_patcher.ModelPatcher(
        adapter,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return model, adapter_patcher, state


@pytest.fixture(scope="module")
def identities():
    g = torch.Generator().manual_seed(3)
    return 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)


def _apply(model, adapter_patcher, identities, **kw):
    from withanyone_pack.nodes.patch import apply_withanyone

    kw.setdefault("siglip_weight", 1.0)  # both branches, so each test exercises both
    return apply_withanyone(model, adapter_patcher, *identities, Layout(W, H, BOXES), **kw)


@pytest.fixture(scope="module", autouse=True)
def patch_module():
    """nodes/patch.py imported inside the pack, as ComfyUI imports it."""
    import importlib

    from support.comfy_env import import_pack

    import_comfyui()
    import_pack()
    return importlib.import_module("withanyone_pack.nodes.patch")


def _forward(patcher, x, sigma, context, y, cond_or_uncond, ref_latents=None):
    """One diffusion-model call with the options ComfyUI's sampler would pass."""
    import comfy.patcher_extension

    options = copy.deepcopy(patcher.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["cond_or_uncond"] = cond_or_uncond
    options["sigmas"] = sigma
    diffusion = patcher.model.diffusion_model
    with torch.no_grad():
        return diffusion(
            x,
            sigma,
            context,
            y=y,
            guidance=torch.full((x.shape[0],), 3.5),
            ref_latents=ref_latents,
            transformer_options=options,
        )


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, H // 8, W // 8, generator=g),
        torch.full((batch,), 0.7),
        torch.randn(batch, 7, 768, generator=g),
        torch.randn(batch, 768, generator=g),
    )


def test_patched_model_equals_diffusers_host(flux, identities):
    from train.models import pack_latents, position_ids
    from withanyone_core.hosts.diffusers import attach_adapter, flux_from_bfl_state

    model, adapter_patcher, state = flux
    patched = _apply(model, adapter_patcher, identities)
    x, sigma, context, y = _inputs(2)
    out = _forward(patched, x, sigma, context, y, cond_or_uncond=[1, 0])  # uncond first, batch of 2

    transformer = flux_from_bfl_state(state, axes_dims_rope=tuple(FLUX_CONFIG["axes_dim"]))
    handle = attach_adapter(transformer, adapter_patcher.model)
    img_ids, txt_ids = position_ids(H, W, 7, "cpu")
    arcface, siglip = identities
    with (
        torch.no_grad(),
        handle.conditioning(
            arcface[None].expand(2, -1, -1),
            siglip[None].expand(2, -1, -1, -1),
            height=H,
            width=W,
            boxes=[list(BOXES)] * 2,
            siglip_weight=1.0,
        ),
    ):
        expected = transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=context,
            pooled_projections=y,
            timestep=sigma,
            guidance=torch.full((2,), 3.5),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
    ours = pack_latents(out)
    rel = (ours - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    base = _forward(model, x, sigma, context, y, cond_or_uncond=[1, 0])
    assert (pack_latents(base) - expected).abs().max() > 1e-3  # the identities did change the output


def test_original_model_untouched_and_clones_share_the_adapter(flux, identities):
    model, adapter_patcher, _ = flux
    x, sigma, context, y = _inputs(1, seed=1)
    before = _forward(model, x, sigma, context, y, [0])
    patched = _apply(model, adapter_patcher, identities)
    assert torch.equal(_forward(model, x, sigma, context, y, [0]), before)
    assert "patches_replace" not in model.model_options["transformer_options"]
    clones = [patched.clone() for _ in range(10)]
    patch = patched.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    for clone in clones:
        assert clone.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)] is patch
        assert clone.additional_models["withanyone"][0].model is adapter_patcher.model  # shared, not copied
    out_clone = _forward(clones[-1], x, sigma, context, y, [0])
    assert torch.equal(out_clone, _forward(patched, x, sigma, context, y, [0]))


def test_kontext_reference_tokens_are_left_alone(flux, identities, monkeypatch):
    from withanyone_core.adapter import IdentityAdapter

    model, adapter_patcher, _ = flux
    patched = _apply(model, adapter_patcher, identities)
    seen = []
    original = IdentityAdapter.block_residual

    def spy(self, block_index, img, inputs):
        seen.append(img.shape[1])
        return original(self, block_index, img, inputs)

    monkeypatch.setattr(IdentityAdapter, "block_residual", spy)
    x, sigma, context, y = _inputs(1, seed=2)
    ref = torch.randn(1, 16, 4, 6)
    out = _forward(patched, x, sigma, context, y, [0], ref_latents=[ref])
    assert out.shape == x.shape
    assert seen == [(H // 16) * (W // 16)] * 2  # only the main image tokens, in both blocks


def test_start_end_percent_window(flux, identities):
    model, adapter_patcher, _ = flux
    x, _, context, y = _inputs(1, seed=3)
    late = _apply(model, adapter_patcher, identities, start_percent=0.5, end_percent=1.0)
    sampling = model.get_model_object("model_sampling")
    early_sigma = torch.tensor([sampling.percent_to_sigma(0.1)])
    assert torch.equal(
        _forward(late, x, early_sigma, context, y, [0]), _forward(model, x, early_sigma, context, y, [0])
    )
    late_sigma = torch.tensor([sampling.percent_to_sigma(0.8)])
    assert not torch.equal(
        _forward(late, x, late_sigma, context, y, [0]), _forward(model, x, late_sigma, context, y, [0])
    )


def test_ksampler_end_to_end_cfg_and_batch(flux, identities):
    import comfy.sample

    model, adapter_patcher, _ = flux
    patched = _apply(model, adapter_patcher, identities)
    g = torch.Generator().manual_seed(5)
    positive = [
        [torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]
    ]
    negative = [
        [torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]
    ]
    latent = torch.zeros(2, 16, H // 8, W // 8)
    noise = torch.randn(latent.shape, generator=g)
    out = comfy.sample.sample(
        patched, noise, 2, 2.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=5
    )
    base = comfy.sample.sample(
        model, noise, 2, 2.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=5
    )
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, base)


def test_not_flux_and_wrong_adapter_are_refused(flux, identities):
    import comfy.model_patcher
    from withanyone_pack.nodes.patch import NotFluxError

    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    model, adapter_patcher, _ = flux
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device="cpu", offload_device="cpu")
    with pytest.raises(NotFluxError, match="needs a FLUX.1 model"):
        _apply(other, adapter_patcher, identities)
    small = comfy.model_patcher.ModelPatcher(
        IdentityAdapter(AdapterConfig(128, 2, 1, 1)), load_device="cpu", offload_device="cpu"
    )
    with pytest.raises(NotFluxError, match="hidden size 3072"):
        _apply(model, small, identities)


def _node_values(identities):
    import sys

    from support.comfy_env import import_pack

    pack = sys.modules.get("withanyone_pack") or import_pack()
    from withanyone_pack.nodes.sampling import WithAnyoneApply, WithAnyoneSampler
    from withanyone_pack.nodes.types import Identities

    ids = Identities(identities[0], identities[1], (1, 1))
    return pack, WithAnyoneApply, WithAnyoneSampler, ids, Layout(W, H, BOXES)


WEIGHTS = dict(siglip_share=0.0, weight_mode="independent", id_weight=1.0, siglip_weight=1.0)


def test_apply_and_sampler_nodes(flux, identities):
    model, adapter_patcher, _ = flux
    _, apply_node, sampler_node, ids, layout = _node_values(identities)
    patched = apply_node.execute(
        model, adapter_patcher, ids, **WEIGHTS, start_percent=0.0, end_percent=1.0, layout=layout
    ).result[0]
    assert "patches_replace" in patched.model_options["transformer_options"]
    with pytest.raises(ValueError, match="layout has 1 face box but 2 identities are connected"):
        apply_node.execute(
            model,
            adapter_patcher,
            ids,
            **WEIGHTS,
            start_percent=0.0,
            end_percent=1.0,
            layout=type(layout)(W, H, BOXES[:1]),
        )
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    latent = sampler_node.execute(
        model,
        cond,
        cond,
        adapter_patcher,
        ids,
        layout,
        seed=3,
        steps=2,
        cfg=1.0,
        sampler_name="euler",
        schedule="withanyone (authors)",
        guidance=4.0,
        batch_size=2,
        **WEIGHTS,
    ).result[0]
    assert latent["samples"].shape == (2, 16, H // 8, W // 8) and torch.isfinite(latent["samples"]).all()


def test_trainer_lora_and_adapter_files_load_in_comfyui(flux, tmp_path):
    """The trainer's checkpoint formats on a FLUX ComfyUI loads: every LoRA key is consumed by
    ComfyUI's LoRA loader and patches the fused BFL weights; the adapter loads as saved."""
    import comfy.lora
    import comfy.lora_convert
    from peft import LoraConfig

    from train.checkpointing import lora_state_for_comfyui
    from withanyone_core.checkpoints.adapter_files import load_adapter, save_adapter
    from withanyone_core.hosts.diffusers import flux_from_bfl_state

    model, adapter_patcher, state = flux
    transformer = flux_from_bfl_state(state, axes_dims_rope=tuple(FLUX_CONFIG["axes_dim"]))
    transformer.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2.0,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2", "proj_mlp", "proj_out"],
        )
    )
    lora = comfy.lora_convert.convert_lora(lora_state_for_comfyui(transformer, alpha=2.0))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
    consumed = {k for k in lora if any(k.startswith(prefix + ".") for prefix in key_map)}
    assert consumed == set(lora)  # no key ComfyUI would ignore
    patched_weights = {k if isinstance(k, str) else k[0] for k in patches}  # (name, slice) for fused qkv
    assert "diffusion_model.double_blocks.0.img_attn.qkv.weight" in patched_weights
    assert "diffusion_model.single_blocks.0.linear1.weight" in patched_weights
    path = tmp_path / "withanyone.safetensors"
    save_adapter(adapter_patcher.model, path)
    assert load_adapter(path).config == adapter_patcher.model.config


def _sample(patcher, seed=11, steps=2):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, H // 8, W // 8)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(
        patcher, noise, steps, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=seed
    )


def _random_lora(seed=0, rank=4):
    """A LoRA in the kohya-style names ComfyUI maps onto FLUX (``lora_unet_*``), on attention and MLP."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, n_in, n_out in (
        ("double_blocks_0_img_attn_proj", 3072, 3072),
        ("double_blocks_0_img_mlp_0", 3072, 12288),
        ("single_blocks_0_linear2", 15360, 3072),
    ):
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) / n_in**0.5
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.2
        lora[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_applied_after_the_apply_node(flux, identities):
    """LoraLoaderModelOnly after Apply WithAnyone: the LoRA takes effect and the identity patches
    survive; the order of the two nodes does not matter."""
    import comfy.sd

    model, adapter_patcher, _ = flux
    lora = _random_lora()
    patched = _apply(model, adapter_patcher, identities)
    lora_after, _ = comfy.sd.load_lora_for_models(patched, None, lora, 1.0, 0.0)
    lora_before, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    lora_first = _apply(lora_before, adapter_patcher, identities)
    assert "patches_replace" in lora_after.model_options["transformer_options"]
    assert not patched.patches and lora_after.patches  # the LoRA went on a clone, not the Apply output
    out_after, out_first = _sample(lora_after), _sample(lora_first)
    assert torch.allclose(out_after, out_first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_after, _sample(patched), atol=1e-3)  # the LoRA changed the result
    assert not torch.allclose(out_after, _sample(lora_before), atol=1e-3)  # and the identities did too


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float8_e4m3fn], ids=["fp16", "fp8_e4m3fn"])
def test_reduced_precision_weights_and_bf16_adapter(flux, identities, weight_dtype):
    """fp16 and fp8 FLUX weights (ComfyUI casts them per layer) with a bf16 adapter: the identity
    residual is computed in the adapter's dtype and returned in the model's, and the result stays
    close to the fp32 one."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    model32, adapter32, state = flux
    model = comfy.sd.load_diffusion_model_state_dict(dict(state), model_options={"dtype": weight_dtype})
    assert model.model.diffusion_model.img_in.weight.dtype == weight_dtype
    adapter = copy.deepcopy(adapter32.model).to(torch.bfloat16)
    adapter_patcher = comfy.model_patcher.ModelPatcher(
        adapter,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    out = _sample(_apply(model, adapter_patcher, identities))
    reference = _sample(_apply(model32, adapter32, identities))
    base = _sample(model)
    assert out.dtype == reference.dtype and torch.isfinite(out).all()
    identity_effect = (reference - _sample(model32)).norm()
    assert (out - reference).norm() < 0.25 * identity_effect  # precision loss is small next to the identities
    assert (out - base).norm() > 0.5 * identity_effect  # and the identities still act


def test_identity_tokens_are_encoded_once_per_sampling_run(flux, identities, monkeypatch):
    """The projectors (~0.6 B parameters at FLUX.1 size) do not run again at every step."""
    from withanyone_core.adapter import IdentityAdapter

    model, adapter_patcher, _ = flux
    calls = []
    original = IdentityAdapter.encode_identities

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IdentityAdapter, "encode_identities", counting)
    patched = _apply(model, adapter_patcher, identities)
    first = _sample(patched, steps=3)
    assert len(calls) == 1
    fresh = _apply(model, adapter_patcher, identities)  # a new Apply: nothing cached yet
    assert torch.equal(_sample(fresh, steps=3), first) and len(calls) == 2


@pytest.mark.parametrize("layout", ["today", "keyword_options", "inserted_argument", "no_options"])
def test_wrapper_finds_its_inputs_by_name_whatever_the_forward_signature(flux, identities, patch_module, layout):
    """Upstream inserts arguments into FLUX's forwards between versions (timestep_zero_index, attention_mask): the
    DIFFUSION_MODEL wrapper reads x, context and transformer_options by the wrapped forward's own names and passes
    every argument on as it came; a call without transformer_options gets a dict of its own."""
    import comfy.patcher_extension

    model, adapter, _ = flux
    patched = _apply(model, adapter, identities)
    wrapper = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]
    wrapper = next(w for ws in wrapper.values() for w in ws if isinstance(w, patch_module.DiffusionModelWrapper))
    key = wrapper.conditioning.key
    seen = {}

    # ComfyUI's own forward signature, default included
    def today(
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},  # noqa: B006
        **kwargs,
    ):
        seen.update(options=transformer_options, state=transformer_options.get(key), y=y, kwargs=kwargs)
        return x

    def inserted(x, timestep, timestep_zero_index, context, y=None, transformer_options=None, attention_mask=None):
        seen.update(
            options=transformer_options,
            state=transformer_options.get(key),
            y=y,
            zero=timestep_zero_index,
            mask=attention_mask,
        )
        return x

    x, context, y = torch.zeros(1, 16, H // 8, W // 8), torch.zeros(1, 7, 768), torch.ones(1, 768)
    sigma = torch.tensor([1.0])
    shared_default = today.__defaults__[-1]
    if layout == "today":
        options = {"sigmas": sigma}
        # through ComfyUI's own executor, as Flux.forward calls its DIFFUSION_MODEL wrappers
        executor = comfy.patcher_extension.WrapperExecutor.new_executor(today, [wrapper])
        executor.execute(x, sigma, context, y, None, None, None, options, extra=1)
        assert seen["kwargs"] == {"extra": 1}
    elif layout == "keyword_options":
        options = {"sigmas": sigma}
        wrapper(today, x, sigma, context, y=y, transformer_options=options)
    elif layout == "inserted_argument":
        options = {"sigmas": sigma}
        wrapper(inserted, x, sigma, "zero", context, y, options, attention_mask="mask")
        assert seen["zero"] == "zero" and seen["mask"] == "mask"
    else:
        options = None
        wrapper(today, x, sigma, context, y=y)
    assert seen["y"] is y and isinstance(seen["state"], patch_module._ForwardState)
    assert seen["state"].text_tokens == 7 and seen["state"].main_tokens == (H // 16) * (W // 16)
    if options is not None:
        assert seen["options"] is options and key not in options  # the call's own dict, cleaned after the call
    assert shared_default == {}  # the signature's default dict was never written
