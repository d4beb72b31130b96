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

    .venv/bin/python tests/bench/bench_comfy.py [--sizes 512 1024] [--reps 3]
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

from comfy_env import import_comfyui, import_pack  # noqa: E402

logger = logging.getLogger("bench_comfy")
SHORT, LONG = 1, 3  # steps of the two runs whose difference is timed


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import_comfyui()
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from withanyone_core.checkpoints import save_adapter
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
    cond = [[torch.randn(1, 64, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 4.0}]]
    sampler = comfy.samplers.sampler_object("euler")
    results = []
    for s in args.sizes:
        boxes = ((0.15 * s, 0.2 * s, 0.4 * s, 0.45 * s), (0.6 * s, 0.2 * s, 0.85 * s, 0.45 * s))
        models = {
            "unpatched": model,
            "cached": patch.apply_withanyone(model, adapter, arcface, siglip, (s, s), boxes, 1.0, 1.0),
            "recomputed": patch.apply_withanyone(model, adapter, arcface, siglip, (s, s), boxes, 1.0, 1.0,
                                                 cache_kv=False),
        }
        latent = torch.zeros(1, 16, s // 8, s // 8)
        noise = torch.randn(latent.shape, generator=g)

        def run(m, steps):
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
            logger.info("size %d rep %d: %s", s, rep + 1,
                        ", ".join(f"{k[0]} {k[1]} steps {v:.2f} s" for k, v in best.items()))
        step = {}
        for name in models:
            step[name] = (best[name, LONG] - best[name, SHORT]) / (LONG - SHORT)
            if step[name] <= 0:
                raise SystemExit(f"size {s}: {name} step time came out {step[name]:.3f} s; the machine is too noisy, "
                                 "rerun with more --reps")
        encode = max(0.0, best["cached", SHORT] - best["unpatched", SHORT] - (step["cached"] - step["unpatched"]))
        results.append((s, step, encode))
    for s, step, encode in results:
        logger.info("comfy bench %d: before K/V caching, patched step %.3fx the unpatched step", s,
                    step["recomputed"] / step["unpatched"])
        logger.info("comfy bench %d: identities encoded once per run: %.2f s", s, encode)
    for s, step, encode in results:
        logger.info("comfy bench %d: patched step %.3fx the unpatched step", s, step["cached"] / step["unpatched"])


if __name__ == "__main__":
    main()
