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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .attention import TokenSelection, region_attention, select_tokens
from .layout import BatchBoxes, RegionLayout, TokenGrid, build_layout

ARC_TOKENS = 8  # ArcFace tokens per person, in both branches
SIGLIP_TOKENS = 256  # SigLIP patch tokens per person (256 px / patch 16)
ARCFACE_DIM = 512
SIGLIP_DIM = 768
ADAPTER_HEAD_DIM = 64  # the adapter's attention head size (FLUX's own is 128)


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
        return (
            f"hidden {self.hidden_size}, {self.num_heads} adapter heads of {self.head_dim}, "
            f"{self.num_double_blocks} double + {self.num_single_blocks} single blocks"
        )

    def to_dict(self) -> dict:
        return asdict(self)


class IdentityCrossAttention(nn.Module):
    """Cross-attention from image tokens (queries) to identity tokens (keys/values).

    Same parameters and maths as the reference's ``PerceiverAttentionCA``; the forward
    works on a subset of image tokens (those inside some person's box).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int = ADAPTER_HEAD_DIM, kv_dim: int | None = None):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        id_tokens: torch.Tensor,
        img: torch.Tensor,
        allowed: torch.Tensor | None = None,
        tokens_per_person: int = 1,
    ) -> torch.Tensor:
        """id_tokens ``[B, n*t, kv_dim]``, img ``[B, S, dim]`` -> residual ``[B, S, dim]``.

        ``allowed`` ``[B, S, n]`` restricts each image token to some persons (None: all).
        """
        b, s, _ = img.shape
        q = self._heads(self.to_q(self.norm2(img)))
        k, v = self.to_kv(self.norm1(id_tokens)).chunk(2, dim=-1)
        out = region_attention(q, self._heads(k), self._heads(v), allowed, tokens_per_person)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))


def _token_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=True),
        nn.GELU(),
        nn.LayerNorm(hidden),
        nn.Linear(hidden, out_dim, bias=True),
    )


@dataclass(frozen=True)
class IdentityTokens:
    """Projected identity tokens for one batch, ready for every block.

    arc: ``[B, n * 8, D]`` (ArcFace branch); sig: ``[B, n * 264, D]`` (SigLIP branch,
    per person 256 SigLIP tokens then 8 ArcFace tokens).
    """

    arc: torch.Tensor
    sig: torch.Tensor
    num_persons: int

    @property
    def batch_size(self) -> int:
        return self.arc.shape[0]


@dataclass(frozen=True)
class BlockInputs:
    """Everything a block's identity residual needs, prepared once per forward."""

    tokens: IdentityTokens
    layout: RegionLayout
    selection: TokenSelection | None
    id_weight: float
    siglip_weight: float

    @property
    def batch_size(self) -> int:
        return self.tokens.batch_size

    def repeat(self, times: int) -> "BlockInputs":
        """The same identities and layout for a batch ``times`` as large (e.g. cond + uncond)."""
        if times == 1:
            return self
        tokens = IdentityTokens(
            self.tokens.arc.repeat(times, 1, 1), self.tokens.sig.repeat(times, 1, 1), self.tokens.num_persons
        )
        allowed = None if self.layout.allowed is None else self.layout.allowed.repeat(times, 1, 1)
        layout = RegionLayout(self.layout.grid, self.layout.num_persons, allowed)
        return IdentityAdapter.prepare_from(tokens, layout, self.id_weight, self.siglip_weight)


