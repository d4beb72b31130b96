"""Run the identity adapter inside diffusers' ``FluxTransformer2DModel``.

The adapter is attached with forward hooks on every double and single block: after
block i the hook adds the adapter's identity residual to the image tokens (diffusers'
blocks return ``(encoder_hidden_states, hidden_states)`` with the image part separate,
so single blocks need no text-length bookkeeping). The hook is a thin adapter over the
core's host contract (:class:`withanyone_core.host.IdentityRun`): only the first
``height/16 x width/16`` tokens (the main image) get the residual, so Kontext reference
tokens that a pipeline appends to ``hidden_states`` are left alone. Identities, layout
and weights are given per call::

    handle = attach_adapter(transformer, adapter)
    with handle.conditioning(arcface, siglip, height=512, width=512, boxes=[[box1, box2]]):
        velocity = transformer(hidden_states=..., ...).sample
    handle.detach()  # the base model is untouched afterwards

Gradients flow through the hooks (training uses this host). For gradient checkpointing
call ``handle.enable_gradient_checkpointing()`` instead of the transformer's own method:
blocks are recomputed during backward, usually after the ``conditioning`` block has
exited, and the handle's checkpoint function gives each recomputation the identities of
the forward it repeats (with diffusers' default one the recomputed block would differ
from the original and torch's checkpoint raises).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import BlockInputs, IdentityAdapterBase
from ..host import IdentityRequest, IdentityRun
from ..layout import BatchBoxes, TokenGrid, batch_layouts
from ..offline import settle_bitsandbytes

logger = logging.getLogger(__name__)


@dataclass
class _BlockHook:
    handle: AdapterHandle
    block_index: int

    def __call__(self, module: nn.Module, args, kwargs, output):
        active = self.handle.active
        if active is None:
            return output
        run, inputs = active
        encoder_hidden_states, hidden_states = output
        return encoder_hidden_states, run.add_residual(self.block_index, hidden_states, inputs)


class AdapterHandle:
    """An adapter attached to one diffusers FLUX transformer."""

    def __init__(self, transformer: nn.Module, adapter: IdentityAdapterBase):
        double = list(getattr(transformer, "transformer_blocks", []))
        single = list(getattr(transformer, "single_transformer_blocks", []))
        if not double:
            raise TypeError(
                f"{type(transformer).__name__} is not a diffusers FluxTransformer2DModel (no transformer_blocks)"
            )
        if len(double) + len(single) != adapter.config.num_blocks:
            raise ValueError(
                f"the adapter has {adapter.config.num_blocks} blocks but the FLUX model has "
                f"{len(double)} double + {len(single)} single = {len(double) + len(single)}: "
                "the adapter was made for a different FLUX model"
            )
        if transformer.config.num_attention_heads * transformer.config.attention_head_dim != adapter.config.hidden_size:
            raise ValueError(
                f"the adapter is for hidden size {adapter.config.hidden_size} but the FLUX model has "
                f"{transformer.config.num_attention_heads * transformer.config.attention_head_dim}"
            )
        self.transformer = transformer
        self.adapter = adapter
        self.active: tuple[IdentityRun, BlockInputs] | None = None
        self._hooks = [
            block.register_forward_hook(_BlockHook(self, index), with_kwargs=True)
            for index, block in enumerate(double + single)
        ]

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def detach(self) -> None:
        """Remove every hook: the transformer behaves exactly as before attaching."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.active = None

    @contextlib.contextmanager
    def conditioning(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor,
        height: int,
        width: int,
        boxes: BatchBoxes | None = None,
        id_weight: float = 1.0,
        siglip_weight: float = 0.0,
    ) -> Iterator[BlockInputs]:
        """Within the block, forwards of the transformer carry these identities.

        arcface ``[B, n, 512]`` (raw insightface embeddings), siglip ``[B, n, 256, 768]``,
        the output size in pixels (the token grid is ``height // 16 x width // 16``, as
        diffusers' FLUX pipeline packs latents), and per batch item the n face boxes in
        pixels (or None: every token attends to every person; one list of boxes serves every
        item), each item's boxes a :class:`~withanyone_core.layout.Layout` of this size for the
        host contract (a bad box is refused by name). The weights default to the
        authors' recommendation (ArcFace 1, SigLIP 0). Tokens after the main
        image's (Kontext reference latents) get no residual. Without gradients, the
        identity keys/values are computed once for all forwards inside the block (a
        whole sampling loop); everything is dropped when the block exits.
        """
        if not self.attached:
            raise RuntimeError("the adapter was detached from this transformer; attach it again")
        checkpoint_func = getattr(self.transformer, "_gradient_checkpointing_func", None)
        if (
            torch.is_grad_enabled()
            and getattr(self.transformer, "gradient_checkpointing", False)
            and getattr(checkpoint_func, "withanyone_handle", None) is not self
        ):
            raise RuntimeError(
                "gradient checkpointing was enabled on the transformer directly; call "
                "handle.enable_gradient_checkpointing() so recomputed blocks keep their identities"
            )
        if arcface.ndim == 2:
            arcface = arcface[None]
        if siglip is not None and siglip.ndim == 3:
            siglip = siglip[None]
        grid = TokenGrid.for_pixels(height, width, padded=False)
        layout = None if boxes is None else batch_layouts(boxes, width, height)  # boxes in this image's pixels
        request = IdentityRequest(arcface, siglip, layout, id_weight, siglip_weight)
        run = IdentityRun(self.adapter, request, cache=not torch.is_grad_enabled())
        inputs = run.inputs(grid, arcface.shape[0], arcface.device, None, pixel_size=(width, height))
        try:
            with self._activated((run, inputs)):
                yield inputs
        finally:
            run.release()

    @contextlib.contextmanager
    def _activated(self, active: tuple[IdentityRun, BlockInputs] | None) -> Iterator[None]:
        previous, self.active = self.active, active
        try:
            yield
        finally:
            self.active = previous

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' gradient checkpointing on the transformer, with recomputation that sees the
        identities its forward saw (non-reentrant checkpoint with a recompute context)."""
        from torch.utils import checkpoint

        def checkpoint_block(module: nn.Module, *args):
            active = self.active  # what this forward uses; restored when backward recomputes it

            def contexts():
                return contextlib.nullcontext(), self._activated(active)

            return checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

        checkpoint_block.withanyone_handle = self
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_block)


def attach_adapter(transformer: nn.Module, adapter: IdentityAdapterBase) -> AdapterHandle:
    """Attach ``adapter`` to a diffusers ``FluxTransformer2DModel`` (see module docs)."""
    return AdapterHandle(transformer, adapter)


def flux_from_bfl_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, **config_overrides):
    """Build a diffusers ``FluxTransformer2DModel`` from a BFL-layout state dict (any size)."""
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import FluxTransformer2DModel

    from ..checkpoints.flux_keys import bfl_flux_config, bfl_to_diffusers
    from ..checkpoints.reading import strip_wrapper_prefixes

    state = strip_wrapper_prefixes(state)
    config = {**bfl_flux_config(state), **config_overrides}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    mapped = bfl_to_diffusers(state)
    missing, unexpected = model.load_state_dict(mapped, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"FLUX checkpoint does not match diffusers' FluxTransformer2DModel: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}"
        )
    # non-persistent buffers (none today) would stay on meta; fail loudly if so
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ValueError(f"buffer {name} was not initialised")
    return model.to(dtype)
