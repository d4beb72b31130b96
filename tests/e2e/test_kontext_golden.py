"""Parity with the authors' Kontext model (WithAnyone.Ke) on golden data.

Discovers every ``*_ke.json`` with ``"model": "withanyone_kontext"`` in
``WITHANYONE_GOLDEN_DIR`` (default ../shared/golden), loads its model file through the
pack's own loaders, and per case checks ``output[:, :L]`` (max |error| <= 1e-4) and the
region mask (exactly). One test per case.

Both hosts run every case:

- ComfyUI's own Flux (``comfy.ldm.flux.model.Flux``, built at the set's size from its BFL
  keys by the running ComfyUI's model detection and model config, as its loaders do) with the pack's Apply patches and the adapter loaded by
  the pack's ComfyUI loader (manual-cast layers). The reference image goes in as
  ``ref_latents``, so ComfyUI builds the reference tokens and their ids (1, row, col) itself,
  as it does for a user's ReferenceLatent: this is the path the pack's face-edit workflow runs.
- diffusers' ``FluxTransformer2DModel`` (withanyone_core.hosts.diffusers, the training and
  headless host), given the reference tokens appended to ``hidden_states`` and their ids.

The Apply node gives one layout to a whole batch; a case whose batch items have different
boxes runs item by item in ComfyUI (the items do not interact) and as one batch in diffusers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from support.comfy_env import import_comfyui
from support.golden import golden_dir
from withanyone_core.checkpoints.adapter_files import load_adapter
from withanyone_core.checkpoints.reading import load_safetensors
from withanyone_core.host import IdentityRequest, IdentityRun
from withanyone_core.layout import Layout, TokenGrid, batch_layouts

TOLERANCE = 1e-4
MODEL_KIND = "withanyone_kontext"


@dataclass(frozen=True)
class KontextSet:
    name: str
    spec: dict
    cases_path: Path
    model_path: Path


def discover() -> list[KontextSet]:
    root = golden_dir()
    sets = []
    for path in sorted(root.glob("*_ke.json")):
        spec = json.loads(path.read_text())
        if spec.get("model") != MODEL_KIND:
            continue
        name = path.name[: -len("_ke.json")]
        sets.append(KontextSet(name, spec, root / f"{name}_ke.safetensors", root / f"{name}_ke_model.safetensors"))
    return sets


SETS = discover()
CASES = [(s, c) for s in SETS for c in s.spec.get("cases", {})]


def _unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[B, rows*cols, C*4]`` packed tokens -> ``[B, C, 2*rows, 2*cols]`` latents (the authors' packing)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, rows, cols, d // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, rows * 2, cols * 2)


def _pack(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _grid_ids(rows: int, cols: int, index: float) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


@functools.lru_cache(maxsize=1)
def _pack_modules():
    import importlib
    import sys

    import_comfyui()
    from support.comfy_env import import_pack

    pack = sys.modules.get("withanyone_pack") or import_pack()
    for name in ("nodes.loaders", "nodes.patch"):
        importlib.import_module(f"withanyone_pack.{name}")
    return pack


class KontextModels:
    """One set's model in both hosts, loaded through the pack's loaders."""

    def __init__(self, gset: KontextSet):
        pack = _pack_modules()  # puts ComfyUI on sys.path
        import comfy.model_detection
        import comfy.model_patcher

        from withanyone_core.hosts.diffusers import attach_adapter, flux_from_bfl_state

        cfg = gset.spec["config"]
        state = load_safetensors(gset.model_path)
        flux_keys = {k: v for k, v in state.items() if not k.startswith(("ipa.", "arcface_in.", "siglip_in."))}
        # ComfyUI's Flux built as its own loader builds one: the running ComfyUI's model detection reads the
        # config from the keys (and adds the fields its FluxParams needs, e.g. txt_ids_dims since 0.4), the model
        # config converts the keys (BFL QK-norm `.scale` -> `.weight` since 0.14). Detection fixes FLUX.1's head
        # layout (24 heads of 16+56+56), which no key shows: the set's head layout replaces it.
        unet_config = comfy.model_detection.detect_unet_config(flux_keys, "")
        assert unet_config is not None and unet_config.get("image_model") == "flux", "ComfyUI does not see a FLUX"
        unet_config.update({k: cfg[k] for k in ("num_heads", "axes_dim", "theta", "mlp_ratio", "qkv_bias")})
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config, flux_keys)
        model_config.set_inference_dtype(torch.float32, None)
        comfy_keys = model_config.process_unet_state_dict(dict(flux_keys))
        base = model_config.get_model(comfy_keys)
        base.diffusion_model.load_state_dict(comfy_keys, strict=True)  # every key, nothing left at random
        self.comfy_model = comfy.model_patcher.ModelPatcher(base, load_device="cpu", offload_device="cpu")
        self.comfy_adapter = pack.nodes.loaders.load_adapter_patcher(str(gset.model_path), "fp32")
        self.patch = pack.nodes.patch

        self.adapter = load_adapter(state).eval()
        self.transformer = flux_from_bfl_state(flux_keys, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
        self.handle = attach_adapter(self.transformer, self.adapter)
        self.tensors = load_safetensors(gset.cases_path)

    def case_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {k[len(name) + 1 :]: v for k, v in self.tensors.items() if k.startswith(name + ".")}

    # ------------------------------------------------------------------ ComfyUI
    def comfy_forward(self, t: dict, case: dict, items: slice, boxes) -> torch.Tensor:
        import copy

        import comfy.patcher_extension

        rows, cols = case["height"] // 16, case["width"] // 16
        ref_rows, ref_cols = case["ref_height"] // 16, case["ref_width"] // 16
        x = _unpack(t["img"][items], rows, cols)
        ref = _unpack(t["img_cond_seq"][items], ref_rows, ref_cols)
        model = self.comfy_model
        if case["with_identities"] and case["num_ids"] > 0:
            model = self.patch.apply_withanyone(
                model,
                self.comfy_adapter,
                t["arcface_embeddings"][items],
                None,
                None if boxes is None else Layout(case["width"], case["height"], boxes),
                id_weight=case["id_weight"],
                siglip_weight=0.0,
            )
        options = copy.deepcopy(model.model_options.get("transformer_options", {}))
        comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
        options["cond_or_uncond"] = [0]
        timesteps = t["timesteps"][items]
        options["sigmas"] = timesteps
        with torch.no_grad():
            out = model.model.diffusion_model(
                x,
                timesteps,
                t["txt"][items],
                y=t["y"][items],
                guidance=t["guidance"][items],
                ref_latents=[ref],
                transformer_options=options,
            )
        return _pack(out)

    # ----------------------------------------------------------------- diffusers
    def diffusers_forward(self, t: dict, case: dict, boxes) -> torch.Tensor:
        length = t["img"].shape[1]
        kwargs = dict(
            hidden_states=torch.cat([t["img"], t["img_cond_seq"]], dim=1),
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            guidance=t["guidance"],
            img_ids=torch.cat([t["img_ids"][0], t["img_cond_seq_ids"][0]], dim=0),
            txt_ids=t["txt_ids"][0],
            return_dict=False,
        )
        with torch.no_grad():
            if case["with_identities"] and case["num_ids"] > 0:
                with self.handle.conditioning(
                    t["arcface_embeddings"],
                    None,
                    height=case["height"],
                    width=case["width"],
                    boxes=boxes,
                    id_weight=case["id_weight"],
                ):
                    out = self.transformer(**kwargs)[0]
            else:
                out = self.transformer(**kwargs)[0]
        return out[:, :length]


@functools.lru_cache(maxsize=2)
def _models(set_name: str) -> KontextModels:
    return KontextModels(next(s for s in SETS if s.name == set_name))


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """The models (ComfyUI patchers among them) go when the module's tests are done, not at interpreter exit."""
    yield
    _models.cache_clear()


