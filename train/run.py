"""Train WithAnyone: ``python train/run.py --config FILE [--set key=value ...]``.

Multi-GPU / multi-node through accelerate, e.g.
``accelerate launch --num_processes 8 train/run.py --config train/configs/flux-dev-adapter.yaml``
(DeepSpeed ZeRO-2: ``--config_file train/configs/accelerate-deepspeed-zero2.yaml``).
Rerunning with the same ``output_dir`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # python train/run.py
    import _script

    _script.run_as_module("run")

from train.checkpointing import (  # noqa: E402
    CheckpointError,
    choose_resume_checkpoint,
    first_nonfinite,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from train.config import Config, ConfigError, check_paths, load_config, resolved_paths  # noqa: E402
from train.data import BadDataError, DataOptions, NegativePool, SkipLedger, TextEmbeddingCache  # noqa: E402
from train.data.sources import DataSource, PhaseLoading, open_data_source  # noqa: E402
from train.lean import build_optimizer, cache_and_release_text, captions_of_run, offload_idle_branch  # noqa: E402
from train.models import (  # noqa: E402
    ModelSet,
    apply_frozen_storage,
    branch_weights,
    frozen_dtype,
    load_models,
    set_trainable,
)
from train.objective import Conditioning, TrainingObjective  # noqa: E402
from train.phases import PhaseSchedule  # noqa: E402
from train.processes import main_process_first  # noqa: E402

logger = logging.getLogger("withanyone.train")


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message is one line saying why and what to do."""


