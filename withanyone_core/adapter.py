"""The WithAnyone identity adapter: per-block identity cross-attention + projectors.

Key names follow the official ``withanyone.safetensors``:

- ``ipa_arc.{i}.*`` / ``ipa_sig.{i}.*``: one cross-attention module per FLUX block
  (double blocks first, then single blocks) for the ArcFace and SigLIP branches,
  each ``norm1`` (LayerNorm on identity tokens), ``norm2`` (LayerNorm on image
  tokens), ``to_q``, ``to_kv`` (fused), ``to_out``, all without bias;
- ``arcface_in_arc`` / ``arcface_in_sig``: raw 512-d ArcFace embedding -> 8 tokens;
- ``siglip_in_sig``: SigLIP last_hidden_state (256 x 768) -> 256 tokens.

After block i the host adds
``id_weight * ipa_arc[i](arc_tokens, img) + siglip_weight * ipa_sig[i](sig_tokens, img)``
to the image tokens (see :meth:`IdentityAdapter.block_residual`).

Dtypes: the layer classes come from ``operations`` (plain ``torch.nn`` by default; ComfyUI
passes its manual-cast ops so weights can be stored in bf16/fp8, partially loaded and
cast on use). Both LayerNorms always run in float32 on an upcast copy of their input, so
the FLUX image stream (which exceeds fp16's range) is never cast down before its norm;
the projections and the attention run in the run's compute dtype (the MODEL's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TokenSelection, region_attention, select_tokens
from .layout import BatchBoxes, RegionLayout, TokenGrid, build_layout
from .wording import count_noun as _count

ARC_TOKENS = 8  # ArcFace tokens per person, in both branches
SIGLIP_TOKENS = 256  # SigLIP patch tokens per person (256 px / patch 16)
ARCFACE_DIM = 512
SIGLIP_DIM = 768
ADAPTER_HEAD_DIM = 64  # the adapter's attention head size (FLUX's own is 128)


# The authors' three releases. ``layout`` is the key layout, ``region_rule`` the box rounding of the
# code path that runs the weights (their base model vs their Kontext model), ``requires_reference``
# whether the weights were trained to edit a reference image (FLUX.1 Kontext with a reference).
ADAPTER_VARIANTS = {
    # WithAnyone 1.0 on FLUX.1-dev: both branches, base rule
    "base": {
        "layout": "two_branch",
        "region_rule": "base",
        "requires_reference": False,
        "title": "WithAnyone (FLUX.1)",
    },
    # WithAnyone.K.preview: text-to-image on FLUX.1 Kontext. The authors run it with their base pipeline, so it
    # has the base keys and rule; its keys cannot tell it from the base adapter (only a name or metadata can)
    "k": {
        "layout": "two_branch",
        "region_rule": "base",
        "requires_reference": False,
        "title": "WithAnyone.K (FLUX.1 Kontext, text-to-image)",
    },
    # WithAnyone.Ke.preview: face editing on FLUX.1 Kontext, ArcFace branch only, the Kontext model's rule
    "ke": {
        "layout": "arcface_only",
        "region_rule": "kontext",
        "requires_reference": True,
        "title": "WithAnyone.Ke (FLUX.1 Kontext, face editing)",
    },
}


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an identity adapter for one FLUX size.

    FLUX.1-dev/schnell: hidden 3072, 24 heads, 19 double + 38 single blocks.
    """

    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    head_dim: int = ADAPTER_HEAD_DIM
    arcface_dim: int = ARCFACE_DIM
    siglip_dim: int = SIGLIP_DIM
    arc_tokens: int = ARC_TOKENS
    # which release the weights are (see :data:`ADAPTER_VARIANTS`); the key layout follows from it
    variant: str = "base"

    def __post_init__(self):
        if self.variant not in ADAPTER_VARIANTS:
            raise ValueError(f"unknown adapter variant {self.variant!r}: use one of {', '.join(ADAPTER_VARIANTS)}")

    @property
    def layout(self) -> str:
        """``two_branch`` (``ipa_arc``/``ipa_sig``: base and K) or ``arcface_only`` (``ipa``/``arcface_in``: Ke)."""
        return ADAPTER_VARIANTS[self.variant]["layout"]

    @property
    def region_rule(self) -> str:
        """How face boxes become token ranges (see :func:`withanyone_core.layout.box_token_ranges`)."""
        return ADAPTER_VARIANTS[self.variant]["region_rule"]

    @property
    def requires_reference(self) -> bool:
        """Whether the adapter only makes sense with a Kontext reference image in the stream."""
        return ADAPTER_VARIANTS[self.variant]["requires_reference"]

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def sig_tokens_per_person(self) -> int:
        return SIGLIP_TOKENS + self.arc_tokens

    def describe(self) -> str:
        text = (
            f"hidden {self.hidden_size}, {self.num_heads} adapter heads of {self.head_dim}, "
            f"{self.num_double_blocks} double + {self.num_single_blocks} single blocks"
        )
        return text if self.variant == "base" else f"{ADAPTER_VARIANTS[self.variant]['title']}, {text}"

    @property
    def title(self) -> str:
        return ADAPTER_VARIANTS[self.variant]["title"]

    def to_dict(self) -> dict:
        return asdict(self)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever its weights' or input's dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


