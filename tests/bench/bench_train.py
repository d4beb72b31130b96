"""Training benchmark: the smoke config measured side by side in one run, and memory at FLUX.1-dev size.

- steps/s and peak memory (RSS growth of the process, CPU; CUDA peak allocated on a GPU)
  for adapter-only vs adapter + LoRA vs adapter-lean training, next to the trainer's own memory estimate;
- per-GPU memory at FLUX.1-dev size (512 px, batch 1, bf16, gradient checkpointing) for
  each training mode (adapter-lean: train/configs/consumer-24gb.yaml's options), with and without
  DeepSpeed ZeRO-2 over 8 ranks: parameters counted
  from the real architectures built on the meta device, activations measured there (see
  train/memory.py); ends with the one-line summary;
- per-step cost of building the region masks/layout: the reference's loop-built
  ``[B, heads, L, n * id_len]`` masks for both branches vs our ``[B, L, n]`` layout +
  token selection, for the smoke batch and for a FLUX.1-dev-sized 512 px batch.

    .venv/bin/python tests/bench/bench_train.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.reference_flux import reference_mask  # noqa: E402
from train.smoke_data import build_smoke_set  # noqa: E402
from withanyone_core.attention import select_tokens  # noqa: E402
from withanyone_core.layout import TokenGrid, build_layout  # noqa: E402

logger = logging.getLogger("bench_train")
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _peak_rss_mb()


def lean_overrides() -> list[str]:
    """The adapter-lean mode on the smoke set (LoRA rank 16 on the tiny adapter; plain AdamW without bitsandbytes)."""
    import importlib.util

    optimizer = LEAN["optimizer"] if importlib.util.find_spec("bitsandbytes") else "adamw"
    return [
        "train.mode=adapter",
        "train.branch=arcface",
        f"train.frozen_storage={LEAN['frozen_storage']}",
        f"train.optimizer.name={optimizer}",
        "train.adapter_lora.rank=16",
        "train.release_text_encoders=true",
        "train.idle_branch_on_cpu=true",
        "train.gradient_checkpointing=true",
    ]


def train_speed(mode: str, steps: int) -> tuple[float, float, float]:
    from train.config import load_config
    from train.run import Trainer

    with tempfile.TemporaryDirectory() as out:
        phases = f"phases=[{{name: bench, steps: {steps}, paired_ratio: 0.5, min_face_size: 32}}]"
        modes = lean_overrides() if mode == "adapter-lean" else [f"train.mode={mode}"]
        config = load_config(
            SMOKE,
            [
                f"output_dir={out}",
                *modes,
                "train.lora.rank=16",
                phases,
                f"checkpoint.every={steps + 1}",
                "sample.every=0",
                "tensorboard=false",
            ],
        )
        config.checkpoint.every = steps  # one save at the end only
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        baseline = _rss_mb()
        trainer = Trainer(config)
        start = time.perf_counter()
        trainer.run()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb() - baseline
        estimate = trainer.memory_estimate.total / 2**20 if trainer.memory_estimate else float("nan")
    return steps / elapsed, peak, estimate


# FLUX.1-dev and its encoders as released (diffusers configs of black-forest-labs/FLUX.1-dev)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
GLINTR100_PARAMS = 65_150_000  # antelopev2's glintr100.onnx: 261 MB of fp32 weights (IResNet-100)


# the memory-lean mode of train/configs/consumer-24gb.yaml (README, training guide, "Memory")
LEAN = dict(
    frozen_storage="fp8_e4m3fn", optimizer="adamw8bit", adapter_lora_rank=64, release_text=True, idle_on_cpu=True
)


def flux_dev_memory(
    text_tokens: int = 512, size: int = 512, ranks: int = 8, labels: tuple[str, ...] | None = None
) -> dict[tuple[str, int], object]:
    """Per-GPU estimates at FLUX.1-dev size: {(mode label, ZeRO stage): MemoryEstimate}.

    Every mode's models are built on the meta device and changed by the trainer's own code
    (fp8 storage, adapter LoRA, ...); weights, gradients and optimizer states are counted by the
    trainer's accounting (train/memory.py) from those modules."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from train.config import LoraConfig
    from train.lean import IDLE_MODULES, add_adapter_lora, store_frozen_fp8
    from train.memory import device_frozen_bytes, estimate_training_memory, lora_parameter_count
    from train.models import BRANCH_PREFIXES
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    bf16 = torch.bfloat16
    with torch.device("meta"):
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        ).to(bf16)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
            )
        ).to(bf16)
        vae = AutoencoderKL(**FLUX_DEV_VAE).to(bf16)
        siglip = SiglipVisionModel(SiglipVisionConfig(image_size=256, patch_size=16))
    for frozen_model in (t5, clip, vae, siglip):
        frozen_model.requires_grad_(False)
    arcface_bytes = GLINTR100_PARAMS * 4  # ArcFace stays fp32
    rows = {}
    cases = {  # label: (mode, adapter branch, lean options)
        "adapter": ("adapter", "arcface", {}),
        "adapter, both branches": ("adapter", "both", {}),
        "lora": ("lora", "arcface", {}),
        "full": ("full", "arcface", {}),
        "adapter-lean": ("adapter", "arcface", LEAN),
    }
    for label, (mode, branch, lean) in cases.items():
        if labels is not None and label not in labels:
            continue
        with torch.device("meta"):
            flux = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).to(bf16).requires_grad_(False)
            adapter = IdentityAdapter(AdapterConfig())
        prefixes = BRANCH_PREFIXES[branch]
        if lean.get("adapter_lora_rank"):  # the trainer's set_trainable path
            params = add_adapter_lora(
                adapter, prefixes, lean["adapter_lora_rank"], float(lean["adapter_lora_rank"]), bf16
            )
        else:
            params = [p for n, p in adapter.named_parameters() if n.startswith(prefixes)]
            for n, p in adapter.named_parameters():
                p.requires_grad_(n.startswith(prefixes))
        for p in adapter.parameters():  # the idle branch (and a LoRA'd branch's base) in bf16, as the trainer does
            if not p.requires_grad:
                p.data = p.data.to(bf16)
        if lean.get("frozen_storage"):
            store_frozen_fp8(flux, lean["frozen_storage"])
        numels = [p.numel() for p in params]
        if mode == "lora":
            numels.append(lora_parameter_count(flux, LoraConfig().targets, 32))
        if mode == "full":
            numels += [p.numel() for p in flux.parameters()]
            flux_frozen = []
        else:
            flux_frozen = [flux]
        encoders = [] if lean.get("release_text") else [t5, clip]
        idle = [getattr(adapter, n) for n in IDLE_MODULES[branch]] if lean.get("idle_on_cpu") else []
        frozen = (
            device_frozen_bytes([*flux_frozen, adapter, vae, *encoders, siglip if branch != "arcface" else None], idle)
            + arcface_bytes
        )
        for zero, n in ((0, 1), (2, ranks)):
            if zero and lean.get("optimizer", "adamw") != "adamw":
                continue  # DeepSpeed brings its own optimizer: the lean mode is for one GPU
            rows[(label, zero)] = estimate_training_memory(
                frozen_bytes=frozen,
                trainable_params=sum(numels),
                transformer_config=flux.config,
                vae_config=vae.config,
                batch=1,
                height=size,
                width=size,
                text_tokens=text_tokens,
                compute_dtype=bf16,
                gradient_checkpointing=True,
                id_losses=True,
                adapter_config=adapter.config,
                adapter_branches={"arcface": ("arc",), "both": ("arc", "sig")}[branch],
                zero_stage=zero,
                num_processes=n,
                optimizer=lean.get("optimizer", "adamw"),
                trainable_numels=numels if zero == 0 and lean else None,
                frozen_storage=lean.get("frozen_storage", "default"),
                adapter_lora_rank=lean.get("adapter_lora_rank", 0),
            )
    return rows