def test_kontext_golden_data_found():
    assert SETS, "no *_ke.json (model withanyone_kontext) found: set WITHANYONE_GOLDEN_DIR to the golden folder"
    assert CASES


def _check_format(t: dict, case: dict) -> None:
    """The case is in the documented format (ids as the authors build them), so a mismatch below is ours."""
    rows, cols = case["height"] // 16, case["width"] // 16
    ref_rows, ref_cols = case["ref_height"] // 16, case["ref_width"] // 16
    b = case["batch"]
    assert t["img"].shape[:2] == (b, rows * cols) == (b, case["image_tokens"])
    assert t["img_cond_seq"].shape[:2] == (b, ref_rows * ref_cols) == (b, case["ref_tokens"])
    assert torch.equal(t["img_ids"], _grid_ids(rows, cols, 0).expand(b, -1, -1))
    assert torch.equal(t["img_cond_seq_ids"], _grid_ids(ref_rows, ref_cols, 1).expand(b, -1, -1))
    assert not t["txt_ids"].any()


@pytest.mark.parametrize("gset,case", CASES, ids=[f"{s.name}:{c}" for s, c in CASES])
def test_kontext_case_matches_reference(gset, case):
    spec = gset.spec["cases"][case]
    models = _models(gset.name)
    assert models.adapter.config.variant == "ke" and models.comfy_adapter.model.config.variant == "ke"
    t = models.case_tensors(case)
    _check_format(t, spec)
    length = spec["image_tokens"]
    expected = t["output"][:, :length]
    boxes = spec["bboxes"] if spec["use_mask"] else None

    if boxes is not None and "mask" in t:  # the region plan the host contract builds for these boxes
        layout = batch_layouts(boxes, spec["width"], spec["height"])
        run = IdentityRun(models.adapter, IdentityRequest(t["arcface_embeddings"], None, layout))
        plan = run.inputs(TokenGrid(spec["height"] // 16, spec["width"] // 16), spec["batch"], "cpu")
        mask = plan.layout.token_mask(models.adapter.config.arc_tokens)
        assert mask.shape == t["mask"].shape
        assert torch.equal(mask, t["mask"].bool()), f"{int((mask != t['mask'].bool()).sum())} mask entries differ"

    ours = models.diffusers_forward(t, spec, boxes)
    err = (ours - expected).abs().max().item()
    assert err <= TOLERANCE, f"{case} (diffusers host): max |error| {err:.3g} > {TOLERANCE}"

    batch = spec["batch"]
    if boxes is None or all(item == boxes[0] for item in boxes):
        shared = None if boxes is None or boxes[0] is None else boxes[0]
        comfy_out = models.comfy_forward(t, spec, slice(0, batch), shared)
    else:
        comfy_out = torch.cat([models.comfy_forward(t, spec, slice(i, i + 1), boxes[i]) for i in range(batch)])
    err = (comfy_out - expected).abs().max().item()
    assert err <= TOLERANCE, f"{case} (ComfyUI Flux + pack patches): max |error| {err:.3g} > {TOLERANCE}"
