"""Model set-up for training: FLUX, VAE, text encoders, adapter, face models; what trains.

Pixel convention (one, everywhere in train/): images are float RGB in [0, 1]. The VAE
sees ``2 * x - 1``; the torch ArcFace takes aligned [0, 1] crops (its own
normalisation lives inside it), so no loss ever gets [-1, 1] where [0, 255] is
expected.

Dtypes: the frozen FLUX transformer, T5, CLIP and VAE load in ``train.frozen_dtype``
(bf16 with bf16 mixed precision); everything that trains (adapter, LoRA, the
transformer in full mode) keeps fp32 master weights. Every file is read from local
paths only: nothing is ever fetched from the Hugging Face hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from withanyone_core.adapter import AdapterConfig, IdentityAdapter
from withanyone_core.checkpoints.adapter_files import load_adapter
from withanyone_core.checkpoints.reading import load_safetensors
from withanyone_core.hosts.diffusers import attach_adapter, flux_from_bfl_state
from withanyone_core.offline import settle_bitsandbytes

from .config import Config

logger = logging.getLogger(__name__)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], 2x2 patches, row-major (FLUX's packing)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for an image of ``height x width`` pixels."""
    b, _, d = packed.shape
    h, w = height // 16, width // 16
    x = packed.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h * 2, w * 2)


def position_ids(height: int, width: int, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = height // 16, width // 16
    img = torch.zeros(rows, cols, 3, device=device)
    img[..., 1] = torch.arange(rows, device=device)[:, None]
    img[..., 2] = torch.arange(cols, device=device)[None, :]
    return img.reshape(rows * cols, 3), torch.zeros(text_tokens, 3, device=device)


class Denoiser(nn.Module):
    """FLUX transformer + identity adapter as one module (what DDP/DeepSpeed wrap)."""

    def __init__(self, transformer: nn.Module, adapter: IdentityAdapter):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter
        self.handle = attach_adapter(transformer, adapter)

    def forward(
        self,
        latents,
        timesteps,
        text,
        pooled,
        guidance,
        arcface,
        siglip,
        boxes,
        height,
        width,
        id_weight: float = 1.0,
        siglip_weight: float = 1.0,
    ):
        img_ids, txt_ids = position_ids(height, width, text.shape[1], latents.device)
        dtype = self.transformer.dtype  # a frozen bf16 FLUX takes bf16 inputs (autocast or not)
        latents, text, pooled, guidance = (x.to(dtype) for x in (latents, text, pooled, guidance))
        with self.handle.conditioning(
            arcface, siglip, height=height, width=width, boxes=boxes, id_weight=id_weight, siglip_weight=siglip_weight
        ):
            return self.transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=timesteps,
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]


