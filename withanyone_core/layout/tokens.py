"""Face boxes in output pixels -> which image tokens each person covers.

FLUX packs the VAE latent (1/8 of the image) into 2x2 patches, so one image token
covers a 16x16 pixel cell. The reference maps a box (x1, y1, x2, y2) to token
columns ``floor(x1) // 16 .. ceil(x2 / 16)`` (end exclusive, clipped to the grid)
and rows likewise; token index = row * cols + col (row-major).

Everything here is vectorised: the result is a ``[B, L, n]`` membership tensor
(O(L) per person) instead of the reference's ``[B, heads, L, n * id_len]`` mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..wording import count_noun

PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch size 2

Box = Sequence[float]
# One entry per batch item: a list of boxes (one per person, in person order) or
# None for "no layout" (every token attends to every person).
BatchBoxes = Sequence[Sequence[Box] | None]


@dataclass(frozen=True)
class TokenGrid:
    """The image-token grid of one FLUX latent: ``rows x cols`` tokens, row-major."""

    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    @classmethod
    def for_pixels(cls, height: int, width: int, padded: bool = True) -> TokenGrid:
        """Grid for an image of ``height x width`` pixels.

        For sizes that are not multiples of 16, ``padded=True`` rounds up as ComfyUI
        does (it pads odd latents to the patch size); ``padded=False`` rounds down as
        the reference and diffusers' FLUX pipeline do (they crop). Multiples of 16 give
        the same grid either way.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if padded:
            return cls(math.ceil(height / PIXELS_PER_TOKEN), math.ceil(width / PIXELS_PER_TOKEN))
        if height < PIXELS_PER_TOKEN or width < PIXELS_PER_TOKEN:
            raise ValueError(f"image {width}x{height} is smaller than one 16x16 token")
        return cls(height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)

    @classmethod
    def for_latent(cls, latent_height: int, latent_width: int, patch_size: int = 2) -> TokenGrid:
        """Grid for a latent of ``latent_height x latent_width`` (padded to the patch size)."""
        return cls(math.ceil(latent_height / patch_size), math.ceil(latent_width / patch_size))


REGION_RULES = ("base", "kontext")


def check_region_rule(rule: str) -> str:
    if rule not in REGION_RULES:
        raise ValueError(f"unknown region rule {rule!r}: use one of {', '.join(REGION_RULES)}")
    return rule


def box_token_ranges(boxes: torch.Tensor, grid: TokenGrid, rule: str = "base") -> torch.Tensor:
    """``[..., 4]`` pixel boxes -> ``[..., 4]`` int64 token ranges (c0, r0, c1, r1), ends exclusive.

    ``rule="base"`` is the authors' base model: start = floor(x1) // 16, end = ceil(x2 / 16).
    ``rule="kontext"`` is their Kontext model (WithAnyone.Ke): every coordinate is truncated to an
    integer first, start = int(x1) // 16, end = ceil(int(x2) / 16), so a fractional x2 just past a
    token edge does not reach into the next token. Both are clipped to the grid; an empty range
    (end <= start) covers no token.
    """
    check_region_rule(rule)
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    if rule == "kontext":
        boxes = torch.trunc(boxes)  # Python's int(): toward zero
    x1, y1, x2, y2 = boxes.unbind(-1)
    c0 = torch.div(torch.floor(x1), PIXELS_PER_TOKEN, rounding_mode="floor").clamp(0, grid.cols)
    r0 = torch.div(torch.floor(y1), PIXELS_PER_TOKEN, rounding_mode="floor").clamp(0, grid.rows)
    c1 = torch.ceil(x2 / PIXELS_PER_TOKEN).clamp(0, grid.cols)
    r1 = torch.ceil(y2 / PIXELS_PER_TOKEN).clamp(0, grid.rows)
    return torch.stack([c0, r0, c1, r1], dim=-1).to(torch.int64)


