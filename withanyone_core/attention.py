"""Region-restricted cross-attention from image tokens to identity tokens.

Semantics (the reference's, exactly): an image token attends jointly to the tokens of
every person whose box contains it; a token inside no box gets exactly zero residual;
without a layout every token attends to every person.

The reference builds a dense ``[B, heads, L, n * id_len]`` boolean mask and runs the
projections and attention over all L image tokens. Here the covered tokens are
gathered once per forward (:class:`TokenSelection`), the adapter projects and attends
only those, and the residual is scattered back; rows outside every box are zero
without being computed. :func:`region_attention` is the single attention entry point
a fused CUDA/Triton kernel can replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import RegionLayout


@dataclass(frozen=True)
class TokenSelection:
    """The image tokens of each batch item that attend to at least one person.

    ``index[b, s]`` is a token position; the first ``counts[b]`` entries of each row
    are covered tokens, the rest padding (``valid`` False). ``allowed[b, s, k]``: token
    ``index[b, s]`` may attend to person ``k`` (padding rows allow all persons so the
    softmax stays finite; their output is dropped).
    """

    index: torch.Tensor  # [B, S] int64
    valid: torch.Tensor  # [B, S] bool
    allowed: torch.Tensor  # [B, S, n] bool
    num_tokens: int  # L
    # every row of every item is a covered token (no padding): decided once when the plan
    # is made, so block calls never read a GPU tensor back to the host
    all_valid: bool = False

    def to(self, device: torch.device | str) -> TokenSelection:
        if self.index.device == torch.device(device):
            return self
        return TokenSelection(
            self.index.to(device), self.valid.to(device), self.allowed.to(device), self.num_tokens, self.all_valid
        )

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, S, D]`` covered tokens."""
        return torch.gather(x, 1, self.index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, S, D]`` residual of covered tokens -> ``[B, L, D]`` with zeros elsewhere."""
        values = values.masked_fill(~self.valid.unsqueeze(-1), 0) if not self.all_valid else values
        out = values.new_zeros(values.shape[0], self.num_tokens, values.shape[-1])
        return out.scatter(1, self.index.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)


def select_tokens(layout: RegionLayout) -> TokenSelection | None:
    """Gather plan for a layout, or None when every token attends to every person."""
    allowed = layout.allowed
    if allowed is None:
        return None
    covered = allowed.any(dim=-1)  # [B, L]
    counts = covered.sum(dim=1)
    width = int(counts.max()) if covered.numel() else 0
    # stable sort puts covered tokens first, each group in token order
    order = torch.sort((~covered).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=allowed.device)[None, :] < counts[:, None]
    rows = torch.gather(allowed, 1, order.unsqueeze(-1).expand(-1, -1, allowed.shape[-1]))
    rows = rows | ~valid.unsqueeze(-1)
    return TokenSelection(order, valid, rows, allowed.shape[1], bool(valid.all()))


def _use_triton(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The fused kernel serves CUDA inference; training (autograd) stays on SDPA."""
    if not q.is_cuda or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    from .triton_attention import supports

    return supports(q, k)


def region_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    tokens_per_person: int,
) -> torch.Tensor:
    """Multi-head attention of image tokens over identity tokens, restricted by person.

    q: ``[B, H, S, d]``; k, v: ``[B, H, n * tokens_per_person, d]``; allowed: ``[B, S, n]``
    bool (which persons each query token may attend to) or None (all). Every row of
    ``allowed`` must contain at least one True. Returns ``[B, H, S, d]``.

    CUDA inference uses the fused Triton kernel (no ``[S, n * t]`` mask is built);
    everything else uses PyTorch's SDPA with a boolean mask over the selected rows.
    """
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v)
    if _use_triton(q, k):
        from .triton_attention import region_attention_triton

        return region_attention_triton(q, k, v, allowed, tokens_per_person)
    if allowed.shape[-1] == 1:  # one person: every selected token sees all keys
        return F.scaled_dot_product_attention(q, k, v)
    mask = allowed.repeat_interleave(tokens_per_person, dim=-1).unsqueeze(1)  # [B, 1, S, n*t]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
