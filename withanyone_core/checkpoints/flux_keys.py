"""FLUX checkpoints in Black Forest Labs' layout mapped to diffusers' names.

``double_blocks.N.img_attn.qkv``... become ``FluxTransformer2DModel`` keys for any hidden size
(diffusers' own single-file converter assumes 3072).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .adapter_files import ADAPTER_PREFIXES
from .reading import CheckpointError, strip_wrapper_prefixes

_DOUBLE_SIMPLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_SIMPLE = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_TOP_SIMPLE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def _map_simple(name: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src + ".weight" or name == src + ".bias":
            return dst + name[len(src) :]
        if name == src:  # RMSNorm scales carry no .weight suffix in BFL files
            return dst
    return None


def is_bfl_flux(state: Mapping[str, object]) -> bool:
    return any(k.startswith("double_blocks.") for k in state) and "img_in.weight" in state


def bfl_flux_config(state: Mapping[str, torch.Tensor]) -> dict:
    """diffusers ``FluxTransformer2DModel`` config for a BFL-layout FLUX state dict.

    The head count is not stored in the weights: FLUX uses heads of 128, found from
    the RMSNorm scale size of the query norm.
    """
    hidden = state["img_in.weight"].shape[0]
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks."))
    single = [int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")]
    return {
        "patch_size": 1,
        "in_channels": state["img_in.weight"].shape[1],
        "num_layers": depth,
        "num_single_layers": 1 + max(single) if single else 0,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": state["txt_in.weight"].shape[1],
        "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
    }


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a BFL-layout FLUX state dict to diffusers' ``FluxTransformer2DModel`` keys.

    Size-aware: fused qkv is split by the hidden size read from the weights, single
    block ``linear1`` into q, k, v and the MLP input; the final AdaLN's (shift, scale)
    halves are swapped to diffusers' (scale, shift). Non-FLUX keys (e.g. adapter
    weights in the same file) are ignored.
    """
    state = strip_wrapper_prefixes(state)
    if not is_bfl_flux(state):
        raise CheckpointError(
            "not a FLUX checkpoint in Black Forest Labs layout (no 'double_blocks.*' / 'img_in.weight'); "
            "use the original flux1-dev.safetensors or a diffusers folder"
        )
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state.items():
        if key.startswith(ADAPTER_PREFIXES):
            continue
        m = re.match(r"(double|single)_blocks\.(\d+)\.(.+)$", key)
        if m:
            kind, idx, rest = m.groups()
            if kind == "double":
                base = f"transformer_blocks.{idx}."
                qkv = re.match(r"(img|txt)_attn\.qkv\.(weight|bias)$", rest)
                if qkv:
                    names = (
                        ("to_q", "to_k", "to_v")
                        if qkv.group(1) == "img"
                        else ("add_q_proj", "add_k_proj", "add_v_proj")
                    )
                    for name, part in zip(names, torch.split(value, hidden, dim=0)):
                        out[f"{base}attn.{name}.{qkv.group(2)}"] = part
                    continue
                mapped = _map_simple(rest, _DOUBLE_SIMPLE)
            else:
                base = f"single_transformer_blocks.{idx}."
                lin1 = re.match(r"linear1\.(weight|bias)$", rest)
                if lin1:
                    mlp = value.shape[0] - 3 * hidden
                    parts = torch.split(value, [hidden, hidden, hidden, mlp], dim=0)
                    for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                        out[f"{base}{name}.{lin1.group(1)}"] = part
                    continue
                mapped = _map_simple(rest, _SINGLE_SIMPLE)
            if mapped is None:
                unused.append(key)
                continue
            out[base + mapped] = value
            continue
        ada = re.match(r"final_layer\.adaLN_modulation\.1\.(weight|bias)$", key)
        if ada:
            shift, scale = value.chunk(2, dim=0)
            out[f"norm_out.linear.{ada.group(1)}"] = torch.cat([scale, shift], dim=0)
            continue
        mapped = _map_simple(key, _TOP_SIMPLE)
        if mapped is None:
            unused.append(key)
            continue
        out[mapped] = value
    if unused:
        raise CheckpointError(f"unrecognised FLUX keys (not mapped to diffusers): {', '.join(sorted(unused)[:8])}")
    return out