class TextEncoder(nn.Module):
    """CLIP (pooled) + T5 (sequence), frozen, as FLUX uses them."""

    def __init__(
        self, base: Path | None, t5_length: int = 512, dtype: torch.dtype = torch.float32, parts: tuple | None = None
    ):
        """From a diffusers folder ``base``, or ``parts`` = (clip_tokenizer, clip, t5_tokenizer, t5) already loaded."""
        super().__init__()
        if parts is not None:
            self.clip_tokenizer, self.clip, self.t5_tokenizer, self.t5 = parts
        else:
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

            local = {"local_files_only": True}
            self.clip_tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer", **local)
            self.t5_tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer_2", **local)
            self.clip = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype, **local)
            self.t5 = T5EncoderModel.from_pretrained(base / "text_encoder_2", torch_dtype=dtype, **local)
        self.clip.eval().requires_grad_(False)
        self.t5.eval().requires_grad_(False)
        self.t5_length = min(t5_length, self.t5_tokenizer.model_max_length)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.clip.parameters()).device
        clip_ids = self.clip_tokenizer(
            captions,
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        t5_ids = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.t5_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.t5(t5_ids).last_hidden_state, self.clip(clip_ids).pooler_output


@dataclass
class ModelSet:
    denoiser: Denoiser
    vae: nn.Module
    text: TextEncoder
    arcface: nn.Module | None
    siglip: object | None  # withanyone_core.siglip.SiglipEncoder

    @property
    def transformer(self):
        return self.denoiser.transformer

    @property
    def adapter(self) -> IdentityAdapter:
        return self.denoiser.adapter


BRANCH_PREFIXES = {
    "arcface": ("ipa_arc.", "arcface_in_arc."),
    "siglip": ("ipa_sig.", "arcface_in_sig.", "siglip_in_sig."),
}
BRANCH_PREFIXES["both"] = BRANCH_PREFIXES["arcface"] + BRANCH_PREFIXES["siglip"]


def frozen_dtype(config: Config) -> torch.dtype:
    choice = config.train.frozen_dtype
    if choice == "auto":
        choice = "bf16" if config.train.mixed_precision == "bf16" else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def branch_weights(config: Config) -> tuple[float, float]:
    """(id_weight, siglip_weight) of the forward: a branch that does not train is off."""
    branch = config.train.branch
    return (
        config.train.id_weight if branch in ("arcface", "both") else 0.0,
        config.train.siglip_weight if branch in ("siglip", "both") else 0.0,
    )


def load_transformer(config: Config) -> nn.Module:
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import FluxTransformer2DModel

    dtype = torch.float32 if config.train.mode == "full" else frozen_dtype(config)  # full: fp32 master weights
    if config.models.comfyui:  # bf16, fp8 or ComfyUI's scaled fp8: upcast on load
        from .comfyui_files import load_flux

        return load_flux(config.models.transformer, dtype)
    if config.models.transformer:
        return flux_from_bfl_state(load_safetensors(config.models.transformer), dtype=dtype)
    return FluxTransformer2DModel.from_pretrained(
        Path(config.models.base) / "transformer", torch_dtype=dtype, local_files_only=True
    )


def build_adapter(config: Config, transformer: nn.Module, siglip_dim: int) -> IdentityAdapter:
    n_double = len(transformer.transformer_blocks)
    if config.models.adapter:  # fp32 master weights even when the file is bf16
        return load_adapter(config.models.adapter, num_double_blocks=n_double, dtype=torch.float32)
    tc = transformer.config
    adapter = IdentityAdapter(
        AdapterConfig(
            hidden_size=tc.num_attention_heads * tc.attention_head_dim,
            num_heads=tc.num_attention_heads,
            num_double_blocks=n_double,
            num_single_blocks=len(transformer.single_transformer_blocks),
            siglip_dim=siglip_dim,
        )
    )
    if config.train.adapter_init == "zero":
        # a fresh adapter starts as identity: zero output projections leave FLUX unchanged
        for branch in (adapter.ipa_arc, adapter.ipa_sig):
            for block in branch:
                nn.init.zeros_(block.to_out.weight)
    else:
        authors_init(adapter)
    return adapter


@torch.no_grad()
def authors_init(adapter: IdentityAdapter) -> None:
    """The authors' fresh start (their load_flow_model when the checkpoint has no adapter keys).

    Every LayerNorm weight and bias and every bias ~ N(0, 0.02); linear weights ~ N(0, 1/sqrt(fan))
    with fan the input width (512 for ArcFace and, as they wrote it, for SigLIP's 768 too; the
    hidden size for the attention projections, to_out included). The small LayerNorm gains make
    the initial residual small but not zero.
    """
    hidden = adapter.config.hidden_size
    for name, param in adapter.named_parameters():
        if param.ndim == 1:  # LayerNorm weights/biases and Linear biases
            param.normal_(0.0, 0.02)
            continue
        if name.startswith(("ipa_arc.", "ipa_sig.")):
            fan = hidden
        elif name.endswith(".0.weight"):  # a projector's first Linear
            fan = 512 if name.startswith(("arcface_in", "siglip_in")) else param.shape[1]
        else:
            fan = param.shape[1]
        param.normal_(0.0, fan**-0.5)


def siglip_hidden_size(path: str | None) -> int:
    """The SigLIP width the adapter's ``siglip_in_sig`` takes, read from the folder's config (768 otherwise)."""
    import json

    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return 768
    raw = json.loads(config.read_text())
    return int(raw.get("vision_config", raw).get("hidden_size", 768))


def load_vae_and_text(config: Config, dtype: torch.dtype) -> tuple[nn.Module, TextEncoder]:
    """The frozen VAE and text encoders, from the ComfyUI install's single files or the diffusers folder."""
    if config.models.comfyui:
        from .comfyui_files import CLIP_TOKENIZER, T5_TOKENIZER, load_clip_l, load_t5, load_vae

        root = Path(config.models.comfyui)
        clip_tokenizer, clip = load_clip_l(config.models.clip_l, root / CLIP_TOKENIZER, dtype)
        t5_tokenizer, t5 = load_t5(config.models.t5, root / T5_TOKENIZER, dtype)
        vae = load_vae(config.models.vae, dtype)
        text = TextEncoder(None, dtype=dtype, parts=(clip_tokenizer, clip, t5_tokenizer, t5))
    else:
        settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
        from diffusers import AutoencoderKL

        base = Path(config.models.base)
        vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype, local_files_only=True)
        text = TextEncoder(base, dtype=dtype)
    vae.eval().requires_grad_(False)
    return vae, text


