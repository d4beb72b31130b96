"""Training benchmark on the smoke config, measured side by side in one run.

- steps/s and peak memory (RSS growth of the process, CPU; CUDA peak allocated on a GPU)
  for adapter-only vs adapter + LoRA training;
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_flux import reference_mask  # noqa: E402
from withanyone_core.attention import select_tokens  # noqa: E402
from withanyone_core.layout import TokenGrid, build_layout  # noqa: E402
from train.smoke_data import build_smoke_set  # noqa: E402

logger = logging.getLogger("bench_train")
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_speed(mode: str, steps: int) -> tuple[float, float]:
    from train.config import load_config
    from train.run import Trainer

    with tempfile.TemporaryDirectory() as out:
        phases = f"phases=[{{name: bench, steps: {steps}, paired_ratio: 0.5, min_face_size: 32}}]"
        config = load_config(SMOKE, [f"output_dir={out}", f"train.mode={mode}", "train.lora.rank=16", phases,
                                     f"checkpoint.every={steps + 1}", "sample.every=0", "tensorboard=false"])
        config.checkpoint.every = steps  # one save at the end only
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(config)
        start = time.perf_counter()
        trainer.run()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb()
    return steps / elapsed, peak


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
    parser.add_argument("--mode", choices=["adapter", "lora"], help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    if args.mode:
        speed, peak = train_speed(args.mode, args.steps)
        sys.stdout.write("RESULT " + json.dumps({"speed": speed, "peak": peak}) + "\n")
        return
    build_smoke_set(ROOT / ".cache" / "smoke")
    results = {}
    for mode in ("adapter", "lora"):  # separate processes: peak memory is per process
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.split("RESULT ")[-1])
        results[mode] = (row["speed"], row["peak"])
    unit = "allocated on the GPU" if torch.cuda.is_available() else "process RSS"
    for mode, (speed, peak) in results.items():
        logger.info("%-8s %.2f steps/s, peak memory %.0f MB (%s)", mode, speed, peak, unit)
    logger.info("LoRA vs adapter-only: %.2fx the step time",
                results["adapter"][0] / results["lora"][0])
    for label, shape in (("smoke batch (2 x 128 px, 2 persons, 2 heads)", (2, 128, 128, 2, 2)),
                         ("FLUX.1-dev batch (2 x 512 px, 2 persons, 24 heads)", (2, 512, 512, 2, 24))):
        ref, ours = mask_cost(*shape, reps=20)
        logger.info("mask/layout per step, %s: reference %.2f ms, ours %.3f ms (%.0fx)", label, ref * 1e3,
                    ours * 1e3, ref / ours)


if __name__ == "__main__":
    main()
