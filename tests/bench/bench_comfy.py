"""ComfyUI benchmark: sampling-step time of the WithAnyone-patched vs the unpatched model.

Same run, same FLUX (one ComfyUI's loaders accept: hidden 3072, 1 double + 1 single block,
random weights), 512x512 image, two people with face boxes. The step ratio is taken
with a patched model that already encoded its identities (a cached Apply node); a fresh
Apply gives the one-off encoding cost (the projectors) per run. Both are printed last. The per-step cost is per block, so on FLUX.1-dev (19 + 38 blocks)
the relative overhead is about the same, and the one-off encoding matters even less.

    .venv/bin/python tests/bench/bench_comfy.py [--steps 4] [--size 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from comfy_env import import_comfyui  # noqa: E402

logger = logging.getLogger("bench_comfy")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    import_comfyui()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd

    from withanyone_core.testing.comfy_models import flux_adapter, flux_state

    spec = importlib.util.spec_from_file_location("withanyone_pack_patch", ROOT / "nodes" / "patch.py")
    patch = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = patch  # dataclasses look their module up while it executes
    spec.loader.exec_module(patch)

    model = comfy.sd.load_diffusion_model_state_dict(flux_state(), model_options={"dtype": torch.float32})
    adapter = comfy.model_patcher.ModelPatcher(flux_adapter(), load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    s = args.size
    boxes = ((0.15 * s, 0.2 * s, 0.4 * s, 0.45 * s), (0.6 * s, 0.2 * s, 0.85 * s, 0.45 * s))
    g = torch.Generator().manual_seed(0)
    arcface, siglip = 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)

    def patched():
        """A fresh Apply each time: the one-off identity encoding is part of the timed run."""
        return patch.apply_withanyone(model, adapter, arcface, siglip, (s, s), boxes)

    cond = [[torch.randn(1, 64, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, s // 8, s // 8)
    noise = torch.randn(latent.shape, generator=g)

    def run(m):
        start = time.perf_counter()
        comfy.sample.sample(m, noise, args.steps, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=0)
        return (time.perf_counter() - start) / args.steps

    reused = patched()
    run(model), run(reused)  # warm-up; ``reused`` keeps its encoded identities, as a cached Apply node does
    base = steady = fresh = float("inf")
    for rep in range(args.reps):
        base, steady, fresh = min(base, run(model)), min(steady, run(reused)), min(fresh, run(patched()))
        logger.info("rep %d: unpatched %.3f s/step, patched %.3f s/step (fresh Apply: %.3f s/step)", rep + 1,
                    base, steady, fresh)
    once = (fresh - steady) * args.steps
    logger.info("comfy bench: patched step %.3fx the unpatched step (%.1f%% overhead); identities encoded "
                "once per run: %.2f s (%.1f%% of this %d-step run)", steady / base, 100 * (steady - base) / base,
                once, 100 * once / (base * args.steps), args.steps)

if __name__ == "__main__":
    main()