def finite_or_none(values: dict) -> dict:
    """A NaN or an infinity becomes None (``null`` in JSON): the loss log and trainer.json stay valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


class Trainer:
    def __init__(self, config: Config):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        acc = self.accelerator
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and acc.num_processes != world:
            # e.g. torchrun on a machine without GPUs: every process would train alone on the same folder
            raise RuntimeError(
                f"{world} processes were launched but accelerate did not set up distributed training "
                f"(it sees {acc.num_processes}). On CPU-only machines set ACCELERATE_USE_CPU=1 when launching."
            )
        check_paths(config)  # before any model loads: a wrong path never becomes a hub request
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for key, path in resolved_paths(config):
                logger.info("%s = %s", key, path)
        torch.manual_seed(config.seed)
        self.models: ModelSet = load_models(config)
        self.params = set_trainable(
            self.models,
            config.train.mode,
            config.train.lora,
            config.train.branch,
            config.train.adapter_lora,
            frozen_dtype(config),
        )
        apply_frozen_storage(self.models, config)
        self.id_weight, self.siglip_weight = branch_weights(config)
        if config.train.mixed_precision == "bf16":  # the idle branch of a one-branch run needs no fp32 copy
            for p in self.models.adapter.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(frozen_dtype(config))
        if config.train.gradient_checkpointing:
            self.models.denoiser.handle.enable_gradient_checkpointing()  # keeps identities on recomputation
        # every bad sample is skipped and named; above data.max_bad_fraction the run stops (train/data/skips.py)
        self.skips = SkipLedger(
            config.data.max_bad_fraction,
            self.output_dir / ("skipped.jsonl" if acc.is_main_process else f"skipped-rank{acc.process_index}.jsonl"),
        )
        # the manifest, MultiID-2M shards or a mix: loaders, resume state, negatives, the sample item
        self.data: DataSource = open_data_source(config, acc, self.skips, self.output_dir)
        self.pool = NegativePool.load(config.data.negatives) if config.data.negatives else self.data.negative_pool(acc)
        self.text_cache = TextEmbeddingCache(config.data.text_cache) if config.data.text_cache else None
        if config.train.release_text_encoders:  # before FLUX reaches the GPU: T5 and CLIP leave first
            cache_and_release_text(
                self.models, captions_of_run(config, self.data.manifest), acc.device, self.text_cache
            )
        self.schedule = PhaseSchedule(config.phases)
        opt = config.train.optimizer
        self.optimizer = build_optimizer(self.params, opt, self.schedule.lr_at(0, opt.lr, opt.warmup_steps))
        # no scheduler object: the learning rate is a function of the global step (PhaseSchedule.lr_at),
        # set once per optimizer step, so it cannot depend on the number of processes
        self.denoiser, self.optimizer = acc.prepare(self.models.denoiser, self.optimizer)
        self.detector = None
        if any(not p.gt_aligned and p.uses_id_losses for p in config.phases):
            from withanyone_core.faces import FaceAnalyzer

            # the authors' pre-training ID loss detects faces on the prediction (antelopev2's SCRFD)
            self.detector = FaceAnalyzer(config.models.antelopev2, providers="auto")
        device = acc.device
        for module in (self.models.vae, self.models.text, self.models.arcface):
            if module is not None:
                module.to(device)
        if self.models.siglip is not None:
            self.models.siglip.model.to(device)
        self.offloaded = (
            offload_idle_branch(self.models.adapter, config.train.branch) if config.train.idle_branch_on_cpu else 0
        )
        self.conditioning = Conditioning(self.models, device, self.text_cache)
        self.data_events: dict[str, int] = {}
        self.objective = TrainingObjective(
            acc,
            self.models,
            self.denoiser,
            self.conditioning,
            self.pool,
            self.detector,
            config.train,
            self.id_weight,
            self.siglip_weight,
            self.data_events,
        )
        self.step = 0
        self.phase_index = -1
        self.resume_state: dict | None = None  # the checkpoint's, until the phase it was saved in starts
        self.skipped_images = 0
        self.last_lr = self.schedule.lr_at(0, opt.lr, opt.warmup_steps)
        # steps whose loss or gradients were not finite: skipped, never applied (global step numbers)
        self.nonfinite_steps: list[int] = []
        self.nonfinite_in_row = 0
        self.param_names = {id(p): n for n, p in self.models.denoiser.named_parameters()}
        self.memory_estimate = None
        if acc.is_main_process:
            self._log_memory_estimate()
        if config.tensorboard:
            acc.init_trackers("withanyone")

    def _log_memory_estimate(self) -> None:
        from train.lean import IDLE_MODULES
        from train.memory import device_frozen_bytes, estimate_training_memory

        cfg, acc, models = self.config, self.accelerator, self.models
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        zero_stage = int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0
        width, height = max((tuple(b) for b in cfg.data.buckets), key=lambda wh: wh[0] * wh[1])
        uses_id = any(p.uses_id_losses for p in cfg.phases)
        branches = {"arcface": ("arc",), "siglip": ("sig",), "both": ("arc", "sig")}[cfg.train.branch]
        compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else frozen_dtype(cfg)
        try:
            estimate = estimate_training_memory(
                frozen_bytes=device_frozen_bytes(
                    [models.denoiser, models.vae, models.text, models.arcface, getattr(models.siglip, "model", None)],
                    [getattr(models.adapter, n) for n in IDLE_MODULES[cfg.train.branch]] if self.offloaded else (),
                ),
                trainable_params=sum(p.numel() for p in self.params),
                optimizer=cfg.train.optimizer.name,
                trainable_numels=[p.numel() for p in self.params],
                frozen_storage=cfg.train.frozen_storage,
                adapter_lora_rank=cfg.train.adapter_lora.rank,
                transformer_config=models.transformer.config,
                vae_config=models.vae.config,
                batch=cfg.data.batch_size,
                height=height,
                width=width,
                text_tokens=models.text.t5_length,
                compute_dtype=compute,
                gradient_checkpointing=cfg.train.gradient_checkpointing,
                id_losses=uses_id,
                adapter_config=models.adapter.config,
                adapter_branches=branches,
                zero_stage=zero_stage,
                num_processes=acc.num_processes,
            )
        except Exception as exc:  # an estimate must never stop a run
            logger.warning("memory estimate unavailable (%s: %s)", type(exc).__name__, exc)
            return
        self.memory_estimate = estimate
        logger.info(
            "estimated memory per %s: %s at %dx%d, batch %d%s",
            "GPU" if acc.device.type == "cuda" else "process",
            estimate.describe(),
            width,
            height,
            cfg.data.batch_size,
            f", ZeRO-{zero_stage} over {acc.num_processes}" if zero_stage else "",
        )

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        acc = self.accelerator

        def choose():
            remove_partial(self.output_dir)
            return choose_resume_checkpoint(self.output_dir)  # damaged ones are set aside, with a warning

        chosen = main_process_first(acc, choose, "checking the checkpoints")
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [None if chosen is None else (chosen[0], str(chosen[1]))]
            broadcast_object_list(box, from_process=0)
            chosen = None if box[0] is None else (box[0][0], Path(box[0][1]))
        latest = chosen
        if latest is None:
            logger.info("starting a new run in %s", self.output_dir)
            self._trim_loss_log()
            return
        step, folder = latest
        state = load_checkpoint(self.accelerator, folder)
        self.step = state["step"]
        self.phase_index = -1
        self.resume_state = state
        self.skipped_images = state.get("skipped_images", 0)
        self.nonfinite_steps = list(state.get("nonfinite_steps", []))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
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
        options = DataOptions.from_phase(
            phase,
            cfg.data.buckets,
            siglip_crops=self.models.siglip is not None,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        saved = self.resume_state if self.resume_state and self.resume_state["phase"] == active.index else None
        self.resume_state = None
        self.data.stop()
        if cfg.data.num_workers and sys.platform == "linux":
            # a forked worker must not inherit garbage it would collect itself: an unreachable onnxruntime
            # session (face models) blocks forever in its destructor there (its thread pool stayed behind)
            gc.collect()
        reads = self.data.start_phase(
            PhaseLoading(
                options,
                cfg.data.batch_size,
                cfg.seed + active.index,
                acc.process_index,
                acc.num_processes,
                cfg.data.num_workers,
            ),
            saved,
        )
        lr = phase.lr if phase.lr is not None else cfg.train.optimizer.lr
        if phase.reset_optimizer and self.step == active.start_step and self.step > 0:
            getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
            logger.info("phase %s: optimizer state reset", phase.name)
        self.phase_index = active.index
        logger.info(
            "phase %d/%d '%s' (steps %d-%d): prompt %s, paired ratio %.2f, losses flow %.2g id %.2g "
            "contrastive %.2g (%s), lr %.2g, %s",
            active.index + 1,
            len(self.schedule.phases),
            phase.name,
            active.start_step,
            active.end_step - 1,
            phase.prompt_mode,
            phase.paired_ratio,
            phase.loss.flow,
            phase.loss.id,
            phase.loss.contrastive,
            "GT-aligned" if phase.gt_aligned else "faces detected on the prediction",
            lr,
            reads,
        )

    def _next_batch(self) -> dict:
        empty, reasons = 0, {}
        source = self.data.for_step(self.step)  # a mix draws one of its parts from (seed, step)
        if source is not self.data:
            name = f"batches_from_{source.kind}"
            self.data_events[name] = self.data_events.get(name, 0) + 1
        while True:
            batch = source.next_batch()
            for event in batch["events"]:
                self.data_events[event] = self.data_events.get(event, 0) + 1
            self.skips.add(batch.get("bad", ()))
            self.skips.seen(batch["read"] if "read" in batch else len(batch["keys"]))
            if batch["skipped"]:
                self.skipped_images += len(batch["skipped"])
                logger.warning("%d unreadable image(s) skipped so far", self.skipped_images)
            if batch["size"]:
                self._check_skips()  # once per step on every rank (a collective when there are several)
                return batch
            empty += 1
            for _, reason in batch["dropped"]:
                reasons[reason] = reasons.get(reason, 0) + 1
            if empty >= source.patience:
                raise RuntimeError(
                    f"phase {self.schedule.phases[self.phase_index].name}: no usable item in {empty} batches in a row "
                    f"(dropped: {reasons or 'unreadable images'}); for paired references lower "
                    "paired_min_similarity or set paired_fallback: self"
                )

    def _check_skips(self, final: bool = False) -> None:
        """Stop above data.max_bad_fraction, judged on every process's counts (one decision for all ranks)."""
        totals = torch.tensor(
            [len(self.skips.entries), self.skips.read], dtype=torch.float64, device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        self.skips.check(final, tuple(totals.tolist()))

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
            losses = self.objective(batch, active.phase, generator)
            # every rank gets the same answer: a non-finite loss anywhere skips backward everywhere (under
            # DeepSpeed backward also steps), a non-finite gradient skips the optimizer step
            problem = self._agree(self._loss_problem(losses))
            if problem is None:
                acc.backward(losses["total"])
                problem = self._agree(self._gradient_problem())
            if problem is None and acc.sync_gradients and cfg.train.optimizer.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, cfg.train.optimizer.max_grad_norm)
            lr = self.schedule.lr_at(self.step, cfg.train.optimizer.lr, cfg.train.optimizer.warmup_steps)
            for group in self.optimizer.param_groups:  # once per optimizer step, from the phase's first step
                group["lr"] = lr
            self.last_lr = lr
            if problem is None:
                self.optimizer.step()
                self.nonfinite_in_row = 0
            else:  # never applied: weights and optimizer state (moments, step count) stay as they are
                self.nonfinite_steps.append(self.step + 1)
                self.nonfinite_in_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            values = finite_or_none(
                {f"loss/{k}": acc.reduce(v.detach().reshape(1), reduction="mean").item() for k, v in losses.items()}
            )
            self.last_losses = values
            self._record({**values, "lr": lr, **({"skipped": True, "reason": problem} if problem else {})}, active)
            if problem is not None:
                self._skipped_step(problem, active)
            if self.step % cfg.log_every == 0 or self.step == total:
                values.update({"lr": lr, "phase": active.index})
                if cfg.tensorboard:
                    acc.log({k: v for k, v in values.items() if v is not None}, step=self.step)
                logger.info(
                    "step %d/%d phase %s: %s",
                    self.step,
                    total,
                    active.phase.name,
                    " ".join(
                        f"{k.split('/')[-1]} {'nan' if v is None else format(v, '.4g')}"
                        for k, v in values.items()
                        if k.startswith("loss")
                    ),
                )
            bar.update(1)
            total_loss = values.get("loss/total")
            bar.set_postfix(loss="skipped" if total_loss is None else f"{total_loss:.4f}", phase=active.phase.name)
            if self.step % cfg.checkpoint.every == 0 or self.step == total:
                self.save(active)
            if cfg.sample.every and self.step % cfg.sample.every == 0:
                self.sample()
        bar.close()
        self.data.stop()  # ends the DataLoader workers
        logger.info(
            "finished %d steps in %.0f s; %d unreadable images skipped",
            total,
            time.time() - started,
            self.skipped_images,
        )
        if self.data_events:
            logger.info("data: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.data_events.items())))
        if self.nonfinite_steps:
            logger.warning(
                "%d step(s) skipped for a non-finite loss or gradient (never applied): %s",
                len(self.nonfinite_steps),
                self._step_list(),
            )
        else:
            logger.info("no step skipped for a non-finite loss or gradient")
        logger.info("data: %s", self.skips.summary())
        self._check_skips(final=True)
        acc.end_training()

    def _step_list(self) -> str:
        steps = self.nonfinite_steps
        shown = ", ".join(str(s) for s in steps[:20])
        return f"steps {shown}" + (
            f' and {len(steps) - 20} more (losses.jsonl rows with "skipped": true)' if len(steps) > 20 else ""
        )

    @staticmethod
    def _loss_problem(losses: dict[str, torch.Tensor]) -> str | None:
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        return f"non-finite loss ({', '.join(bad)})" if bad else None

    def _gradient_problem(self) -> str | None:
        # (DeepSpeed keeps the gradients in its engine: there p.grad is None and only the loss is checked)
        grads = [(self.param_names.get(id(p), "a parameter"), p.grad) for p in self.params if p.grad is not None]
        # one device sync for all gradients; the name is looked up only when one is bad
        if grads and not bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            return f"non-finite gradient (first: {first_nonfinite(grads)})"
        return None

    def _agree(self, problem: str | None) -> str | None:
        """Every rank takes part and gets the same answer: one rank stepping while another skips would split
        the weights (and DDP would wait forever for a backward that one rank skipped)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return problem
        flag = acc.reduce(torch.tensor([0.0 if problem is None else 1.0], device=acc.device), reduction="sum")
        if problem is None and float(flag.item()) > 0:
            return "non-finite loss or gradient on another process"
        return problem

    def _skipped_step(self, problem: str, active) -> None:
        limit = self.config.train.max_nonfinite_steps
        logger.warning(
            "step %d (phase %s) skipped: %s; weights and optimizer state unchanged (%d in a row, "
            "the run stops at %d: train.max_nonfinite_steps)",
            self.step,
            active.phase.name,
            problem,
            self.nonfinite_in_row,
            limit,
        )
        if self.nonfinite_in_row < limit:
            return
        poisoned = first_nonfinite((self.param_names.get(id(p), "a parameter"), p.detach()) for p in self.params)
        models = self.models
        frozen = first_nonfinite(
            (f"{what} {name}", p.detach())
            for what, module in (
                ("FLUX", models.denoiser),
                ("VAE", models.vae),
                ("text encoders", models.text),
                ("ArcFace", models.arcface),
                ("SigLIP", getattr(models.siglip, "model", None)),
            )
            if isinstance(module, torch.nn.Module)
            for name, p in module.named_parameters()
            if not p.requires_grad
        )
        if poisoned is not None:
            cause = (
                f"the trainable weight {poisoned} itself is not finite, so resume from the newest checkpoint "
                "with a lower learning rate"
            )
        elif frozen is not None:
            cause = (
                f"the frozen model weight {frozen} is not finite: the model files under models.* are damaged; "
                "download or convert them again"
            )
        else:
            cause = (
                "check the data named in the warnings above, lower the learning rate (train.optimizer.lr, "
                "phases.N.lr) or keep gradient clipping on (train.optimizer.max_grad_norm), then rerun to "
                "resume from the newest checkpoint"
            )
        raise TrainingStopped(
            f"stopped at step {self.step}: {self.nonfinite_in_row} steps in a row had a {problem} "
            f"(train.max_nonfinite_steps={limit}); none of them was applied and no checkpoint holds a non-finite "
            f"tensor. {cause[0].upper() + cause[1:]}"
        )

    def _record(self, values: dict, active) -> None:
        """Append this step's losses to ``<output_dir>/losses.jsonl`` (main process)."""
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "losses.jsonl", "a", encoding="utf-8") as fh:
            # allow_nan=False: a NaN that slipped past finite_or_none stops here instead of writing bare NaN
            fh.write(
                json.dumps(finite_or_none({"step": self.step, "phase": active.phase.name, **values}), allow_nan=False)
                + "\n"
            )

    def save(self, active) -> None:
        cfg = self.config
        state = {
            "step": self.step,
            "phase": active.index if self.step < active.end_step else active.index + 1,
            "phase_name": active.phase.name,
            **self.data.state(phase_done=self.step >= active.end_step),  # "sampler" and "stream"
            "skipped_images": self.skipped_images,
            "losses": finite_or_none(getattr(self, "last_losses", {})),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
        }
        alpha = cfg.train.lora.alpha if cfg.train.mode == "lora" else None
        save_checkpoint(
            self.accelerator,
            cfg.output_dir,
            self.step,
            self.models,
            state,
            alpha,
            cfg.checkpoint.keep,
            adapter_metadata={"branch": cfg.train.branch},
            optimizer=self.optimizer,
        )

    def sample(self) -> None:
        from train.sampling import sample_image, save_sample

        acc, cfg = self.accelerator, self.config
        if not acc.is_main_process:
            return
        s = cfg.sample
        # the same identities and layout every time: the first record, unpaired, at the sample size
        options = DataOptions(
            buckets=((s.width, s.height),),
            crop="center",
            min_face_size=0.0,
            siglip_crops=self.models.siglip is not None,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        if getattr(self, "sample_item", None) is None:  # the first record/sample that loads whole, found once
            self.sample_item = self.data.sample_item(options) or {"skipped": True}
        item = self.sample_item
        if "skipped" in item:
            logger.warning("sample skipped: none of the first records/samples loads (each was named above)")
            return
        arcface, siglip = self.conditioning.identities(
            {k: item[k][None] for k in ("ref_embeddings", "ref_siglip_crops") if k in item}
        )
        with acc.autocast():
            image = sample_image(
                self.models,
                acc.unwrap_model(self.denoiser),
                s.prompt,
                arcface,
                siglip,
                [item["boxes"].tolist()],
                s.width,
                s.height,
                s.steps,
                s.seed,
                cfg.train.guidance,
                self.id_weight,
                self.siglip_weight,
            )
        path = save_sample(image, Path(cfg.output_dir) / "samples", self.step)
        logger.info("sample written to %s", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see train/configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.mode=lora (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # every configuration error, before any model loads: one line (and the config's setup hint), exit 2
        config = load_config(args.config, args.set)
        check_paths(config)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    try:
        Trainer(config).run()
    except (TrainingStopped, CheckpointError, BadDataError) as exc:  # says what to do already: no traceback
        logger.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