def load_models(config: Config) -> ModelSet:
    if config.models.comfyui:
        from .config import resolve_comfyui

        resolve_comfyui(config)  # idempotent: names become paths, checked before anything loads
    dtype = frozen_dtype(config)
    transformer = load_transformer(config)
    vae, text = load_vae_and_text(config, dtype)
    siglip = arcface = None
    siglip_dim = siglip_hidden_size(config.models.siglip)
    if config.models.siglip and config.train.branch != "arcface":  # the ArcFace branch never reads SigLIP
        from withanyone_core.siglip import SiglipEncoder

        siglip = SiglipEncoder.load(config.models.siglip)
        siglip.model.requires_grad_(False)
        siglip_dim = siglip.model.config.hidden_size
    if config.models.antelopev2:
        from withanyone_core.faces import find_antelopev2_dir
        from withanyone_core.faces.torch_arcface import TorchArcFace

        folder = find_antelopev2_dir(config.models.antelopev2)
        arcface = TorchArcFace.from_onnx(folder / "glintr100.onnx").eval().requires_grad_(False)
    adapter = build_adapter(config, transformer, siglip_dim)
    return ModelSet(Denoiser(transformer, adapter), vae, text, arcface, siglip)


def set_trainable(
    models: ModelSet, mode: str, lora=None, branch: str = "both", adapter_lora=None, frozen: torch.dtype = torch.float32
) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what ``mode`` and ``branch`` train; returns exactly those parameters.

    With ``adapter_lora`` (a rank > 0) the branch trains through LoRA on its linear layers: its
    base weights are frozen in ``frozen`` and only the LoRA weights train (see train/lean.py)."""
    transformer, adapter = models.transformer, models.adapter
    transformer.requires_grad_(False)
    prefixes = BRANCH_PREFIXES[branch]
    if adapter_lora is not None and adapter_lora.rank > 0:
        from .lean import add_adapter_lora

        add_adapter_lora(
            adapter,
            prefixes,
            adapter_lora.rank,
            adapter_lora.alpha if adapter_lora.alpha is not None else float(adapter_lora.rank),
            frozen,
        )
    else:
        for name, p in adapter.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
    if mode == "lora":
        from train.lean import peft

        PeftLoraConfig = peft().LoraConfig

        present = {name.split(".", 2)[-1] for name, _ in transformer.named_modules()}
        targets = [t for t in lora.targets if any(n == t or n.endswith("." + t) for n in present)]
        if not targets:
            raise ValueError(f"none of the LoRA targets {lora.targets} exist in the FLUX transformer")
        transformer.add_adapter(
            PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, init_lora_weights="gaussian")
        )
        for name, p in transformer.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                p.data = p.data.float()  # peft matches the (bf16) base layer: keep fp32 master weights
    elif mode == "full":
        transformer.requires_grad_(True)
    elif mode != "adapter":
        raise ValueError(f"unknown training mode {mode!r}")
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    logger.info(
        "training %s (adapter branch %s%s): %.2f M parameters",
        mode,
        branch,
        f", LoRA rank {adapter_lora.rank}" if adapter_lora is not None and adapter_lora.rank > 0 else "",
        sum(p.numel() for p in params) / 1e6,
    )
    return params


def apply_frozen_storage(models: ModelSet, config: Config) -> None:
    """``train.frozen_storage``: the frozen FLUX blocks' weights in fp8, cast to the compute dtype on use."""
    if config.train.frozen_storage == "default":
        return
    from .lean import store_frozen_fp8

    count = store_frozen_fp8(models.transformer, config.train.frozen_storage)
    logger.info("frozen FLUX: %d block linear layers stored in %s (cast on use)", count, config.train.frozen_storage)
