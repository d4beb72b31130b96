"""A FLUX.1 that ComfyUI's own loaders accept, with random weights, in BFL layout.

ComfyUI's model detection fixes FLUX.1 at 24 heads of 128 (hidden 3072); one double and
one single block are enough. The text input takes 768-wide states (a CLIP-L-only text
path; T5-XXL cannot be small). The matching WithAnyone adapter is built at the real
hidden size too (its projectors dominate its size, as in the release).
"""

from __future__ import annotations

import torch

FLUX_CONFIG = {
    "in_channels": 64, "vec_in_dim": 768, "context_in_dim": 768, "hidden_size": 3072, "mlp_ratio": 4.0,
    "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
    "qkv_bias": True, "guidance_embed": True,
}


def flux_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.1 weights (no adapter keys), small enough for a CPU (1 + 1 blocks)."""
    from .bfl import bfl_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in bfl_shapes(FLUX_CONFIG).items():
        if name.startswith(("ipa_", "arcface_in", "siglip_in")):
            continue
        if name.endswith("scale"):
            state[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            fan_in = shape[-1] if len(shape) == 2 else shape[0]
            state[name] = (torch.randn(shape, generator=g) * (0.5 / fan_in**0.5)).to(dtype)
    return state


def flux_adapter(seed: int = 0):
    """A random WithAnyone adapter for :data:`FLUX_CONFIG` (non-zero output projections)."""
    from ..adapter import AdapterConfig, IdentityAdapter

    torch.manual_seed(seed)
    adapter = IdentityAdapter(AdapterConfig(hidden_size=3072, num_heads=24, num_double_blocks=1, num_single_blocks=1))
    with torch.no_grad():
        for block in list(adapter.ipa_arc) + list(adapter.ipa_sig):
            block.to_out.weight.mul_(4.0)
    return adapter.eval()