def report_memory() -> None:
    rows = flux_dev_memory()
    logger.info(
        "memory per GPU at FLUX.1-dev, 512 px, batch 1, bf16, gradient checkpointing, ID losses on "
        "(GB: frozen weights + trainable weights + gradients + optimizer states + activations = total):"
    )
    for (label, zero), est in rows.items():
        where = "1 GPU           " if zero == 0 else "ZeRO-2 over 8   "
        logger.info(
            "  %-24s %s %5.1f + %5.1f + %5.1f + %6.1f + %4.1f = %6.1f",
            label,
            where,
            est.frozen_weights / 1e9,
            est.trainable_weights / 1e9,
            est.gradients / 1e9,
            est.optimizer / 1e9,
            est.activations / 1e9,
            est.total / 1e9,
        )
    logger.info("  adapter-lean: %s", ", ".join(f"{k} {v}" for k, v in LEAN.items()))
    logger.info(
        "train memory at FLUX.1-dev 512² batch 1: adapter %.1f GB, lora %.1f GB, full %.1f GB, "
        "adapter-lean %.1f GB per GPU",
        rows[("adapter", 0)].total / 1e9,
        rows[("lora", 0)].total / 1e9,
        rows[("full", 2)].total / 1e9,
        rows[("adapter-lean", 0)].total / 1e9,
    )