class IdentityAdapter(nn.Module):
    """WithAnyone's identity adapter for a FLUX model of any size."""

    def __init__(self, config: AdapterConfig | None = None, **overrides):
        super().__init__()
        config = config or AdapterConfig()
        if overrides:
            config = AdapterConfig(**{**config.to_dict(), **overrides})
        self.config = config
        d = config.hidden_size
        self.ipa_arc = nn.ModuleList(
            IdentityCrossAttention(d, config.num_heads, config.head_dim) for _ in range(config.num_blocks)
        )
        self.ipa_sig = nn.ModuleList(
            IdentityCrossAttention(d, config.num_heads, config.head_dim) for _ in range(config.num_blocks)
        )
        self.arcface_in_arc = _token_projector(config.arcface_dim, 4 * d, config.arc_tokens * d)
        self.arcface_in_sig = _token_projector(config.arcface_dim, 4 * d, config.arc_tokens * d)
        self.siglip_in_sig = _token_projector(config.siglip_dim, d, d)

    # ------------------------------------------------------------------ tokens
    def _arc_tokens(self, projector: nn.Module, arcface: torch.Tensor) -> torch.Tensor:
        b, n, _ = arcface.shape
        return projector(arcface).view(b, n, self.config.arc_tokens, self.config.hidden_size)

    def encode_identities(self, arcface: torch.Tensor, siglip: torch.Tensor | None) -> IdentityTokens:
        """Project per-person embeddings into identity tokens.

        arcface: ``[B, n, 512]`` raw insightface embeddings (not normalised);
        siglip: ``[B, n, 256, 768]`` SigLIP last_hidden_state. Persons keep their order.
        """
        cfg = self.config
        if arcface.ndim == 2:
            arcface = arcface.unsqueeze(0)
        if arcface.ndim != 3 or arcface.shape[-1] != cfg.arcface_dim:
            raise ValueError(
                f"ArcFace embeddings must have shape [batch, persons, {cfg.arcface_dim}], got {tuple(arcface.shape)}"
            )
        b, n, _ = arcface.shape
        if siglip is None:
            raise ValueError("SigLIP features are required: encode each reference face with the SigLIP encoder")
        if siglip.ndim == 3:
            siglip = siglip.unsqueeze(0)
        if siglip.shape != (b, n, SIGLIP_TOKENS, cfg.siglip_dim):
            raise ValueError(
                f"SigLIP features must have shape [{b}, {n}, {SIGLIP_TOKENS}, {cfg.siglip_dim}] to match the "
                f"ArcFace embeddings, got {tuple(siglip.shape)}"
            )
        dtype = self.arcface_in_arc[0].weight.dtype
        arcface, siglip = arcface.to(dtype), siglip.to(dtype)
        arc = self._arc_tokens(self.arcface_in_arc, arcface).reshape(b, n * cfg.arc_tokens, -1)
        sig = torch.cat([self.siglip_in_sig(siglip), self._arc_tokens(self.arcface_in_sig, arcface)], dim=2)
        return IdentityTokens(arc=arc, sig=sig.reshape(b, n * cfg.sig_tokens_per_person, -1), num_persons=n)

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
        layout = build_layout(boxes, grid, tokens.num_persons, tokens.batch_size, device=tokens.arc.device)
        return self.prepare_from(tokens, layout, id_weight, siglip_weight)

    @staticmethod
    def prepare_from(
        tokens: IdentityTokens, layout: RegionLayout, id_weight: float, siglip_weight: float
    ) -> BlockInputs:
        if layout.num_persons != tokens.num_persons:
            raise ValueError(
                f"layout is for {layout.num_persons} persons but {tokens.num_persons} identities were given"
            )
        layout = layout.to(tokens.arc.device)
        return BlockInputs(tokens, layout, select_tokens(layout), float(id_weight), float(siglip_weight))

    # ---------------------------------------------------------------- residual
    def block_residual(self, block_index: int, img: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Identity residual for the image tokens ``img`` ``[B, L, D]`` after block ``block_index``.

        Block indices count double blocks first, then single blocks. Tokens outside
        every box get exactly zero. The residual has ``img``'s dtype.
        """
        cfg = self.config
        if not 0 <= block_index < cfg.num_blocks:
            raise IndexError(f"block {block_index} out of range for an adapter with {cfg.num_blocks} blocks")
        tokens, sel = inputs.tokens, inputs.selection
        b, length, _ = img.shape
        if b != tokens.batch_size:
            raise ValueError(
                f"image batch {b} does not match the identity batch {tokens.batch_size}: "
                "use BlockInputs.repeat() once per forward for cond/uncond batches"
            )
        if inputs.layout.allowed is not None and inputs.layout.allowed.shape[1] != length:
            raise ValueError(
                f"layout covers {inputs.layout.allowed.shape[1]} image tokens "
                f"({inputs.layout.grid.rows}x{inputs.layout.grid.cols}) but the block has {length}"
            )
        dtype = self.to_q_dtype
        x = img.to(dtype)
        allowed = None
        if sel is not None:
            x = sel.gather(x)
            allowed = sel.allowed
        residual = None
        for weight, branch, id_tokens, per_person in (
            (inputs.id_weight, self.ipa_arc, tokens.arc, cfg.arc_tokens),
            (inputs.siglip_weight, self.ipa_sig, tokens.sig, cfg.sig_tokens_per_person),
        ):
            if weight == 0.0:
                continue
            part = weight * branch[block_index](id_tokens, x, allowed, per_person)
            residual = part if residual is None else residual + part
        if residual is None:
            return torch.zeros_like(img)
        if sel is not None:
            residual = sel.scatter(residual)
        return residual.to(img.dtype)

    @property
    def to_q_dtype(self) -> torch.dtype:
        return self.ipa_arc[0].to_q.weight.dtype
