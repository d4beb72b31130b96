"""ComfyUI benchmark: sampling-step time of the WithAnyone-patched vs the unpatched model.

Same process, same FLUX (one ComfyUI's loaders accept: hidden 3072, 1 double + 1 single
block, random weights), two people with face boxes, at 512² and 1024². Three models are
timed, interleaved: unpatched, patched with the identity K/V cached for the run (the pack),
and patched recomputing the K/V in every block call (the first release). A step's time is
the difference between a long and a short run divided by the extra steps, so the one-off
work of a run (model loading, identity encoding) cancels out; each figure is the minimum
over repetitions. The one-off identity encoding per run is printed separately.

On FLUX.1-dev (19 + 38 blocks) the per-step overhead ratio is about the same: both the
patched and the unpatched cost scale with the number of blocks.

The A/B ratio compares separate runs, so a busy machine moves it either way (0.951x was printed
once). The **step cost** cannot go below 1: in the same steps of the patched model, the time spent
inside the pack's code (its DIFFUSION_MODEL wrapper and block patches, ComfyUI's own calls they
make excluded: the Flux forward under the wrapper, the original blocks under the patches) is
accumulated with perf_counter against the whole diffusion-model call of that step; each step's
cost is whole / (whole - inside) >= 1, reported as the median over --inside-runs runs of
--inside-steps steps, with the interquartile range and min-max. Time outside the model call (the
sampler's arithmetic) is not counted, which can only raise the share.

    .venv/bin/python tests/bench/bench_comfy.py [--sizes 512 1024] [--reps 3] [--inside-runs 3]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.comfy_env import import_comfyui, import_pack  # noqa: E402

logger = logging.getLogger("bench_comfy")
SHORT, LONG = 1, 3  # steps of the two runs whose difference is timed


class PackClock:
    """Exclusive time of nested regions, each either the pack's code ("pack") or ComfyUI's ("comfy").

    Every transition charges the time since the last one to the region on top of the stack, so a region nested
    in another (a block inside a block patch, the Flux forward inside the wrapper) is never counted twice. A step
    is one outermost diffusion-model call: ``steps`` gets (whole, inside the pack) per step."""

    def __init__(self):
        self.stack: list[str] = []
        self.spent = {"pack": 0.0, "comfy": 0.0}
        self.last = 0.0
        self.steps: list[tuple[float, float]] = []

    def enter(self, region: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.spent[self.stack[-1]] += now - self.last
        else:
            self.spent = {"pack": 0.0, "comfy": 0.0}
        self.stack.append(region)
        self.last = now

    def leave(self) -> None:
        now = time.perf_counter()
        self.spent[self.stack.pop()] += now - self.last
        self.last = now
        if not self.stack:
            self.steps.append((self.spent["pack"] + self.spent["comfy"], self.spent["pack"]))

    def region(self, name: str, fn):
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return timed


def instrument(patch, clock: PackClock):
    """Time the pack's wrapper and block patches (class-level, this process only); returns the undo."""
    originals = {
        cls: cls.__call__ for cls in (patch.DiffusionModelWrapper, patch.DoubleBlockPatch, patch.SingleBlockPatch)
    }

    def wrapper_call(self, executor, *args, **kwargs):
        return clock.region("pack", originals[patch.DiffusionModelWrapper])(
            self, clock.region("comfy", executor), *args, **kwargs
        )

    def block_call(cls):
        def call(self, args, extra):
            extra = {**extra, "original_block": clock.region("comfy", extra["original_block"])}
            return clock.region("pack", originals[cls])(self, args, extra)

        return call

    patch.DiffusionModelWrapper.__call__ = wrapper_call
    patch.DoubleBlockPatch.__call__ = block_call(patch.DoubleBlockPatch)
    patch.SingleBlockPatch.__call__ = block_call(patch.SingleBlockPatch)

    def undo():
        for cls, call in originals.items():
            cls.__call__ = call

    return undo