def mask_cost(batch: int, height: int, width: int, persons: int, heads: int, reps: int) -> tuple[float, float]:
    boxes = [[[40 + 110 * k, 60, 130 + 110 * k, 170] for k in range(persons)] for _ in range(batch)]
    grid = TokenGrid.for_pixels(height, width, padded=False)

    def reference():
        reference_mask(boxes, height, width, 8, heads, persons)
        reference_mask(boxes, height, width, 264, heads, persons)

    def ours():
        select_tokens(build_layout(boxes, grid, persons, batch))

    def best(fn, n):
        t = float("inf")
        for _ in range(n):
            s = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - s)
        return t

    return best(reference, max(1, reps // 4)), best(ours, reps)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("accelerate", "withanyone.train", "train", "withanyone_core", "withanyone.prepare"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each mode")
    parser.add_argument("--mode", choices=["adapter", "lora", "adapter-lean"], help=argparse.SUPPRESS)  # one child run
    parser.add_argument("--memory-only", action="store_true", help="only the FLUX.1-dev memory table")
    args = parser.parse_args()
    if args.mode:
        speed, peak, estimate = train_speed(args.mode, args.steps)
        sys.stdout.write("RESULT " + json.dumps({"speed": speed, "peak": peak, "estimate": estimate}) + "\n")
        return
    if args.memory_only:
        report_memory()
        return
    build_smoke_set(ROOT / ".cache" / "smoke")
    runs: dict[str, list[dict]] = {"adapter": [], "lora": [], "adapter-lean": []}
    for _ in range(args.rounds):  # interleaved, separate processes (peak memory is per process)
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[mode].append(json.loads(out.split("RESULT ")[-1]))
    unit = "allocated on the GPU" if torch.cuda.is_available() else "process RSS growth"
    median = {mode: statistics.median(r["speed"] for r in rows) for mode, rows in runs.items()}
    for mode, rows in runs.items():
        logger.info(
            "%-12s %.2f steps/s (median of %d, best %.2f), peak memory %.0f MB (%s); the trainer's estimate %.0f MB",
            mode,
            median[mode],
            len(rows),
            max(r["speed"] for r in rows),
            max(r["peak"] for r in rows),
            unit,
            rows[0]["estimate"],
        )
    logger.info("LoRA vs adapter-only: %.2fx the step time (medians)", median["adapter"] / median["lora"])
    logger.info(
        "adapter-lean vs adapter-only: %.2fx the step time (medians; tiny model on this device)",
        median["adapter"] / median["adapter-lean"],
    )
    for label, shape in (
        ("smoke batch (2 x 128 px, 2 persons, 2 heads)", (2, 128, 128, 2, 2)),
        ("FLUX.1-dev batch (2 x 512 px, 2 persons, 24 heads)", (2, 512, 512, 2, 24)),
    ):
        ref, ours = mask_cost(*shape, reps=20)
        logger.info(
            "mask/layout per step, %s: reference %.2f ms, ours %.3f ms (%.0fx)",
            label,
            ref * 1e3,
            ours * 1e3,
            ref / ours,
        )
    report_memory()


if __name__ == "__main__":
    main()
