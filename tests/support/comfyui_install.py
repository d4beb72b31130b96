"""Tiny model files in the layouts a ComfyUI install has them, for the trainer's ComfyUI-folder tests.

Written independently of train/comfyui_files.py: the FLUX in Black Forest Labs' keys (bf16, fp8
e4m3fn/e5m2, ComfyUI's scaled fp8), the autoencoder in BFL's ``ae.safetensors`` keys (converted
here from a diffusers AutoencoderKL by BFL's naming), CLIP-L and T5 single files with transformers'
key names, antelopev2 ONNX stand-ins and a SigLIP folder; tokenizers copied from the ComfyUI tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from withanyone_core.testing.bfl import bfl_shapes

CLIP_TOKENIZER = Path("comfy") / "sd1_tokenizer"
T5_TOKENIZER = Path("comfy") / "text_encoders" / "t5_tokenizer"


def flux_bfl(hidden=128, heads=2, depth=1, single=1, context=32, vec=32, seed=0) -> dict[str, torch.Tensor]:
    cfg = {
        "hidden_size": hidden,
        "num_heads": heads,
        "mlp_ratio": 4.0,
        "in_channels": 64,
        "context_in_dim": context,
        "vec_in_dim": vec,
        "depth": depth,
        "depth_single_blocks": single,
        "qkv_bias": True,
    }
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in bfl_shapes(cfg).items():
        if name.startswith(("ipa_", "arcface_in", "siglip_in")):
            continue
        if name.endswith("scale"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan = shape[-1] if len(shape) == 2 else shape[0]
            state[name] = torch.randn(shape, generator=g) * (0.5 / fan**0.5)
    return state


def fp8_variant(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """bf16 | e4m3fn | e5m2 | scaled (ComfyUI's scaled fp8: 2-D weights fp8 / scale, marker tensor) |
    quantized (the per-layer ``weight_scale`` of ComfyUI's newer quantized files)."""
    out = {}
    for k, v in state.items():
        if kind == "bf16" or v.ndim != 2:
            out[k] = v.to(torch.bfloat16)
        elif kind == "e4m3fn":
            out[k] = v.to(torch.float8_e4m3fn)
        elif kind == "e5m2":
            out[k] = v.to(torch.float8_e5m2)
        elif kind in ("scaled", "quantized"):
            scale = v.abs().amax().float() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            suffix = ".scale_weight" if kind == "scaled" else ".weight_scale"  # ComfyUI's newer quantized files
            out[k[: -len(".weight")] + suffix] = scale.reshape(())
        else:
            raise ValueError(kind)
    if kind == "scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def vae_to_bfl(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the key names of BFL's ae.safetensors (their AutoEncoder class)."""
    import re

    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{n_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.",
            k,
        )
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_blocks - 1 - int(m.group(1))}.upsample.",
            k,
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = re.match(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k
        )
        if attn:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attn.group(2)]
            k = f"{attn.group(1)}.mid.attn_1.{name}.{attn.group(3)}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # BFL's attention projections are 1x1 convolutions
        out[k] = value.contiguous()
    return out


def clip_l(vocab=49408, hidden=64, layers=1, heads=1):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(2)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()


def t5(vocab=32128, d_model=32, layers=1, heads=2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=16,
            d_ff=64,
            num_layers=layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def build_install(
    root: Path,
    comfy_tree: Path,
    *,
    flux=None,
    flux_name="flux1-dev.safetensors",
    text_dtype=torch.float16,
    t5_tokens: int | None = None,
    faces: bool = True,
    siglip: bool = True,
) -> Path:
    """A ComfyUI folder: tokenizers from ``comfy_tree``, models/ in ComfyUI's folder names."""
    from withanyone_core.testing.faces import build_tiny_antelopev2
    from withanyone_core.testing.siglip import build_tiny_siglip

    models = root / "models"
    for sub in ("diffusion_models", "vae", "text_encoders", "withanyone"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in (CLIP_TOKENIZER, T5_TOKENIZER):
        shutil.copytree(comfy_tree / sub, root / sub, dirs_exist_ok=True)
    if t5_tokens:  # a shorter T5 sequence keeps a CPU run short (the trainer uses min(512, model_max_length))
        import json

        cfg = root / T5_TOKENIZER / "tokenizer_config.json"
        raw = json.loads(cfg.read_text())
        raw["model_max_length"] = t5_tokens
        cfg.write_text(json.dumps(raw))
    flux = flux if flux is not None else flux_bfl()
    save_file(fp8_variant(flux, "bf16"), str(models / "diffusion_models" / flux_name))
    vae = tiny_vae()
    save_file(vae_to_bfl(_state(vae), 4), str(models / "vae" / "ae.safetensors"))
    text = {
        "clip_l.safetensors": clip_l(hidden=flux["vector_in.in_layer.weight"].shape[1]),
        "t5xxl_fp16.safetensors": t5(d_model=flux["txt_in.weight"].shape[1]),
    }
    for name, model in text.items():
        save_file({k: v.to(text_dtype) for k, v in _state(model).items()}, str(models / "text_encoders" / name))
    if faces:
        build_tiny_antelopev2(models / "insightface")
    if siglip:
        build_tiny_siglip(models / "siglip" / "siglip-tiny")
    return root