def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """(median, first quartile, third quartile, min, max)."""
    import statistics

    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return median, q1, q3, min(values), max(values)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--inside-runs", type=int, default=3, help="runs timed inside the pack's code, per size")
    parser.add_argument("--inside-steps", type=int, default=6, help="steps of each of those runs")
    args = parser.parse_args()
    import_comfyui()
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from withanyone_core.checkpoints.adapter_files import save_adapter
    from withanyone_core.layout import Layout
    from withanyone_core.recipe import authors_sigmas
    from withanyone_core.testing.comfy_models import flux_adapter, flux_state

    import_pack()
    loaders = importlib.import_module("withanyone_pack.nodes.loaders")
    patch = importlib.import_module("withanyone_pack.nodes.patch")
    model = comfy.sd.load_diffusion_model_state_dict(flux_state(), model_options={"dtype": torch.float32})
    adapter_path = ROOT / ".cache" / "bench_comfy_adapter.safetensors"
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(flux_adapter(), adapter_path)
    adapter = loaders.load_adapter_patcher(str(adapter_path))  # the pack's loader: ComfyUI's cast-on-use layers
    g = torch.Generator().manual_seed(0)
    arcface, siglip = 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)
    cond = [
        [torch.randn(1, 64, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 4.0}]
    ]
    sampler = comfy.samplers.sampler_object("euler")
    results = []
    for s in args.sizes:
        boxes = ((0.15 * s, 0.2 * s, 0.4 * s, 0.45 * s), (0.6 * s, 0.2 * s, 0.85 * s, 0.45 * s))
        models = {
            "unpatched": model,
            "cached": patch.apply_withanyone(model, adapter, arcface, siglip, Layout(s, s, boxes), 1.0, 1.0),
            "recomputed": patch.apply_withanyone(
                model, adapter, arcface, siglip, Layout(s, s, boxes), 1.0, 1.0, cache_kv=False
            ),
        }
        latent = torch.zeros(1, 16, s // 8, s // 8)
        noise = torch.randn(latent.shape, generator=g)

        def run(m, steps, s=s, noise=noise, latent=latent):  # this size's inputs
            sigmas = authors_sigmas(steps, s // 8, s // 8)
            start = time.perf_counter()
            comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True, seed=0)
            return time.perf_counter() - start

        for m in models.values():
            run(m, SHORT)  # warm-up
        best = {(name, steps): float("inf") for name in models for steps in (SHORT, LONG)}
        for rep in range(args.reps):
            for name, m in models.items():  # interleaved: machine noise hits every model alike
                for steps in (SHORT, LONG):
                    best[name, steps] = min(best[name, steps], run(m, steps))
            logger.info(
                "size %d rep %d: %s", s, rep + 1, ", ".join(f"{k[0]} {k[1]} steps {v:.2f} s" for k, v in best.items())
            )
        step = {}
        for name in models:
            step[name] = (best[name, LONG] - best[name, SHORT]) / (LONG - SHORT)
            if step[name] <= 0:
                raise SystemExit(
                    f"size {s}: {name} step time came out {step[name]:.3f} s; the machine is too noisy, "
                    "rerun with more --reps"
                )
        encode = max(0.0, best["cached", SHORT] - best["unpatched", SHORT] - (step["cached"] - step["unpatched"]))
        clock = PackClock()
        undo = instrument(patch, clock)
        try:
            for _ in range(args.inside_runs):
                run(models["cached"], args.inside_steps)
        finally:
            undo()
        if not clock.steps:
            raise SystemExit(f"size {s}: no step went through the pack's wrapper; nothing was timed inside it")
        costs = [whole / (whole - inside) for whole, inside in clock.steps]
        results.append((s, step, encode, spread(costs), len(costs)))
    for s, step, encode, _, _ in results:
        logger.info(
            "comfy bench %d: before K/V caching, patched step %.3fx the unpatched step",
            s,
            step["recomputed"] / step["unpatched"],
        )
        logger.info("comfy bench %d: identities encoded once per run: %.2f s", s, encode)
    for s, step, _, (median, q1, q3, low, high), count in results:
        logger.info(
            "comfy bench %d: patched step %.3fx the unpatched step (A/B); step cost inside the pack %.3fx "
            "(median of %d steps, IQR %.3f-%.3f, min-max %.3f-%.3f)",
            s,
            step["cached"] / step["unpatched"],
            median,
            count,
            q1,
            q3,
            low,
            high,
        )


if __name__ == "__main__":
    main()
