"""The ComfyUI host: WithAnyone on ComfyUI's own FLUX through supported patches.

``apply_withanyone(model, ...)`` clones the MODEL and adds

- a ``WrappersMP.DIFFUSION_MODEL`` wrapper that sees the real latent ``x`` of every call:
  it derives the token grid (odd latents padded to 2, ``ceil(h/2) x ceil(w/2)``), checks
  the sampling window (start/end percent), prepares the identity tokens and region plan
  once for the whole forward and passes them to the blocks in ``transformer_options``;
- one ``dit`` replace patch per double and single block, which runs the original block
  and adds the adapter's identity residual to the main image tokens only (Kontext
  reference tokens that follow them are left alone). The text length for single blocks
  is read from ``txt`` in the double-block patches.

``forward_orig`` is never replaced. Patch objects are immutable and share the adapter
on deepcopy (ModelPatcher.clone deep-copies model_options), so cloning the patched model
copies no weights and never touches the original MODEL or other graph branches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from withanyone_core.adapter import BlockInputs, IdentityAdapter
from withanyone_core.layout import TokenGrid, build_layout

logger = logging.getLogger(__name__)

STATE_KEY = "withanyone"
WRAPPER_KEY = "withanyone"
PIXELS_PER_LATENT = 8


class NotFluxError(TypeError):
    """The MODEL is not a FLUX.1 model the adapter fits."""


@dataclass(frozen=True)
class IdentityConditioning:
    """What one Apply node asks for; shared (never copied) by every clone of the patched model."""

    adapter_patcher: object  # comfy ModelPatcher holding the IdentityAdapter
    arcface: torch.Tensor  # [n, 512] raw ArcFace embeddings, persons in order
    siglip: torch.Tensor  # [n, 256, 768] SigLIP features
    layout_size: tuple[int, int] | None  # (width, height) the boxes were drawn for
    boxes: tuple[tuple[float, float, float, float], ...] | None
    id_weight: float
    siglip_weight: float
    sigma_start: float
    sigma_end: float
    # identity tokens and region plan per (latent size, batch, device, dtype): the projectors
    # (~0.6 B parameters at FLUX.1 size) run once per sampling run, not once per step
    _prepared: dict = field(default_factory=dict, compare=False, repr=False)

    def __deepcopy__(self, memo):
        return self  # immutable: sharing it keeps the 5 GB adapter from being copied

    @property
    def adapter(self) -> IdentityAdapter:
        return self.adapter_patcher.model

    def active_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def boxes_for(self, height: int, width: int):
        """Boxes in the pixels of the image being sampled (scaled if the layout was drawn at another size)."""
        if self.boxes is None:
            return None
        lw, lh = self.layout_size
        sx, sy = width / lw, height / lh
        return [[(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in self.boxes]]

    def block_inputs(self, x: torch.Tensor) -> tuple[BlockInputs, int]:
        """Identity tokens and region plan for a latent batch ``x`` [B, C, h, w]; returns (inputs, main tokens)."""
        adapter = self.adapter
        param = adapter.ipa_arc[0].to_q.weight
        grid = TokenGrid.for_latent(x.shape[-2], x.shape[-1])
        key = (x.shape[-2], x.shape[-1], x.shape[0], param.device, param.dtype)
        inputs = self._prepared.get(key)
        if inputs is None:
            tokens = adapter.encode_identities(self.arcface[None].to(param.device),
                                               self.siglip[None].to(param.device))
            layout = build_layout(self.boxes_for(x.shape[-2] * PIXELS_PER_LATENT, x.shape[-1] * PIXELS_PER_LATENT),
                                  grid, tokens.num_persons, 1, device=param.device)
            inputs = IdentityAdapter.prepare_from(tokens, layout, self.id_weight, self.siglip_weight)
            inputs = inputs.repeat(x.shape[0])
            if len(self._prepared) >= 4:  # e.g. an offloaded adapter left entries on another device
                self._prepared.clear()
            self._prepared[key] = inputs
        return inputs, grid.num_tokens


@dataclass(frozen=True)
class _ForwardState:
    inputs: BlockInputs
    main_tokens: int


class DiffusionModelWrapper:
    """Sees the real input of each diffusion-model call and prepares the blocks' state."""

    def __init__(self, conditioning: IdentityConditioning):
        self.conditioning = conditioning

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        sigmas = transformer_options.get("sigmas", timestep)
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        if self.conditioning.active_at(sigma):
            inputs, main_tokens = self.conditioning.block_inputs(x)
            transformer_options[STATE_KEY] = _ForwardState(inputs, main_tokens)
        else:
            transformer_options.pop(STATE_KEY, None)
        try:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        finally:
            transformer_options.pop(STATE_KEY, None)
            transformer_options.pop(STATE_KEY + "_txt_len", None)


