"""The ComfyUI host: WithAnyone on ComfyUI's own FLUX through supported patches.

A thin adapter over the core's host contract (:mod:`withanyone_core.host`).
``apply_withanyone(model, ...)`` clones the MODEL and adds

- an ``OUTER_SAMPLE`` wrapper that opens one :class:`IdentityRun` per sampling run and
  releases it when the run ends (identity tokens, region plans and each block's identity
  keys/values are computed once per run and nothing is kept afterwards);
- a ``DIFFUSION_MODEL`` wrapper that sees the real latent ``x`` of every call: it derives
  the token grid (odd latents padded to 2, ``ceil(h/2) x ceil(w/2)``), checks the sampling
  window (start/end percent) and hands the run's block inputs to the blocks in
  ``transformer_options``, under a key of this Apply's own;
- one ``dit`` replace patch per double and single block, which runs the block — or the
  patch that was already there (another pack's, or an earlier Apply WithAnyone), so both
  take effect, that one first — and adds the identity residual to the main image tokens
  only (Kontext reference tokens after them are left alone).

Two Apply WithAnyone nodes in a row therefore both act: the second adds its people (each
Apply's people attend within their own boxes). ``forward_orig`` is never replaced. Patch
objects are immutable and share the adapter on deepcopy (ModelPatcher.clone deep-copies
model_options), so cloning the patched model copies no weights and never touches the
original MODEL or other graph branches.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch

from ..withanyone_core.adapter import BlockInputs, IdentityAdapterBase
from ..withanyone_core.host import IdentityRequest, IdentityRun
from ..withanyone_core.layout import Layout, TokenGrid

logger = logging.getLogger(__name__)

STATE_PREFIX = "withanyone"
ADDITIONAL_MODELS_KEY = "withanyone"
PIXELS_PER_LATENT = 8


class NotFluxError(TypeError):
    """The MODEL is not a FLUX.1 model the adapter fits."""


@dataclass(frozen=True)
class IdentityConditioning:
    """What one Apply node asks for; shared (never copied) by every clone of the patched model."""

    adapter_patcher: object  # comfy ModelPatcher holding the adapter (either kind)
    request: IdentityRequest
    sigma_start: float
    sigma_end: float
    key: str  # this Apply's own name in transformer_options and the wrapper lists
    cache_kv: bool = True  # False recomputes identity K/V in every block call (the benchmark's baseline)

    def __deepcopy__(self, memo):
        return self  # immutable: sharing it keeps the 5 GB adapter from being copied

    @property
    def adapter(self) -> IdentityAdapterBase:
        return self.adapter_patcher.model

    @property
    def run_key(self) -> str:
        return self.key + ".run"

    def active_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The MODEL's compute dtype (that of ``x``); plain torch layers must compute in their own."""
        probe = self.adapter.arc_blocks[0].to_q
        return x.dtype if getattr(probe, "comfy_cast_weights", False) else self.adapter.weight_dtype


@dataclass(frozen=True)
class _ForwardState:
    run: IdentityRun
    inputs: BlockInputs
    main_tokens: int
    text_tokens: int


class OuterSampleWrapper:
    """One identity run per sampling run, released when sampling ends (also on interrupt)."""

    def __init__(self, conditioning: IdentityConditioning):
        self.conditioning = conditioning

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        run = IdentityRun(
            self.conditioning.adapter, self.conditioning.request, cache=True, cache_kv=self.conditioning.cache_kv
        )
        options[self.conditioning.run_key] = run
        try:
            return executor(*args, **kwargs)
        finally:
            options.pop(self.conditioning.run_key, None)
            run.release()


