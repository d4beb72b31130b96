"""A FLUX.1 that ComfyUI's own loaders accept, with random weights, in BFL layout.

ComfyUI's model detection fixes FLUX.1 at 24 heads of 128 (hidden 3072); one double and
one single block are enough. The text input takes 768-wide states (a CLIP-L-only text
path; T5-XXL cannot be small). The matching WithAnyone adapter is built at the real
hidden size too (its projectors dominate its size, as in the release).
"""

from __future__ import annotations

import torch

from ..offline import settle_bitsandbytes

FLUX_CONFIG = {
    "in_channels": 64,
    "vec_in_dim": 768,
    "context_in_dim": 768,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
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


def clip_l_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIP-L text encoder weights (transformers layout, ~123M) that ComfyUI's CLIPLoader
    reads as an SD1-style CLIP-L: 77 tokens of width 768 plus a pooled 768 vector."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=49407,
        pad_token_id=1,
    )
    state = CLIPTextModelWithProjection(config).state_dict()
    return {k: v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}


def flux_vae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the shape of FLUX.1's ``ae.safetensors`` (16 latent channels, ~84M),
    in diffusers' layout, which ComfyUI's VAELoader converts on load."""
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return {k: v.contiguous() for k, v in vae.state_dict().items()}
