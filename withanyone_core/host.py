"""The host contract: what any FLUX host (ComfyUI, diffusers) needs to run the adapter.

A host owns the FLUX blocks; after each block it asks an :class:`IdentityRun` for the
identity residual of the main image tokens. The run prepares everything that is constant
while sampling — identity tokens, the region plan for the token grid, and (lazily, once
per block) the identity keys/values — and owns that cache: ``release()`` (or leaving the
``with`` block) drops it, so nothing outlives the run or an unloaded adapter.

What a host must tell the run, per model call: the token grid of the main image, the
batch size, the device and the compute dtype (the MODEL's). Reference tokens (FLUX.1
Kontext) that follow the main image tokens never receive a residual:
:meth:`IdentityRun.add_residual` touches only ``img[:, start:start + main_tokens]``.

The layout comes as a :class:`withanyone_core.layout.Layout` (boxes on the canvas they were drawn
on); one drawn for another image size is mapped into the sampled size with one uniform scale and
centring, as the authors' demo maps its 512-px layouts (:meth:`Layout.boxes_in`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .adapter import BlockInputs, IdentityAdapterBase
from .layout import BatchBoxes, Layout, Size, TokenGrid, build_layout
from .wording import count_noun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentityRequest:
    """What one application of the adapter asks for (immutable; hosts may share it freely).

    ``arcface`` ``[n, 512]`` (the same persons for every image) or ``[B, n, 512]``;
    ``siglip`` likewise ``[.., n, 256, 768]`` (may be None when ``siglip_weight`` is 0).
    ``layout``: None (every token sees every person), one :class:`Layout` for all images, or
    one entry per image (a :class:`Layout` or None); each holds its n boxes and the canvas
    they were drawn on.
    """

    arcface: torch.Tensor
    siglip: torch.Tensor | None
    layout: Layout | tuple[Layout | None, ...] | None = None
    id_weight: float = 1.0
    siglip_weight: float = 0.0
    # box rounding (withanyone_core.layout.REGION_RULES); None: the adapter's own (config.region_rule)
    region_rule: str | None = None

    def __post_init__(self):
        layout = self.layout
        if layout is None or isinstance(layout, Layout):
            return
        if isinstance(layout, (list, tuple)) and all(item is None or isinstance(item, Layout) for item in layout):
            object.__setattr__(self, "layout", tuple(layout))
            return
        raise TypeError(
            f"the identity request's layout must be a Layout, one Layout (or None) per image, or None; "
            f"got {type(layout).__name__}: build it with withanyone_core.layout.Layout(width, height, "
            "boxes) (batch_layouts for per-image boxes)"
        )

    @property
    def per_image(self) -> bool:
        return self.arcface.ndim == 3

    @property
    def num_persons(self) -> int:
        return int(self.arcface.shape[-2])

    def boxes_for(self, size: Size) -> BatchBoxes | None:
        """Per-image boxes in the pixels of an image of ``size`` ``(w, h)``."""
        if self.layout is None:
            return None
        per_item = [self.layout] if isinstance(self.layout, Layout) else self.layout
        return [None if item is None else item.boxes_in(size) for item in per_item]


class IdentityRun:
    """One sampling run (or one training forward) of an adapter with fixed identities.

    ``cache=True`` (inference) keeps identity tokens, region plans and per-block K/V for
    the run; with ``cache=False`` (training) nothing is kept between calls so gradients
    flow through a fresh projection every forward. ``cache_kv=False`` keeps tokens and
    plans but recomputes the identity K/V in every block call (the benchmark's baseline).
    """

    def __init__(
        self, adapter: IdentityAdapterBase, request: IdentityRequest, cache: bool = True, cache_kv: bool = True
    ):
        if request.num_persons < 1:
            raise ValueError("at least one identity is needed")
        self.adapter = adapter
        self.request = request
        self.cache = cache
        self.cache_kv = cache_kv
        self._tokens: dict = {}
        self._inputs: dict = {}
        self.encode_count = 0  # how often identity tokens were projected (tests and benchmarks read it)

    # ------------------------------------------------------------------ planning
    def _identity_tokens(self, device: torch.device, dtype: torch.dtype | None):
        key = (str(device), dtype)
        tokens = self._tokens.get(key)
        if tokens is None:
            req = self.request
            arcface = req.arcface if req.per_image else req.arcface[None]
            siglip = req.siglip
            if siglip is not None and not req.per_image:
                siglip = siglip[None]
            with_siglip = req.siglip_weight != 0.0
            tokens = self.adapter.encode_identities(
                arcface.to(device),
                None if siglip is None or not with_siglip else siglip.to(device),
                dtype=dtype,
                with_siglip=with_siglip,
            )
            if not self.cache_kv:
                tokens = replace(tokens, kv_cache=None)
            self.encode_count += 1
            if self.cache:
                self._tokens[key] = tokens
        return tokens

    def inputs(
        self,
        grid: TokenGrid,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        pixel_size: Size | None = None,
    ) -> BlockInputs:
        """Block inputs for a main image of ``grid`` tokens, ``batch_size`` images, on ``device``.

        ``pixel_size`` ``(w, h)`` is the sampled image in pixels (default: 16 px per token).
        ``dtype`` is the compute dtype (the MODEL's); None uses the adapter's weight dtype.
        """
        device = torch.device(device)
        size = pixel_size or (grid.cols * 16, grid.rows * 16)
        key = (grid, batch_size, str(device), dtype, tuple(size))
        inputs = self._inputs.get(key)
        if inputs is not None:
            return inputs
        req = self.request
        tokens = self._identity_tokens(device, dtype)
        if req.per_image and tokens.batch_size not in (1, batch_size):
            if batch_size % tokens.batch_size:
                raise ValueError(
                    f"identities for {count_noun(tokens.batch_size, 'image')} cannot serve a batch of {batch_size}"
                )
            tokens = tokens.repeat(batch_size // tokens.batch_size)
        boxes = req.boxes_for(size)
        if boxes is not None and len(boxes) not in (1, batch_size):
            if batch_size % len(boxes):
                raise ValueError(f"layout for {count_noun(len(boxes), 'image')} cannot serve a batch of {batch_size}")
            boxes = list(boxes) * (batch_size // len(boxes))  # cond/uncond copies of the same images
        rule = req.region_rule or self.adapter.config.region_rule
        layout = build_layout(boxes, grid, tokens.num_persons, batch_size, rule=rule)  # on the CPU: no device sync
        inputs = IdentityAdapterBase.prepare_from(
            tokens, layout, req.id_weight, req.siglip_weight, batch_size=batch_size, dtype=dtype
        )
        if self.cache:
            self._inputs[key] = inputs
        return inputs

    # ------------------------------------------------------------------ blocks
    def add_residual(
        self, block_index: int, img: torch.Tensor, inputs: BlockInputs, start: int = 0, main_tokens: int | None = None
    ) -> torch.Tensor:
        """``img`` with the identity residual added to its main image tokens ``[start, start + main_tokens)``.

        Tokens before ``start`` (text, in FLUX single blocks) and after the main image
        (Kontext reference tokens) are returned unchanged. In fp16 the sum is clamped to
        fp16's range, as ComfyUI's FLUX does with its own stream.
        """
        main_tokens = inputs.layout.grid.num_tokens if main_tokens is None else main_tokens
        end = start + main_tokens
        if img.shape[1] < end:
            raise ValueError(f"the block has {img.shape[1]} tokens but the main image needs {start} + {main_tokens}")
        if block_index == 0:
            self._check_reference(img.shape[1] > end)
        main = img[:, start:end]
        updated = main + self.adapter.block_residual(block_index, main, inputs)
        if updated.dtype == torch.float16:
            updated = torch.nan_to_num(updated, nan=0.0, posinf=65504, neginf=-65504)
        if start == 0 and end == img.shape[1]:
            return updated
        return torch.cat([img[:, :start], updated, img[:, end:]], dim=1)

    def _check_reference(self, has_reference: bool) -> None:
        """Refuse an editing adapter without a reference image; note a two-branch one that gets one."""
        config = self.adapter.config
        if config.requires_reference and not has_reference:
            raise ValueError(
                f"{config.title} edits a photo on FLUX.1 Kontext, but no reference image reached the model. "
                "Load flux1-kontext-dev, and feed the prepared photo (WithAnyone Face Edit Prepare -> VAE Encode "
                "-> ReferenceLatent) into the positive conditioning; for text-to-image use the base adapter "
                "(withanyone.safetensors) or WithAnyone.K"
            )
        if has_reference and not config.requires_reference and not getattr(self, "_noted_reference", False):
            self._noted_reference = True
            logger.info(
                "WithAnyone: %s runs on the target tokens only; the Kontext reference tokens are left alone "
                "(for face editing the authors trained WithAnyone.Ke)",
                config.title,
            )

    # ------------------------------------------------------------------ lifetime
    def release(self) -> None:
        """Drop every cached tensor (tokens, plans, K/V)."""
        self._tokens.clear()
        self._inputs.clear()

    @property
    def cached_tensors(self) -> int:
        """How many tensors the run holds (0 after :meth:`release`)."""
        count = 0
        for tokens in self._tokens.values():
            count += 1 + (tokens.sig is not None) + 2 * len(tokens.kv_cache or ())
        return count + len(self._inputs)

    def __enter__(self) -> IdentityRun:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
