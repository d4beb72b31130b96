"""Train WithAnyone: ``python train/run.py --config FILE [--set key=value ...]``.

Multi-GPU / multi-node through accelerate, e.g.
``accelerate launch --num_processes 8 train/run.py --config train/configs/flux-dev-adapter.yaml``
(DeepSpeed ZeRO-2: ``--config_file train/configs/accelerate-deepspeed-zero2.yaml``).
Rerunning with the same ``output_dir`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpointing import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint  # noqa: E402
from train.config import Config, ConfigError, load_config  # noqa: E402
from train.data import (  # noqa: E402
    BucketBatchSampler,
    DataOptions,
    IdentityIndex,
    Manifest,
    NegativePool,
    TextEmbeddingCache,
    WithAnyoneDataset,
    collate,
)
from train.losses import (  # noqa: E402
    contrastive_loss,
    face_embeddings,
    flow_matching_loss,
    id_gate,
    id_loss,
    predicted_clean,
    sample_timesteps,
)
from train.models import ModelSet, load_models, pack_latents, set_trainable, unpack_latents  # noqa: E402
from train.phases import PhaseSchedule, data_options  # noqa: E402

logger = logging.getLogger("withanyone.train")


class Trainer:
    def __init__(self, config: Config):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and acc.num_processes != world:
            # e.g. torchrun on a machine without GPUs: every process would train alone on the same folder
            raise RuntimeError(
                f"{world} processes were launched but accelerate did not set up distributed training "
                f"(it sees {acc.num_processes}). On CPU-only machines set ACCELERATE_USE_CPU=1 when launching."
            )
        torch.manual_seed(config.seed)
        self.models: ModelSet = load_models(config)
        self.params = set_trainable(self.models, config.train.mode, config.train.lora)
        if config.train.gradient_checkpointing:
            self.models.denoiser.handle.enable_gradient_checkpointing()  # keeps identities on recomputation
        self.manifest = Manifest.load(config.data.manifest)
        self.index = IdentityIndex(self.manifest)
        self.pool = (NegativePool.load(config.data.negatives) if config.data.negatives
                     else NegativePool.from_manifest(self.manifest, self.index))
        self.text_cache = TextEmbeddingCache(config.data.text_cache) if config.data.text_cache else None
        self.schedule = PhaseSchedule(config.phases)
        opt = config.train.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, weight_decay=opt.weight_decay,
                                           betas=tuple(opt.betas))
        warmup = max(1, opt.warmup_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.denoiser, self.optimizer, self.lr_scheduler = acc.prepare(
            self.models.denoiser, self.optimizer, self.lr_scheduler)
        device = acc.device
        for module in (self.models.vae, self.models.text, self.models.arcface):
            if module is not None:
                module.to(device)
        if self.models.siglip is not None:
            self.models.siglip.model.to(device)
        self.step = 0
        self.phase_index = -1
        self.sampler: BucketBatchSampler | None = None
        self.sampler_state: dict | None = None
        self.skipped_images = 0
        if config.tensorboard:
            acc.init_trackers("withanyone")

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        remove_partial(self.output_dir) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        latest = latest_checkpoint(self.output_dir)
        if latest is None:
            logger.info("starting a new run in %s", self.output_dir)
            self._trim_loss_log()
            return
        step, folder = latest
        state = load_checkpoint(self.accelerator, folder)
        self.step = state["step"]
        self.phase_index = -1
        self.sampler_state = state["sampler"]
        self.sampler_phase = state["phase"]
        self.skipped_images = state.get("skipped_images", 0)
        self._trim_loss_log()
        logger.info("resuming from %s (step %d, phase %s)", folder, self.step, state["phase_name"])

    def _trim_loss_log(self) -> None:
        """Drop loss lines after the step we resume from (they will be recomputed)."""
        path = self.output_dir / "losses.jsonl"
        if self.accelerator.is_main_process and path.is_file():
            lines = path.read_text().splitlines()[: self.step]
            path.write_text("".join(line + "\n" for line in lines))

    def _enter_phase(self, active) -> None:
        phase, cfg = active.phase, self.config
        acc = self.accelerator
        dataset = WithAnyoneDataset(self.manifest, data_options(phase, cfg.data.buckets), seed=cfg.seed + active.index,
                                    index=self.index)
        self.dataset = dataset
        self.sampler = BucketBatchSampler(dataset, cfg.data.batch_size, seed=cfg.seed + active.index,
                                          num_replicas=acc.num_processes, rank=acc.process_index)
        if self.sampler_state is not None and self.sampler_phase == active.index:
            self.sampler.load_state_dict(self.sampler_state)
        self.sampler_state = None
        self.batches = iter(self.sampler)
        lr = phase.lr if phase.lr is not None else cfg.train.optimizer.lr
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        if phase.reset_optimizer and self.step == active.start_step and self.step > 0:
            getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
            logger.info("phase %s: optimizer state reset", phase.name)
        self.phase_index = active.index
        logger.info("phase %d/%d '%s' (steps %d-%d): prompt %s, paired ratio %.2f, losses flow %.2g id %.2g "
                    "contrastive %.2g, lr %.2g", active.index + 1, len(self.schedule.phases), phase.name,
                    active.start_step, active.end_step - 1, phase.prompt_mode, phase.paired_ratio,
                    phase.loss.flow, phase.loss.id, phase.loss.contrastive, lr)

    def _next_batch(self) -> dict:
        while True:
            positions = next(self.batches)
            batch = collate([self.dataset[p] for p in positions])
            if batch["skipped"]:
                self.skipped_images += len(batch["skipped"])
                logger.warning("%d unreadable image(s) skipped so far", self.skipped_images)
            if batch["size"]:
                return batch

    # ------------------------------------------------------------------ step
    def _encode_text(self, captions: list[str]):
        if self.text_cache is None:
            return self.models.text(captions)
        texts, pooled = [], []
        for caption in captions:
            cached = self.text_cache.get(caption)
            if cached is None:
                t, p = self.models.text([caption])
                cached = {"t5": t[0], "pooled": p[0]}
                self.text_cache.put(caption, cached)
            texts.append(cached["t5"].to(self.accelerator.device))
            pooled.append(cached["pooled"].to(self.accelerator.device))
        return torch.stack(texts), torch.stack(pooled)

    @torch.no_grad()
    def _siglip(self, crops: torch.Tensor) -> torch.Tensor:
        b, n = crops.shape[:2]
        feats = self.models.siglip.encode([c.numpy() for c in crops.reshape(b * n, *crops.shape[2:])])
        return feats.reshape(b, n, *feats.shape[1:]).to(self.accelerator.device)

    def compute_losses(self, batch: dict, phase, generator: torch.Generator) -> dict[str, torch.Tensor]:
        acc, models, cfg = self.accelerator, self.models, self.config
        device = acc.device
        pixels = batch["pixels"].to(device)
        b, _, height, width = pixels.shape
        vae = models.vae
        with torch.no_grad():
            dist = vae.encode(pixels * 2 - 1).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device)
            clean = pack_latents((latents - vae.config.shift_factor) * vae.config.scaling_factor)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        t = sample_timesteps(b, clean.shape[1], generator).to(device)
        noisy = (1 - t.view(-1, 1, 1)) * clean + t.view(-1, 1, 1) * noise
        text, pooled = self._encode_text(batch["caption"])
        siglip = self._siglip(batch["ref_siglip_crops"])
        arcface = batch["ref_embeddings"].to(device)
        boxes = batch["boxes"].tolist()
        with acc.autocast():
            velocity = self.denoiser(noisy, t, text, pooled, torch.full((b,), cfg.train.guidance, device=device),
                                     arcface, siglip, boxes, height, width, cfg.train.id_weight,
                                     cfg.train.siglip_weight)
        losses = {"flow": flow_matching_loss(velocity, noise, clean)}
        if phase.loss.id > 0 or phase.loss.contrastive > 0:
            losses.update(self._identity_losses(batch, phase, noisy, velocity, t, height, width, generator))
        losses["total"] = sum(getattr(phase.loss, k) * v for k, v in losses.items())
        return losses

    def _identity_losses(self, batch, phase, noisy, velocity, t, height, width, generator):
        acc, models = self.accelerator, self.models
        if models.arcface is None:
            raise ConfigError(f"phase {phase.name} uses ID losses: set models.antelopev2 to the insightface models root")
        gated = id_gate(t, phase.id_gate)
        n = batch["num_persons"]
        b = t.shape[0]
        # every rank must agree on skipping, or the contrastive gather would wait forever
        any_gated = acc.reduce(gated.any().float().reshape(1), reduction="sum").item() > 0
        if not any_gated:
            return {}
        generated = torch.zeros(b, n, 512, device=acc.device)
        if gated.any():
            idx = gated.nonzero().flatten()
            vae = models.vae
            z = unpack_latents(predicted_clean(noisy[idx], velocity[idx], t[idx]), height, width)
            z = z / vae.config.scaling_factor + vae.config.shift_factor
            images = ((vae.decode(z.to(next(vae.parameters()).dtype)).sample.float() + 1) / 2).clamp(0, 1)
            landmarks = batch["landmarks"][idx.cpu()].to(acc.device)
            generated = generated.index_put((idx,), face_embeddings(images, landmarks, models.arcface).float())
        out = {}
        gt = batch["gt_embeddings"].to(acc.device)
        valid = gated[:, None].expand(b, n).reshape(-1)
        if phase.loss.id > 0:
            out["id"] = id_loss(generated[gated], gt[gated]) if gated.any() else generated.sum() * 0.0
        if phase.loss.contrastive > 0:
            ids = batch["identity_ids"]
            negatives = self.pool.sample(phase.negatives, ids.flatten(), generator)
            out["contrastive"] = contrastive_loss(
                generated.reshape(b * n, -1), valid, batch["ref_embeddings"].to(acc.device).reshape(b * n, -1),
                ids.to(acc.device).reshape(-1), negatives, phase.temperature)
        return out

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        self.resume()
        total = self.schedule.total_steps
        if self.step >= total:
            logger.info("training already finished (%d steps)", total)
            return
        bar = tqdm(total=total, initial=self.step, disable=not acc.is_main_process, desc="train", unit="step")
        started = time.time()
        while self.step < total:
            active = self.schedule.at(self.step)
            if active.index != self.phase_index:
                self._enter_phase(active)
            batch = self._next_batch()
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * 97 + acc.process_index)
            losses = self.compute_losses(batch, active.phase, generator)
            acc.backward(losses["total"])
            if acc.sync_gradients and cfg.train.optimizer.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, cfg.train.optimizer.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            values = {f"loss/{k}": acc.reduce(v.detach().reshape(1), reduction="mean").item() for k, v in losses.items()}
            self.last_losses = values
            self._record(values, active)
            if self.step % cfg.log_every == 0 or self.step == total:
                values.update({"lr": self.lr_scheduler.get_last_lr()[0], "phase": active.index})
                if cfg.tensorboard:
                    acc.log(values, step=self.step)
                logger.info("step %d/%d phase %s: %s", self.step, total, active.phase.name,
                            " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items() if k.startswith("loss")))
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss/total']:.4f}", phase=active.phase.name)
            if self.step % cfg.checkpoint.every == 0 or self.step == total:
                self.save(active)
            if cfg.sample.every and self.step % cfg.sample.every == 0:
                self.sample()
        bar.close()
        logger.info("finished %d steps in %.0f s; %d unreadable images skipped", total, time.time() - started,
                    self.skipped_images)
        acc.end_training()

    def _record(self, values: dict, active) -> None:
        """Append this step's losses to ``<output_dir>/losses.jsonl`` (main process)."""
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "losses.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": self.step, "phase": active.phase.name, **values}) + "\n")

    def save(self, active) -> None:
        cfg = self.config
        state = {
            "step": self.step,
            "phase": active.index if self.step < active.end_step else active.index + 1,
            "phase_name": active.phase.name,
            "sampler": self.sampler.state_dict() if self.step < active.end_step else {"epoch": 0, "position": 0},
            "skipped_images": self.skipped_images,
            "losses": getattr(self, "last_losses", {}),
        }
        alpha = cfg.train.lora.alpha if cfg.train.mode == "lora" else None
        save_checkpoint(self.accelerator, cfg.output_dir, self.step, self.models, state, alpha, cfg.checkpoint.keep)

    def sample(self) -> None:
        from train.sampling import sample_image, save_sample

        acc, cfg = self.accelerator, self.config
        if not acc.is_main_process:
            return
        s = cfg.sample
        # the same identities and layout every time: the first record, unpaired, at the sample size
        item = WithAnyoneDataset(self.manifest, DataOptions(buckets=((s.width, s.height),)), index=self.index)[0]
        if "skipped" in item:
            logger.warning("sample skipped: the first record's image is unreadable")
            return
        siglip = self._siglip(item["ref_siglip_crops"][None])
        image = sample_image(self.models, acc.unwrap_model(self.denoiser), s.prompt,
                             item["ref_embeddings"][None].to(acc.device), siglip, [item["boxes"].tolist()],
                             s.width, s.height, s.steps, s.seed, cfg.train.guidance,
                             cfg.train.id_weight, cfg.train.siglip_weight)
        path = save_sample(image, Path(cfg.output_dir) / "samples", self.step)
        logger.info("sample written to %s", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see train/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.mode=lora (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        parser.error(str(exc))
    Trainer(config).run()


if __name__ == "__main__":
    main()
