"""SigLIP vision encoder from local weights (google/siglip-base-patch16-256-i18n for WithAnyone).

``SiglipEncoder.load(path)`` takes a Hugging Face folder (config.json + weights) or a
single ``.safetensors`` file (a full SiglipModel or a vision-only export, e.g. from
ComfyUI's clip_vision folder); single files use the config shipped in
``withanyone_core/configs/siglip-base-patch16-256-i18n``. ``encode(crops)`` returns the
vision tower's ``last_hidden_state``: ``[n, 256, 768]`` for that model.

Preprocessing equals transformers' ``SiglipImageProcessor`` for the model (bicubic,
antialiased resize to the model's size, rescale to [0, 1], normalise with mean/std 0.5);
tests/core/test_siglip.py checks it against the real processor class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SHIPPED_CONFIG = Path(__file__).resolve().parent / "configs" / "siglip-base-patch16-256-i18n"
_VISION_PREFIXES = ("model.vision_model.", "siglip.vision_model.", "vision_model.")
_VISION_ROOTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")


def _vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vision-tower weights keyed as the vision model's own modules (no ``vision_model.``).

    Full SiglipModel checkpoints prefix them with ``vision_model.`` (and also hold a text
    tower, dropped here); vision-only exports carry them bare.
    """
    out = {}
    for key, value in state.items():
        for prefix in _VISION_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(_VISION_ROOTS):
            out[key] = value
    return out


class SiglipEncoder:
    def __init__(self, model, image_size: int, mean, std):
        self.model = model.eval()
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> SiglipEncoder:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        from .checkpoints.reading import CheckpointError, load_safetensors

        path = Path(path)
        if path.is_dir():
            config_dir = path
            files = sorted(path.glob("*.safetensors"))
            if not (path / "config.json").is_file() or not files:
                raise CheckpointError(
                    f"{path} is not a SigLIP folder: it needs config.json and *.safetensors weights "
                    "(google/siglip-base-patch16-256-i18n)"
                )
            state = {}
            for f in files:
                state.update(load_safetensors(f))
        else:
            config_dir = SHIPPED_CONFIG
            state = load_safetensors(path)
        raw = json.loads((config_dir / "config.json").read_text())
        config = SiglipVisionConfig(**raw.get("vision_config", raw))
        vision = _vision_state(state)
        if not vision:
            raise CheckpointError(
                f"{path.name} holds no SigLIP vision weights (no 'vision_model.*' keys); "
                "use google/siglip-base-patch16-256-i18n"
            )
        model = SiglipVisionModel(config)  # not on meta: it has non-persistent buffers (position ids)
        expected = model.state_dict()
        prefix = next(iter(expected)).split("embeddings.")[0]  # "" in transformers 5, "vision_model." before
        vision = {prefix + k: v for k, v in vision.items()}
        missing = sorted(set(expected) - set(vision))
        wrong = sorted(k for k in set(expected) & set(vision) if tuple(expected[k].shape) != tuple(vision[k].shape))
        if missing or wrong:
            raise CheckpointError(
                f"{path.name} does not match the SigLIP config ({config.hidden_size} wide, {config.image_size} px): "
                f"missing {missing[:5]}, wrong shapes {wrong[:5]}"
            )
        model.load_state_dict({k: vision[k] for k in expected}, strict=True)
        pre = config_dir / "preprocessor_config.json"
        pre = json.loads(pre.read_text()) if pre.is_file() else {}
        mean, std = pre.get("image_mean", [0.5] * 3), pre.get("image_std", [0.5] * 3)
        logger.info(
            "loaded SigLIP vision encoder from %s (%d px, hidden %d)", path, config.image_size, config.hidden_size
        )
        return cls(model.to(device=device, dtype=dtype), config.image_size, mean, std)

    def preprocess(self, crops: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 crops -> ``[n, 3, S, S]`` pixel values, exactly as SiglipImageProcessor makes them."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        out = []
        for crop in crops:
            # a read-only crop (e.g. a saved identity's) is copied: torch must not alias memory it cannot write
            t = torch.from_numpy(np.require(crop, requirements=["C_CONTIGUOUS", "WRITEABLE"])).permute(2, 0, 1)
            t = TF.resize(
                t, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
            out.append((t.float() / 255.0 - self.mean) / self.std)
        return torch.stack(out)

    @torch.no_grad()
    def encode(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Crops -> ``last_hidden_state`` ``[n, tokens, hidden]`` (256 x 768 for the WithAnyone model)."""
        param = next(self.model.parameters())
        pixels = self.preprocess(crops).to(device=param.device, dtype=param.dtype)
        return self.model(pixel_values=pixels).last_hidden_state