class DiffusionModelWrapper:
    """Sees the real input of each diffusion-model call and prepares the blocks' state.

    If a patch applied after this Apply replaced some of its block patches (packs that call
    ``set_model_patch_replace`` without wrapping, as PuLID-Flux does), the blocks of this
    call get this Apply's patch again around the newcomer, so both act (the newcomer first).
    """

    def __init__(self, conditioning: IdentityConditioning, blocks: tuple[int, int]):
        self.conditioning = conditioning
        self.blocks = blocks  # (double, single)

    def __deepcopy__(self, memo):
        return self

    def _restore_block_patches(self, transformer_options: dict) -> None:
        dit = transformer_options.get("patches_replace", {}).get("dit", {})
        n_double, n_single = self.blocks
        missing = {}
        for kind, count, offset, cls in (
            ("double_block", n_double, 0, DoubleBlockPatch),
            ("single_block", n_single, n_double, SingleBlockPatch),
        ):
            for i in range(count):
                current = dit.get((kind, i))
                if not _chain_has(current, self.conditioning):
                    missing[(kind, i)] = cls(self.conditioning, offset + i, current)
        if missing:
            if not getattr(self, "_warned", False):
                logger.warning(
                    "WithAnyone: %d block patch(es) applied after Apply WithAnyone replaced its own; "
                    "both run (the later patch first, then the identities)",
                    len(missing),
                )
                self._warned = True  # once per Apply: the same happens at every step
            patches = dict(transformer_options.get("patches_replace", {}))
            patches["dit"] = {**dit, **missing}
            transformer_options["patches_replace"] = patches

    def __call__(self, executor, *args, **kwargs):
        # the diffusion model's forward, whatever its signature: arguments are found by name, never by position
        # (upstream inserts and renames them between versions), and passed on exactly as they came
        call = _bind(executor, args, kwargs)
        x, timestep, context = call["x"], call["timestep"], call["context"]
        if call.get("transformer_options") is None:  # a dict of this call's own, never a signature's default
            if "transformer_options" in call.positional:
                args = call.replace(args, "transformer_options", {})
            else:
                kwargs = {**kwargs, "transformer_options": {}}
            call = _bind(executor, args, kwargs)
        transformer_options = call["transformer_options"]
        cond = self.conditioning
        sigmas = transformer_options.get("sigmas", timestep)
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        transient = None
        if cond.active_at(sigma):
            self._restore_block_patches(transformer_options)
            run = transformer_options.get(cond.run_key)
            if run is None:  # called outside a ComfyUI sampler (no OUTER_SAMPLE): this call only
                run = transient = IdentityRun(cond.adapter, cond.request, cache=False)
            grid = TokenGrid.for_latent(x.shape[-2], x.shape[-1])
            pixels = (x.shape[-1] * PIXELS_PER_LATENT, x.shape[-2] * PIXELS_PER_LATENT)
            inputs = run.inputs(grid, x.shape[0], x.device, cond.compute_dtype(x), pixel_size=pixels)
            transformer_options[cond.key] = _ForwardState(run, inputs, grid.num_tokens, context.shape[1])
        else:
            transformer_options.pop(cond.key, None)
        try:
            return executor(*args, **kwargs)
        finally:
            transformer_options.pop(cond.key, None)
            transformer_options.pop(cond.key + ".txt", None)
            if transient is not None:
                transient.release()


# the names ComfyUI's diffusion-model forwards (FLUX ``_forward``) give these inputs, in the order they had when
# the signature cannot be read
FORWARD_NAMES = ("x", "timestep", "context", "y", "guidance", "ref_latents", "control", "transformer_options")


class _Bound(dict):
    """A call's arguments by name; ``positional`` maps a name to its index in ``args``."""

    def __init__(self, named: dict, positional: dict):
        super().__init__(named)
        self.positional = positional

    def replace(self, args: tuple, name: str, value) -> tuple:
        args = list(args)
        args[self.positional[name]] = value
        return tuple(args)


def _bind(executor, args: tuple, kwargs: dict) -> _Bound:
    """Name the arguments of a DIFFUSION_MODEL wrapper call from the wrapped forward's own signature."""
    import inspect

    names = None
    try:
        params = list(inspect.signature(getattr(executor, "original", executor)).parameters.values())
        if all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[: len(args)]):
            names = [p.name for p in params[: len(args)]]
    except (TypeError, ValueError):
        pass
    if names is None or len(names) < len(args):
        names = list(FORWARD_NAMES[: len(args)])
    named = dict(zip(names, args))
    named.update(kwargs)
    missing = [n for n in ("x", "timestep", "context") if n not in named]
    if missing:
        raise TypeError(
            f"WithAnyone: the diffusion model was called without {', '.join(missing)}; this ComfyUI's "
            "FLUX forward is not one the pack knows: please report the ComfyUI version"
        )
    return _Bound(named, {n: i for i, n in enumerate(names)})


def _chain_has(patch, conditioning: IdentityConditioning) -> bool:
    """Whether ``patch`` is, or wraps, a WithAnyone block patch of ``conditioning``."""
    while isinstance(patch, _BlockPatch):
        if patch.conditioning is conditioning:
            return True
        patch = patch.previous
    return False