def boxes_membership(
    boxes: torch.Tensor, grid: TokenGrid, device: torch.device | str | None = None, rule: str = "base"
) -> torch.Tensor:
    """``[..., n, 4]`` boxes -> ``[..., L, n]`` bool: token l lies in person k's box (``rule``: see
    :func:`box_token_ranges`)."""
    ranges = box_token_ranges(boxes, grid, rule).to(device)
    rows = torch.arange(grid.rows, device=ranges.device)
    cols = torch.arange(grid.cols, device=ranges.device)
    c0, r0, c1, r1 = (t.unsqueeze(-2) for t in ranges.unbind(-1))  # [..., 1, n]
    in_rows = (rows[:, None] >= r0) & (rows[:, None] < r1)  # [..., rows, n]
    in_cols = (cols[:, None] >= c0) & (cols[:, None] < c1)  # [..., cols, n]
    inside = in_rows.unsqueeze(-2) & in_cols.unsqueeze(-3)  # [..., rows, cols, n]
    return inside.flatten(-3, -2)


@dataclass(frozen=True)
class RegionLayout:
    """Which persons each image token may attend to, for a whole batch.

    ``allowed[b, l, k]`` is True where image token ``l`` of batch item ``b`` may attend
    to person ``k``: the token lies in that person's box, or the item has no layout
    (then every token attends to every person). ``allowed`` is None when no item has a
    layout. A token whose row is all False gets exactly zero identity residual.
    """

    grid: TokenGrid
    num_persons: int
    allowed: torch.Tensor | None

    @property
    def covered(self) -> torch.Tensor | None:
        """``[B, L]`` bool: the token attends to at least one person."""
        return None if self.allowed is None else self.allowed.any(dim=-1)

    def to(self, device: torch.device | str) -> RegionLayout:
        if self.allowed is None or self.allowed.device == torch.device(device):
            return self
        return RegionLayout(self.grid, self.num_persons, self.allowed.to(device))

    def token_mask(self, tokens_per_person: int) -> torch.Tensor | None:
        """``[B, L, n * tokens_per_person]`` bool attention mask over identity tokens.

        For inspection and parity tests; attention never materialises it for all tokens.
        """
        if self.allowed is None:
            return None
        return self.allowed.repeat_interleave(tokens_per_person, dim=-1)


def build_layout(
    boxes: BatchBoxes | None,
    grid: TokenGrid,
    num_persons: int,
    batch_size: int,
    device: torch.device | str | None = None,
    rule: str = "base",
) -> RegionLayout:
    """Validate per-item boxes and turn them into a :class:`RegionLayout`.

    ``boxes`` is None (no layout anywhere), or one entry per batch item (a single
    entry is broadcast to the batch), each None or exactly ``num_persons`` boxes in
    person order. ``rule``: the box rounding (``base`` or ``kontext``, see
    :func:`box_token_ranges`; the adapter's config names its own).
    """
    check_region_rule(rule)
    if boxes is None:
        return RegionLayout(grid, num_persons, None)
    boxes = list(boxes)
    if len(boxes) == 1 and batch_size > 1:
        boxes = boxes * batch_size
    if len(boxes) != batch_size:
        raise ValueError(
            f"layout has boxes for {count_noun(len(boxes), 'image')} but the batch has {batch_size}: "
            "give one list of boxes per image, or a single list for the whole batch"
        )
    if all(item is None for item in boxes):
        return RegionLayout(grid, num_persons, None)
    coords = torch.zeros(batch_size, num_persons, 4, dtype=torch.float64)
    no_layout = torch.zeros(batch_size, dtype=torch.bool)
    for b, item in enumerate(boxes):
        if item is None:
            no_layout[b] = True
            continue
        item = torch.as_tensor(item, dtype=torch.float64).reshape(-1, 4)
        if item.shape[0] != num_persons:
            raise ValueError(
                f"image {b} of the batch has {count_noun(item.shape[0], 'face box', 'face boxes')} but "
                f"{count_noun(num_persons, 'identity was', 'identities were')} given: "
                "give exactly one box per person, in the same order as the identities"
            )
        coords[b] = item
    allowed = boxes_membership(coords, grid, device=device, rule=rule)
    if bool(no_layout.any()):
        allowed = allowed | no_layout.to(allowed.device)[:, None, None]
    return RegionLayout(grid, num_persons, allowed)
