"""A tiny SigLIP in the layouts users have: a Hugging Face folder or a single safetensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..siglip import SHIPPED_CONFIG

TINY_SIGLIP = {
    "hidden_size": 32,
    "image_size": 256,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "patch_size": 16,
    "num_channels": 3,
}


def build_tiny_siglip(folder: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny SiglipVisionModel (256 px, patch 16 -> 256 tokens) as an HF folder."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**{**TINY_SIGLIP, "hidden_size": hidden_size}))
    model.save_pretrained(folder)
    shutil.copy(SHIPPED_CONFIG / "preprocessor_config.json", folder / "preprocessor_config.json")
    return folder


def shipped_size_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights shaped exactly like siglip-base-patch16-256-i18n's vision tower (meta-free, ~93M)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    raw = json.loads((SHIPPED_CONFIG / "config.json").read_text())
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**raw)).state_dict()