class _BlockPatch:
    """Runs the block (or the patch that was there before) and adds this Apply's identity residual."""

    def __init__(self, conditioning: IdentityConditioning, block_index: int, previous=None):
        self.conditioning, self.block_index, self.previous = conditioning, block_index, previous

    def __deepcopy__(self, memo):
        return self

    def _run_block(self, args, extra):
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)


class DoubleBlockPatch(_BlockPatch):
    def __call__(self, args, extra):
        out = self._run_block(args, extra)
        options = args.get("transformer_options") or {}
        state: _ForwardState | None = options.get(self.conditioning.key)
        if state is None:
            return out
        options[self.conditioning.key + ".txt"] = out["txt"].shape[1]
        out["img"] = state.run.add_residual(self.block_index, out["img"], state.inputs, 0, state.main_tokens)
        return out


class SingleBlockPatch(_BlockPatch):
    def __call__(self, args, extra):
        out = self._run_block(args, extra)
        options = args.get("transformer_options") or {}
        state: _ForwardState | None = options.get(self.conditioning.key)
        if state is None:
            return out
        # the text length seen by the double blocks (a post_input patch may change it), else the context's
        txt_len = options.get(self.conditioning.key + ".txt", state.text_tokens)
        out["img"] = state.run.add_residual(self.block_index, out["img"], state.inputs, txt_len, state.main_tokens)
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


def _existing_dit_patch(model, kind: str, index: int):
    return (
        model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get((kind, index))
    )


def apply_withanyone(
    model,
    adapter_patcher,
    arcface: torch.Tensor,
    siglip: torch.Tensor | None,
    layout: Layout | None,
    id_weight: float = 1.0,
    siglip_weight: float = 0.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    cache_kv: bool = True,
):
    """A clone of ``model`` carrying the identities; the original is never modified.

    ``layout`` (None: every token sees every person) holds the boxes on the canvas they were drawn on;
    when the sampled image has another size they are mapped with one uniform scale and centring (as the
    authors).
    """
    hidden, n_double, n_single = flux_blocks(model)
    adapter: IdentityAdapterBase = adapter_patcher.model
    cfg = adapter.config
    if cfg.hidden_size != hidden or cfg.num_blocks != n_double + n_single:
        raise NotFluxError(
            f"this WithAnyone adapter is for {cfg.describe()}, but the MODEL has hidden size {hidden} and "
            f"{n_double} + {n_single} blocks: use the adapter made for this FLUX model"
        )
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")
    if layout is not None and not isinstance(layout, Layout):
        raise TypeError(f"layout must be a withanyone_core.layout.Layout or None, got {type(layout).__name__}")
    sampling = model.get_model_object("model_sampling")
    request = IdentityRequest(
        arcface.detach().float().cpu(),
        None if siglip is None else siglip.detach().float().cpu(),
        layout,
        float(id_weight),
        float(siglip_weight),
    )
    conditioning = IdentityConditioning(
        adapter_patcher,
        request,
        sampling.percent_to_sigma(start_percent),
        sampling.percent_to_sigma(end_percent),
        key=f"{STATE_PREFIX}.{uuid.uuid4().hex[:12]}",
        cache_kv=cache_kv,
    )
    import comfy.patcher_extension

    patched = model.clone()
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, conditioning.key, OuterSampleWrapper(conditioning)
    )
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
        conditioning.key,
        DiffusionModelWrapper(conditioning, (n_double, n_single)),
    )
    wrapped = 0
    for i in range(n_double):
        previous = _existing_dit_patch(patched, "double_block", i)
        wrapped += previous is not None
        patched.set_model_patch_replace(DoubleBlockPatch(conditioning, i, previous), "dit", "double_block", i)
    for j in range(n_single):
        previous = _existing_dit_patch(patched, "single_block", j)
        wrapped += previous is not None
        patched.set_model_patch_replace(
            SingleBlockPatch(conditioning, n_double + j, previous), "dit", "single_block", j
        )
    if wrapped:
        logger.info("WithAnyone: %d block patch(es) already on this MODEL keep running, before the identities", wrapped)
    models = list(patched.get_additional_models_with_key(ADDITIONAL_MODELS_KEY))
    if not any(m is adapter_patcher or m.is_clone(adapter_patcher) for m in models):  # clones share the weights
        models.append(adapter_patcher)
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, models)  # loaded/offloaded with the MODEL
    return patched
