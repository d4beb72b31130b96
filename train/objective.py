"""The training objective of one batch: flow matching, and in the phases that use them the ID loss and
the ID-contrastive loss, weighted by the phase (``phases.N.loss``).

The loss formulas are in :mod:`train.losses`; this module runs the models to get what they compare
(the VAE latents, the denoiser's velocity, the faces of the predicted image). :class:`Conditioning`
gives the denoiser its text and identity inputs, the same for the losses and the periodic samples.
"""

from __future__ import annotations

import torch

from train.config import ConfigError
from train.losses import (
    contrastive_loss,
    detected_landmarks,
    face_embeddings,
    flow_matching_loss,
    id_gate,
    id_loss,
    predicted_clean,
    sample_timesteps,
)
from train.models import ModelSet, pack_latents, unpack_latents


class Conditioning:
    """Text embeddings (from the encoders, or a cache of them) and the identity features of references."""

    def __init__(self, models: ModelSet, device, text_cache=None):
        self.models, self.device, self.text_cache = models, device, text_cache

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_cache is None:
            return self.models.text(captions)
        texts, pooled = [], []
        for caption in captions:
            cached = self.text_cache.get(caption)
            if cached is None:
                t, p = self.models.text([caption])
                cached = {"t5": t[0], "pooled": p[0]}
                self.text_cache.put(caption, cached)
            texts.append(cached["t5"].to(self.device))
            pooled.append(cached["pooled"].to(self.device))
        return torch.stack(texts), torch.stack(pooled)

    def identities(self, refs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """ArcFace embeddings and SigLIP features of ``refs`` (a batch: ``ref_embeddings [B, n, 512]`` and,
        with the SigLIP branch, ``ref_siglip_crops``)."""
        arcface = refs["ref_embeddings"].to(self.device)
        if "ref_siglip_crops" in refs:
            return arcface, self._siglip(refs["ref_siglip_crops"])
        # zero SigLIP features for the ArcFace branch (its forward never uses them; the SigLIP weight is 0)
        return arcface, arcface.new_zeros(*arcface.shape[:2], 256, self.models.adapter.config.siglip_dim)

    @torch.no_grad()
    def _siglip(self, crops: torch.Tensor) -> torch.Tensor:
        b, n = crops.shape[:2]
        feats = self.models.siglip.encode([c.numpy() for c in crops.reshape(b * n, *crops.shape[2:])])
        return feats.reshape(b, n, *feats.shape[1:]).to(self.device)


class TrainingObjective:
    """``objective(batch, phase, generator)`` -> ``{"flow": ..., ["id": ..., "contrastive": ...,] "total": ...}``.

    ``events`` is a dict of counters the objective adds to (``faces_not_detected``)."""

    def __init__(
        self,
        accelerator,
        models: ModelSet,
        denoiser,
        conditioning: Conditioning,
        pool,
        detector,
        train_config,
        id_weight: float,
        siglip_weight: float,
        events: dict[str, int],
    ):
        self.accelerator, self.models, self.denoiser = accelerator, models, denoiser
        self.conditioning, self.pool, self.detector = conditioning, pool, detector
        self.guidance, self.timesteps = train_config.guidance, train_config.timesteps
        self.id_weight, self.siglip_weight = id_weight, siglip_weight
        self.events = events

    def __call__(self, batch: dict, phase, generator: torch.Generator) -> dict[str, torch.Tensor]:
        acc, models = self.accelerator, self.models
        device = acc.device
        pixels = batch["pixels"].to(device)
        b, _, height, width = pixels.shape
        vae = models.vae
        vae_dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            dist = vae.encode((pixels * 2 - 1).to(vae_dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            latents = mean + std * torch.randn(mean.shape, generator=generator).to(device)
            clean = pack_latents((latents - vae.config.shift_factor) * vae.config.scaling_factor)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        t = sample_timesteps(b, clean.shape[1], generator, self.timesteps).to(device)
        noisy = (1 - t.view(-1, 1, 1)) * clean + t.view(-1, 1, 1) * noise
        text, pooled = self.conditioning.text(batch["caption"])
        arcface, siglip = self.conditioning.identities(batch)
        boxes = batch["boxes"].tolist()
        with acc.autocast():
            velocity = self.denoiser(
                noisy,
                t,
                text,
                pooled,
                torch.full((b,), self.guidance, device=device),
                arcface,
                siglip,
                boxes,
                height,
                width,
                self.id_weight,
                self.siglip_weight,
            )
        losses = {"flow": flow_matching_loss(velocity, noise, clean)}
        if phase.uses_id_losses:
            losses.update(self._identity_losses(batch, phase, noisy, velocity, t, height, width, generator))
        losses["total"] = sum(getattr(phase.loss, k) * v for k, v in losses.items())
        return losses

    def _identity_losses(self, batch, phase, noisy, velocity, t, height, width, generator):
        acc, models = self.accelerator, self.models
        if models.arcface is None:
            raise ConfigError(
                f"phase {phase.name} uses ID losses: set models.antelopev2 to the insightface models root"
            )
        gated = id_gate(t, phase.id_gate)
        n = batch["num_persons"]
        b = t.shape[0]
        generated_mode = phase.batch_negatives == "generated"
        if generated_mode:
            # every rank must agree on skipping, or the contrastive gather would wait forever
            if acc.reduce(gated.any().float().reshape(1), reduction="sum").item() == 0:
                return {}
        elif not bool(gated.any()):
            return {}
        generated = torch.zeros(b, n, 512, device=acc.device)
        # a face counts when its sample passed the gate, the face is whole in the crop and,
        # without GT alignment, the detector found every face on the prediction
        valid = gated[:, None].cpu() & batch["id_valid"]
        if gated.any():
            idx = gated.nonzero().flatten()
            vae = models.vae
            z = unpack_latents(predicted_clean(noisy[idx], velocity[idx].float(), t[idx]), height, width)
            z = z / vae.config.scaling_factor + vae.config.shift_factor
            images = ((vae.decode(z.to(next(vae.parameters()).dtype)).sample.float() + 1) / 2).clamp(0, 1)
            if phase.gt_aligned:
                landmarks = batch["landmarks"][idx.cpu()]
            else:
                landmarks, found = detected_landmarks(images, batch["boxes"][idx.cpu()], self.detector)
                valid[idx.cpu()] &= found[:, None]
                self.events["faces_not_detected"] = self.events.get("faces_not_detected", 0) + int((~found).sum())
                images, landmarks, idx = images[found.to(images.device)], landmarks[found], idx[found.to(idx.device)]
            if idx.numel():  # only faces that exist are embedded (no alignment on made-up landmarks)
                generated = generated.index_put(
                    (idx,), face_embeddings(images, landmarks.to(acc.device), models.arcface).float()
                )
        valid = valid.to(acc.device)
        out = {}
        gt = batch["gt_embeddings"].to(acc.device)
        if phase.loss.id > 0:
            out["id"] = id_loss(generated[valid], gt[valid]) if valid.any() else generated.sum() * 0.0
        if phase.loss.contrastive > 0:
            ids = batch["identity_ids"].to(acc.device).reshape(-1)
            positives = gt if phase.contrastive_positive == "gt" else batch["ref_embeddings"].to(acc.device)
            flat_valid = valid.reshape(-1)
            negatives = self.pool.sample_per_anchor(phase.negatives, ids.cpu(), generator).to(acc.device)
            out["contrastive"] = contrastive_loss(
                generated.reshape(b * n, -1),
                flat_valid,
                positives.reshape(b * n, -1),
                ids,
                negatives,
                phase.temperature,
                batch_keys=None if generated_mode else gt.reshape(b * n, -1),
            )
        return out