# The layer classes the adapter is built from. A host may pass its own (ComfyUI's
# manual-cast ops); they need ``Linear(in, out, bias=...)`` and ``LayerNorm(dim)``.
TORCH_OPERATIONS = SimpleNamespace(Linear=nn.Linear, LayerNorm=Float32LayerNorm)


def _norm(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Apply a LayerNorm in float32 (upcast input) and hand the result on in ``dtype``."""
    return module(x.float()).to(dtype)


class IdentityCrossAttention(nn.Module):
    """Cross-attention from image tokens (queries) to identity tokens (keys/values).

    Same parameters and maths as the reference's ``PerceiverAttentionCA``; the forward
    works on a subset of image tokens (those inside some person's box). The identity
    side (``identity_kv``) does not depend on the image and is computed once per run.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int = ADAPTER_HEAD_DIM,
        kv_dim: int | None = None,
        operations=TORCH_OPERATIONS,
    ):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.norm1 = operations.LayerNorm(kv_dim)
        self.norm2 = operations.LayerNorm(dim)
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_kv = operations.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = operations.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def identity_kv(self, id_tokens: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """id_tokens ``[B, n*t, kv_dim]`` -> keys, values ``[B, heads, n*t, head_dim]`` in ``dtype``."""
        k, v = self.to_kv(_norm(self.norm1, id_tokens, dtype)).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(
        self,
        img: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        tokens_per_person: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """img ``[B, S, dim]`` (any dtype) -> residual ``[B, S, dim]`` in ``dtype``."""
        b, s, _ = img.shape
        q = self._heads(self.to_q(_norm(self.norm2, img, dtype)))
        k, v = kv
        out = region_attention(q, k, v, allowed, tokens_per_person)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))

    def forward(
        self,
        id_tokens: torch.Tensor,
        img: torch.Tensor,
        allowed: torch.Tensor | None = None,
        tokens_per_person: int = 1,
    ) -> torch.Tensor:
        """id_tokens ``[B, n*t, kv_dim]``, img ``[B, S, dim]`` -> residual ``[B, S, dim]``.

        ``allowed`` ``[B, S, n]`` restricts each image token to some persons (None: all).
        Computes in the dtype of ``to_q``'s weight.
        """
        dtype = self.to_q.weight.dtype
        return self.attend(img, self.identity_kv(id_tokens, dtype), allowed, tokens_per_person, dtype)


class TokenProjector(nn.Sequential):
    """Linear -> GELU -> LayerNorm -> Linear (keys ``.0``, ``.2``, ``.3`` as in the official file).

    Runs its linears in the input's dtype and its LayerNorm in float32.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, operations=TORCH_OPERATIONS):
        super().__init__(
            operations.Linear(in_dim, hidden, bias=True),
            nn.GELU(),
            operations.LayerNorm(hidden),
            operations.Linear(hidden, out_dim, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = self[1](self[0](x))
        return self[3](_norm(self[2], x, dtype))


@dataclass(frozen=True)
class IdentityTokens:
    """Projected identity tokens, ready for every block.

    arc: ``[Bt, n * 8, D]`` (ArcFace branch); sig: ``[Bt, n * 264, D]`` (SigLIP branch,
    per person 256 SigLIP tokens then 8 ArcFace tokens), or None when the SigLIP branch
    is off. ``Bt`` is 1 when every image of the batch shows the same persons (ComfyUI),
    else the batch size. ``kv_cache`` holds each block's identity keys/values once they
    are computed without gradients, so a sampling run projects them once, not per step.
    """

    arc: torch.Tensor
    sig: torch.Tensor | None
    num_persons: int
    kv_cache: dict | None = field(default_factory=dict, compare=False, repr=False)  # None: never cache

    @property
    def batch_size(self) -> int:
        return self.arc.shape[0]

    def repeat(self, times: int) -> IdentityTokens:
        if times == 1:
            return self
        sig = None if self.sig is None else self.sig.repeat(times, 1, 1)
        return IdentityTokens(self.arc.repeat(times, 1, 1), sig, self.num_persons)


@dataclass(frozen=True)
class BlockInputs:
    """Everything a block's identity residual needs, prepared once per run (or forward).

    ``batch_size`` is the image batch; identity tokens of batch 1 are broadcast to it.
    ``dtype`` is the compute dtype of the projections and attention (None: the adapter's
    weight dtype, which plain ``torch.nn`` layers require).
    """

    tokens: IdentityTokens
    layout: RegionLayout
    selection: TokenSelection | None
    id_weight: float
    siglip_weight: float
    batch_size: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.batch_size == 0:
            object.__setattr__(self, "batch_size", self.tokens.batch_size)

    def repeat(self, times: int) -> BlockInputs:
        """The same identities and layout for a batch ``times`` as large (e.g. cond + uncond)."""
        if times == 1:
            return self
        tokens = self.tokens if self.tokens.batch_size == 1 else self.tokens.repeat(times)
        allowed = None if self.layout.allowed is None else self.layout.allowed.repeat(times, 1, 1)
        layout = RegionLayout(self.layout.grid, self.layout.num_persons, allowed)
        return IdentityAdapterBase.prepare_from(
            tokens, layout, self.id_weight, self.siglip_weight, batch_size=self.batch_size * times, dtype=self.dtype
        )


class IdentityAdapterBase(nn.Module, ABC):
    """What the authors' two adapters share, whatever their key layout.

    The config and its layout check, the ArcFace tokens' projection, the region plan
    (:meth:`prepare`, :meth:`prepare_from`) and the per-block residual (:meth:`block_residual`, with
    identity K/V computed once per run). A subclass builds its modules under its release's key
    names and says which branches run (:meth:`_branches`), how identities become tokens
    (:meth:`encode_identities`) and where its ArcFace branch's blocks are (:attr:`arc_blocks`).
    ``operations`` supplies the layer classes (see :data:`TORCH_OPERATIONS`).
    """

    key_layout: str  # the key layout a subclass builds (see :attr:`AdapterConfig.layout`)
    default_variant: str  # the release built when no config is given
    other_class: str  # what builds the other layout, for the error message

    def __init__(self, config: AdapterConfig | None = None, **overrides):
        super().__init__()
        config = config or AdapterConfig(variant=self.default_variant)
        if overrides:
            config = AdapterConfig(**{**config.to_dict(), **overrides})
        if config.layout != self.key_layout:
            raise ValueError(f"{config.title} has the {config.layout} key layout: build it with {self.other_class}")
        self.config = config

    @staticmethod
    def _operations(operations):
        return TORCH_OPERATIONS if operations is None else operations

    def _cross_attention_blocks(self, ops) -> nn.ModuleList:
        """One :class:`IdentityCrossAttention` per FLUX block (double blocks first)."""
        cfg = self.config
        return nn.ModuleList(
            IdentityCrossAttention(cfg.hidden_size, cfg.num_heads, cfg.head_dim, operations=ops)
            for _ in range(cfg.num_blocks)
        )

    def _arcface_projector(self, ops) -> TokenProjector:
        """Raw 512-d ArcFace embedding -> ``arc_tokens`` tokens per person."""
        cfg = self.config
        d = cfg.hidden_size
        return TokenProjector(cfg.arcface_dim, 4 * d, cfg.arc_tokens * d, ops)

    @property
    @abstractmethod
    def arc_blocks(self) -> nn.ModuleList:
        """The ArcFace branch's per-block cross-attention modules (``ipa_arc`` or ``ipa``)."""

    @abstractmethod
    def encode_identities(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor | None,
        dtype: torch.dtype | None = None,
        with_siglip: bool = True,
    ) -> IdentityTokens:
        """Project per-person embeddings into identity tokens."""

    @abstractmethod
    def _branches(self, inputs: BlockInputs):
        """``(name, weight, blocks, id_tokens, tokens_per_person)`` of each branch this adapter runs."""

    # ------------------------------------------------------------------ tokens
    def _checked_arcface(self, arcface: torch.Tensor) -> torch.Tensor:
        """``[n, 512]`` or ``[B, n, 512]`` -> ``[B, n, 512]``, or a clear error."""
        dim = self.config.arcface_dim
        if arcface.ndim == 2:
            arcface = arcface.unsqueeze(0)
        if arcface.ndim != 3 or arcface.shape[-1] != dim:
            raise ValueError(f"ArcFace embeddings must have shape [batch, persons, {dim}], got {tuple(arcface.shape)}")
        return arcface

    def _arc_tokens(self, projector: nn.Module, arcface: torch.Tensor) -> torch.Tensor:
        b, n, _ = arcface.shape
        return projector(arcface).view(b, n, self.config.arc_tokens, self.config.hidden_size)

    def prepare(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor | None,
        grid: TokenGrid,
        boxes: BatchBoxes | None = None,
        id_weight: float = 1.0,
        siglip_weight: float = 1.0,
    ) -> BlockInputs:
        """Project identities and plan the region attention once for a whole forward."""
        tokens = self.encode_identities(arcface, siglip)
        layout = build_layout(boxes, grid, tokens.num_persons, tokens.batch_size, rule=self.config.region_rule)
        return self.prepare_from(tokens, layout, id_weight, siglip_weight)

    @staticmethod
    def prepare_from(
        tokens: IdentityTokens,
        layout: RegionLayout,
        id_weight: float,
        siglip_weight: float,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> BlockInputs:
        """Combine tokens and a layout (built on the CPU or the tokens' device) into block inputs.

        The gather plan is computed where the layout lives and then moved, so no block call
        waits on the GPU for it.
        """
        if layout.num_persons != tokens.num_persons:
            raise ValueError(
                f"the layout is for {_count(layout.num_persons, 'person')} but "
                f"{_count(tokens.num_persons, 'identity', 'identities')} were given"
            )
        if float(siglip_weight) != 0.0 and tokens.sig is None:
            raise ValueError(
                "these identity tokens were encoded without the SigLIP branch; "
                "encode them with with_siglip=True to use siglip_weight"
            )
        batch_size = batch_size or tokens.batch_size
        if tokens.batch_size not in (1, batch_size):
            raise ValueError(
                f"identity tokens for {_count(tokens.batch_size, 'image')} cannot serve a batch of {batch_size}"
            )
        device = tokens.arc.device
        selection = select_tokens(layout)
        selection = None if selection is None else selection.to(device)
        return BlockInputs(
            tokens, layout.to(device), selection, float(id_weight), float(siglip_weight), batch_size, dtype
        )

    # ---------------------------------------------------------------- residual
    def identity_kv(
        self,
        inputs: BlockInputs,
        branch: str,
        block_index: int,
        module: IdentityCrossAttention,
        id_tokens: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's identity keys/values for the image batch; cached in the tokens when no gradient flows."""
        cache = inputs.tokens.kv_cache
        key = (branch, block_index, dtype)
        kv = None if cache is None else cache.get(key)
        if kv is None:
            kv = module.identity_kv(id_tokens, dtype)
            if cache is not None and not torch.is_grad_enabled():
                cache[key] = kv
        if kv[0].shape[0] != inputs.batch_size:  # one set of persons for the whole batch
            kv = tuple(t.expand(inputs.batch_size, -1, -1, -1) for t in kv)
        return kv

    def block_residual(self, block_index: int, img: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Identity residual for the image tokens ``img`` ``[B, L, D]`` after block ``block_index``.

        Block indices count double blocks first, then single blocks. Tokens outside
        every box get exactly zero. The residual has ``img``'s dtype.
        """
        cfg = self.config
        if not 0 <= block_index < cfg.num_blocks:
            raise IndexError(f"block {block_index} out of range for an adapter with {cfg.num_blocks} blocks")
        sel = inputs.selection
        b, length, _ = img.shape
        if b != inputs.batch_size:
            raise ValueError(
                f"image batch {b} does not match the identity batch {inputs.batch_size}: "
                "use BlockInputs.repeat() once per forward for cond/uncond batches"
            )
        if inputs.layout.allowed is not None and inputs.layout.allowed.shape[1] != length:
            raise ValueError(
                f"layout covers {inputs.layout.allowed.shape[1]} image tokens "
                f"({inputs.layout.grid.rows}x{inputs.layout.grid.cols}) but the block has {length}"
            )
        dtype = inputs.dtype or self.weight_dtype
        x = img
        allowed = None
        if sel is not None:
            x = sel.gather(x)
            allowed = sel.allowed
        residual = None
        for name, weight, branch, id_tokens, per_person in self._branches(inputs):
            if weight == 0.0:
                continue
            module = branch[block_index]
            kv = self.identity_kv(inputs, name, block_index, module, id_tokens, dtype)
            part = weight * module.attend(x, kv, allowed, per_person, dtype)
            residual = part if residual is None else residual + part
        if residual is None:
            return torch.zeros_like(img)
        if sel is not None:
            residual = sel.scatter(residual)
        return residual.to(img.dtype)

    @property
    def weight_dtype(self) -> torch.dtype:
        """Storage dtype of the projections (the compute dtype when none is given)."""
        return self.arc_blocks[0].to_q.weight.dtype

    # kept for callers of the first release
    to_q_dtype = weight_dtype


class IdentityAdapter(IdentityAdapterBase):
    """WithAnyone's identity adapter for a FLUX model of any size: ArcFace and SigLIP branches.

    ``ipa_arc.{i}.*`` / ``ipa_sig.{i}.*`` per FLUX block, ``arcface_in_arc``, ``arcface_in_sig``
    and ``siglip_in_sig`` projectors (WithAnyone on FLUX.1 and WithAnyone.K).
    ``operations`` supplies the layer classes (see :data:`TORCH_OPERATIONS`).
    """

    key_layout = "two_branch"
    default_variant = "base"
    other_class = "adapter_for_config() (or ArcFaceOnlyAdapter)"

    def __init__(self, config: AdapterConfig | None = None, operations=None, **overrides):
        super().__init__(config, **overrides)
        ops = self._operations(operations)
        self.ipa_arc = self._cross_attention_blocks(ops)
        self.ipa_sig = self._cross_attention_blocks(ops)
        self.arcface_in_arc = self._arcface_projector(ops)
        self.arcface_in_sig = self._arcface_projector(ops)
        d = self.config.hidden_size
        self.siglip_in_sig = TokenProjector(self.config.siglip_dim, d, d, ops)

    @property
    def arc_blocks(self) -> nn.ModuleList:
        return self.ipa_arc

    def encode_identities(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor | None,
        dtype: torch.dtype | None = None,
        with_siglip: bool = True,
    ) -> IdentityTokens:
        """Project per-person embeddings into identity tokens.

        arcface: ``[B, n, 512]`` raw insightface embeddings (not normalised);
        siglip: ``[B, n, 256, 768]`` SigLIP last_hidden_state. Persons keep their order.
        ``dtype``: compute dtype (default: the weights'). ``with_siglip=False`` skips the
        SigLIP branch's tokens (its weight is 0 for the whole run).
        """
        cfg = self.config
        arcface = self._checked_arcface(arcface)
        b, n, _ = arcface.shape
        dtype = dtype or self.weight_dtype
        arcface = arcface.to(dtype)
        arc = self._arc_tokens(self.arcface_in_arc, arcface).reshape(b, n * cfg.arc_tokens, -1)
        if not with_siglip:
            return IdentityTokens(arc=arc, sig=None, num_persons=n)
        if siglip is None:
            raise ValueError("SigLIP features are required: encode each reference face with the SigLIP encoder")
        if siglip.ndim == 3:
            siglip = siglip.unsqueeze(0)
        if siglip.shape != (b, n, SIGLIP_TOKENS, cfg.siglip_dim):
            raise ValueError(
                f"SigLIP features must have shape [{b}, {n}, {SIGLIP_TOKENS}, {cfg.siglip_dim}] to match the "
                f"ArcFace embeddings, got {tuple(siglip.shape)}"
            )
        siglip = siglip.to(dtype)
        sig = torch.cat([self.siglip_in_sig(siglip), self._arc_tokens(self.arcface_in_sig, arcface)], dim=2)
        return IdentityTokens(arc=arc, sig=sig.reshape(b, n * cfg.sig_tokens_per_person, -1), num_persons=n)

    def _branches(self, inputs: BlockInputs):
        cfg = self.config
        tokens = inputs.tokens
        yield "arc", inputs.id_weight, self.ipa_arc, tokens.arc, cfg.arc_tokens
        yield "sig", inputs.siglip_weight, self.ipa_sig, tokens.sig, cfg.sig_tokens_per_person


class ArcFaceOnlyAdapter(IdentityAdapterBase):
    """The authors' Kontext adapter (WithAnyone.Ke): the ArcFace branch alone, official key names.

    ``ipa.{i}.*``: one :class:`IdentityCrossAttention` per FLUX block (double first);
    ``arcface_in.*``: raw 512-d ArcFace embedding -> 8 tokens per person. The authors' module
    also defines ``siglip_in.*``, which its ArcFace-only path never reads; it is not built here
    (the loader drops it from files, with a log line). The host API is that of
    :class:`IdentityAdapterBase` (``encode_identities``, ``prepare_from``, ``block_residual``); the
    SigLIP weight must be 0.
    """

    key_layout = "arcface_only"
    default_variant = "ke"
    other_class = "IdentityAdapter"

    def __init__(self, config: AdapterConfig | None = None, operations=None, **overrides):
        super().__init__(config, **overrides)
        ops = self._operations(operations)
        self.ipa = self._cross_attention_blocks(ops)
        self.arcface_in = self._arcface_projector(ops)

    @property
    def arc_blocks(self) -> nn.ModuleList:
        return self.ipa

    def encode_identities(
        self,
        arcface: torch.Tensor,
        siglip: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        with_siglip: bool = False,
    ) -> IdentityTokens:
        """arcface ``[B, n, 512]`` (raw insightface embeddings) -> 8 tokens per person; ``siglip`` is ignored."""
        cfg = self.config
        if with_siglip:
            raise ValueError(
                f"{cfg.title} has only the ArcFace branch: set the SigLIP weight (siglip_share / siglip_weight) to 0"
            )
        arcface = self._checked_arcface(arcface)
        b, n, _ = arcface.shape
        dtype = dtype or self.weight_dtype
        arc = self._arc_tokens(self.arcface_in, arcface.to(dtype)).reshape(b, n * cfg.arc_tokens, -1)
        return IdentityTokens(arc=arc, sig=None, num_persons=n)

    def _branches(self, inputs: BlockInputs):
        yield "arc", inputs.id_weight, self.ipa, inputs.tokens.arc, self.config.arc_tokens


def adapter_for_config(config: AdapterConfig, operations=None) -> IdentityAdapterBase:
    """The adapter class for a config's key layout (two-branch or ArcFace-only)."""
    cls = ArcFaceOnlyAdapter if config.layout == "arcface_only" else IdentityAdapter
    return cls(config, operations=operations)