class DoubleBlockPatch:
    def __init__(self, conditioning: IdentityConditioning, block_index: int):
        self.conditioning, self.block_index = conditioning, block_index

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        out = extra["original_block"](args)
        options = args.get("transformer_options") or {}
        state: _ForwardState | None = options.get(STATE_KEY)
        if state is None:
            return out
        options[STATE_KEY + "_txt_len"] = out["txt"].shape[1]
        img = out["img"]
        n = state.main_tokens
        residual = self.conditioning.adapter.block_residual(self.block_index, img[:, :n], state.inputs)
        out["img"] = torch.cat([img[:, :n] + residual, img[:, n:]], dim=1) if img.shape[1] > n else img + residual
        return out


class SingleBlockPatch:
    def __init__(self, conditioning: IdentityConditioning, block_index: int):
        self.conditioning, self.block_index = conditioning, block_index

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        out = extra["original_block"](args)
        options = args.get("transformer_options") or {}
        state: _ForwardState | None = options.get(STATE_KEY)
        if state is None:
            return out
        txt_len = options.get(STATE_KEY + "_txt_len")
        if txt_len is None:
            raise RuntimeError("WithAnyone: the text length was not recorded by the double blocks; "
                               "another patch may have replaced them")
        img = out["img"]
        start, end = txt_len, txt_len + state.main_tokens
        residual = self.conditioning.adapter.block_residual(self.block_index, img[:, start:end], state.inputs)
        out["img"] = torch.cat([img[:, :start], img[:, start:end] + residual, img[:, end:]], dim=1)
        return out


def flux_blocks(model) -> tuple[int, int, int]:
    """(hidden size, double blocks, single blocks) of a ComfyUI FLUX.1 MODEL, or a clear error."""
    from comfy.ldm.flux.model import Flux

    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion, Flux) or getattr(diffusion.params, "global_modulation", False):
        kind = type(diffusion).__name__ if diffusion is not None else type(model).__name__
        raise NotFluxError(
            f"WithAnyone needs a FLUX.1 model (dev, schnell or a fine-tune of them); this MODEL is {kind}. "
            "Load flux1-dev with Load Diffusion Model / Load Checkpoint and connect that."
        )
    return diffusion.hidden_size, len(diffusion.double_blocks), len(diffusion.single_blocks)


def apply_withanyone(model, adapter_patcher, arcface: torch.Tensor, siglip: torch.Tensor,
                     layout_size: tuple[int, int] | None, boxes, id_weight: float = 1.0,
                     siglip_weight: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of ``model`` carrying the identities; the original is never modified."""
    hidden, n_double, n_single = flux_blocks(model)
    adapter: IdentityAdapter = adapter_patcher.model
    cfg = adapter.config
    if cfg.hidden_size != hidden or cfg.num_blocks != n_double + n_single:
        raise NotFluxError(
            f"this WithAnyone adapter is for {cfg.describe()}, but the MODEL has hidden size {hidden} and "
            f"{n_double} + {n_single} blocks: use the adapter made for this FLUX model"
        )
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")
    sampling = model.get_model_object("model_sampling")
    conditioning = IdentityConditioning(
        adapter_patcher, arcface.detach().float().cpu(), siglip.detach().float().cpu(),
        layout_size, tuple(tuple(float(v) for v in b) for b in boxes) if boxes is not None else None,
        float(id_weight), float(siglip_weight),
        sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent),
    )
    import comfy.patcher_extension

    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 DiffusionModelWrapper(conditioning))
    for i in range(n_double):
        patched.set_model_patch_replace(DoubleBlockPatch(conditioning, i), "dit", "double_block", i)
    for j in range(n_single):
        patched.set_model_patch_replace(SingleBlockPatch(conditioning, n_double + j), "dit", "single_block", j)
    patched.set_additional_models(WRAPPER_KEY, [adapter_patcher])  # loaded/offloaded with the MODEL
    return patched
