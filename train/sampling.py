"""Sample images during training through the diffusers host (fixed seed and identities)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from withanyone_core.recipe import flux_mu, shifted_schedule

from .models import ModelSet, pack_latents, unpack_latents

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_image(
    models: ModelSet,
    denoiser,
    prompt: str,
    arcface: torch.Tensor,
    siglip: torch.Tensor,
    boxes,
    width: int,
    height: int,
    steps: int,
    seed: int,
    guidance: float,
    id_weight: float = 1.0,
    siglip_weight: float = 1.0,
) -> np.ndarray:
    """Euler sampling of FLUX's rectified flow with FLUX's shifted schedule; returns RGB uint8."""
    device = next(denoiser.parameters()).device
    text, pooled = models.text([prompt])
    g = torch.Generator().manual_seed(seed)
    channels = models.vae.config.latent_channels
    latents = pack_latents(torch.randn(1, channels, height // 8, width // 8, generator=g)).to(device)
    ts = shifted_schedule(steps, flux_mu(latents.shape[1]))  # FLUX's own mu, from the token count
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((1,), float(t_cur), device=device)
        v = denoiser(
            latents,
            t,
            text,
            pooled,
            torch.full((1,), guidance, device=device),
            arcface,
            siglip,
            boxes,
            height,
            width,
            id_weight,
            siglip_weight,
        )
        latents = latents + (float(t_next) - float(t_cur)) * v
    vae = models.vae
    z = unpack_latents(latents, height, width) / vae.config.scaling_factor + vae.config.shift_factor
    image = (vae.decode(z.to(next(vae.parameters()).dtype)).sample[0].float().clamp(-1, 1) + 1) / 2
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


# samples tried for the fixed identities of the periodic samples before giving up (each bad one is named)
SAMPLE_SEARCH_LIMIT = 200


def pick_sample_item(
    options, manifest=None, index=None, shards=(), numbers=None, landmarks=None, limit: int = SAMPLE_SEARCH_LIMIT
) -> dict | None:
    """The item whose identities and layout every periodic sample (``sample.every``) uses: the first
    record of the manifest, else the first sample of the shards, that loads whole. A bad one (the
    stream skipped it too) is passed over with a warning naming it; None when none of the first
    ``limit`` loads (the sample step is then skipped, the run goes on)."""
    tried = 0
    if manifest is not None:
        from train.data import WithAnyoneDataset

        dataset = WithAnyoneDataset(manifest, options, index=index)
        for position in range(min(len(dataset), limit)):
            item = dataset[position]
            tried += 1
            if "skipped" not in item and "dropped" not in item:
                return item
            logger.warning(
                "sample step: passing over %s (%s)",
                dataset.where(position),
                item.get("error", item.get("reason", "unusable")),
            )
        return None
    from train.data.multiid2m.format import parsed_samples
    from train.data.multiid2m.stream import MultiID2MStream

    stream = MultiID2MStream(list(shards), options, 1, numbers=numbers, landmarks=landmarks)

    def count_bad(_exc) -> bool:
        nonlocal tried
        tried += 1
        return tried >= limit

    for shard in shards:
        for _, sample in parsed_samples(shard, "sample step", options.max_image_pixels, count_bad):
            tried += 1
            item = stream.safe_item(sample, 0)
            if "skipped" not in item and "dropped" not in item:
                return item
            logger.warning("sample step: passing over %s (%s)", sample.where, item.get("error", "unusable"))
            if tried >= limit:
                return None
        if tried >= limit:
            return None
    return None


def save_sample(image: np.ndarray, folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    Image.fromarray(image).save(path)
    return path
