"""GPU check (``make gpu-check``): the CUDA tests and a FLUX.1-dev-size benchmark, in under 8 minutes.

On a machine with CUDA:

1. the CUDA tests: the Triton kernel against SDPA on the GPU, and tests/test_comfy_host.py, whose
   fp16/bf16/fp8 adapter, partial-load (lowvram), K/V-once and coexistence tests then run with
   ComfyUI's real GPU/offload devices;
2. a benchmark at FLUX.1-dev size: ComfyUI's FLUX with 19 + 38 blocks, hidden 3072, random bf16
   weights, 1024 x 1024, two people, the full-size adapter (2.78 B parameters, bf16) through the
   pack's own patch: the per-step time patched vs unpatched (difference of a long and a short run,
   interleaved, minimum over repetitions) and the peak VRAM of a sampling run with and without the
   adapter, printed as ratios.

The benchmark runs once per configuration, each in a process of its own (ComfyUI is process-global):
ComfyUI 0.3.75, and ComfyUI 0.30.0 with dynamic VRAM off and on (tools/get_comfyui.py's trees; "on" is set
up as 0.30's main.py does: comfy-aimdo initialised, ``CoreModelPatcher`` rebound to ``ModelPatcherDynamic``;
the FLUX loader and the pack's loaders then build their patchers with it). A configuration this machine
cannot run (no comfy-aimdo, no working aimdo device) is reported as skipped, with the reason.

Without CUDA it says so and exits 0. ``--dry-run`` runs part 2 on the CPU at a tiny size (1 + 1
blocks, 128 px) in this process, so the script itself is tested everywhere (tests/test_gpu_check.py).

    .venv/bin/python tests/gpu/gpu_check.py [--dry-run] [--skip-tests] [--reps 3]
    .venv/bin/python tests/gpu/gpu_check.py --bench-only [--dynamic-vram on|off]   # one configuration
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from comfy_env import import_comfyui, import_pack  # noqa: E402

logger = logging.getLogger("gpu_check")
FLUX_DEV = {"in_channels": 64, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
            "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000,
            "qkv_bias": True, "guidance_embed": True}
SHORT, LONG = 2, 6


def run_cuda_tests() -> int:
    env = {**os.environ, "WITHANYONE_TEST_CUDA": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_attention.py",
           "tests/test_comfy_host.py", "tests/test_adapter.py"]
    logger.info("CUDA tests: %s", " ".join(cmd[3:]))
    return subprocess.run(cmd, cwd=ROOT, env=env, timeout=300).returncode


def _random_state(config: dict, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX weights drawn on ``device`` (scaled so activations stay O(1))."""
    from withanyone_core.testing.bfl import bfl_shapes

    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in bfl_shapes(config).items():
        if name.startswith(("ipa_", "arcface_in", "siglip_in")):
            continue
        if name.endswith("scale"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) * (0.5 / (shape[-1] if len(shape) == 2 else shape[0]) ** 0.5)
        state[name] = t.to(dtype)
    return state


def _random_adapter(config: dict, device: str, dtype: torch.dtype):
    """The full-size adapter (official layout), random, with ComfyUI's cast-on-use layers, in a ModelPatcher."""
    import comfy.model_management as mm
    from withanyone_pack.nodes.loaders import adapter_operations, auxiliary_patcher

    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    cfg = AdapterConfig(hidden_size=config["hidden_size"], num_heads=config["num_heads"],
                        num_double_blocks=config["depth"], num_single_blocks=config["depth_single_blocks"])
    with torch.device("meta"):
        adapter = IdentityAdapter(cfg, operations=adapter_operations())
    g = torch.Generator(device=device).manual_seed(1)
    state = {}
    for name, p in adapter.state_dict().items():
        if p.ndim == 1:
            state[name] = (1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(p.shape, generator=g,
                                                                                         device=device)
        else:
            state[name] = torch.randn(p.shape, generator=g, device=device) * (1.0 / p.shape[1] ** 0.5)
        state[name] = state[name].to(dtype)
    adapter.load_state_dict(state, assign=True)
    return auxiliary_patcher(adapter.eval(), mm.get_torch_device(), mm.unet_offload_device())


def benchmark(config: dict, size: int, reps: int, device: str, dtype: torch.dtype) -> dict:
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    from withanyone_pack.nodes.patch import apply_withanyone

    from withanyone_core.recipe import authors_sigmas

    started = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(_random_state(config, device, dtype),
                                                     model_options={"dtype": dtype})
    adapter = _random_adapter(config, device, dtype)
    logger.info("models built in %.0f s", time.perf_counter() - started)
    g = torch.Generator().manual_seed(0)
    arcface, siglip = 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)
    s = size
    boxes = ((0.15 * s, 0.2 * s, 0.4 * s, 0.45 * s), (0.6 * s, 0.2 * s, 0.85 * s, 0.45 * s))
    patched = apply_withanyone(model, adapter, arcface, siglip, (s, s), boxes, 1.0, 0.0)
    text = torch.randn(1, 512 if device == "cuda" else 16, config["context_in_dim"], generator=g)
    cond = [[text, {"pooled_output": torch.randn(1, config["vec_in_dim"], generator=g), "guidance": 4.0}]]
    latent = torch.zeros(1, 16, s // 8, s // 8)
    noise = torch.randn(latent.shape, generator=g)
    sampler = comfy.samplers.sampler_object("euler")
    cuda = device == "cuda"

    def run(m, steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        comfy.sample.sample_custom(m, noise, 1.0, sampler, authors_sigmas(steps, s // 8, s // 8), cond, cond, latent,
                                   disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else 0

    models = {"unpatched": model, "patched": patched}
    for m in models.values():
        run(m, 1)  # warm-up (loads weights, compiles kernels)
    best = {(name, steps): float("inf") for name in models for steps in (SHORT, LONG)}
    peak = {name: 0 for name in models}
    for _ in range(reps):
        for name, m in models.items():
            for steps in (SHORT, LONG):
                seconds, memory = run(m, steps)
                best[name, steps] = min(best[name, steps], seconds)
                peak[name] = max(peak[name], memory)
    step = {name: (best[name, LONG] - best[name, SHORT]) / (LONG - SHORT) for name in models}
    for name, value in step.items():
        if value <= 0:
            raise SystemExit(f"{name} step time came out {value:.4f} s: too noisy, rerun with more --reps")
    result = {"step_ratio": step["patched"] / step["unpatched"], "step_unpatched": step["unpatched"],
              "step_patched": step["patched"], "peak_unpatched": peak["unpatched"], "peak_patched": peak["patched"]}
    mm.unload_all_models()
    return result


# (ComfyUI version, dynamic VRAM) the benchmark runs in, each in a process of its own
CONFIGURATIONS = (("0.3.75", "off"), ("0.30.0", "off"), ("0.30.0", "on"))


def start_aimdo() -> str | None:
    """comfy-aimdo's process-wide start, before anything touches CUDA (as ComfyUI's main.py); why not, or None."""
    try:
        import comfy_aimdo.control
    except ImportError:
        return "comfy-aimdo is not installed (ComfyUI before 0.17 has no dynamic VRAM)"
    try:
        comfy_aimdo.control.init()
    except Exception as exc:  # noqa: BLE001 - any failure means: no dynamic VRAM here, said as such
        return f"comfy-aimdo did not start: {exc}"
    return None


def enable_dynamic_vram() -> str | None:
    """Dynamic VRAM as ComfyUI's main.py enables it: aimdo on every torch device, ``CoreModelPatcher`` rebound to
    ``ModelPatcherDynamic``. Asks the running ComfyUI for each part; returns why it cannot (None: enabled)."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic") or not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        return "this ComfyUI has no ModelPatcherDynamic"
    import comfy_aimdo.control

    devices = mm.get_all_torch_devices() if hasattr(mm, "get_all_torch_devices") else [mm.get_torch_device()]
    try:
        ok = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9's protocol: device indices only
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        return "comfy-aimdo found no device it can manage"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return None


def run_configurations(reps: int) -> int:
    """The benchmark in every configuration, each a process on its ComfyUI tree (tools/get_comfyui.py)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from get_comfyui import environment

    status = 0
    for version, dynamic in CONFIGURATIONS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-only", "--dynamic-vram", dynamic, "--reps",
               str(reps)]
        logger.info("gpu bench: ComfyUI %s, dynamic VRAM %s", version, dynamic)
        done = subprocess.run(cmd, cwd=ROOT, env=environment(version), timeout=600)
        status = status or done.returncode
    return status


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the benchmark on the CPU at a tiny size")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bench-only", action="store_true", help="one benchmark in this process, no tests")
    parser.add_argument("--dynamic-vram", choices=["on", "off"], default="off",
                        help="with --bench-only: ComfyUI's dynamic VRAM (comfy-aimdo) on or off")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        logger.info("gpu check: no CUDA device here; nothing to check (the CPU suite covers the rest)")
        return 0
    if args.dynamic_vram == "on":
        if args.dry_run:
            logger.info("gpu bench: dynamic VRAM skipped: it needs a CUDA device")
            return 0
        why = start_aimdo()
        if why:
            logger.info("gpu bench: dynamic VRAM skipped: %s", why)
            return 0
    if not args.dry_run and not args.bench_only:
        status = 0 if args.skip_tests else run_cuda_tests()
        if not args.skip_tests:
            logger.info("gpu check: CUDA tests %s", "passed" if status == 0 else f"FAILED (exit {status})")
        status = run_configurations(args.reps) or status
        logger.info("gpu check finished in %.0f s", time.perf_counter() - started)
        return status
    status = 0
    import_comfyui()
    import_pack()
    import importlib

    importlib.import_module("withanyone_pack.nodes.loaders")
    importlib.import_module("withanyone_pack.nodes.patch")
    if args.dynamic_vram == "on":
        why = enable_dynamic_vram()
        if why:
            logger.info("gpu bench: dynamic VRAM skipped: %s", why)
            return 0
    import comfyui_version

    logger.info("gpu bench on ComfyUI %s, dynamic VRAM %s", comfyui_version.__version__, args.dynamic_vram)
    if args.dry_run:
        config = {**FLUX_DEV, "context_in_dim": 4096, "depth": 1, "depth_single_blocks": 1}
        result = benchmark(config, 128, 1, "cpu", torch.float32)
    else:
        name = torch.cuda.get_device_name()
        logger.info("gpu check on %s", name)
        result = benchmark(FLUX_DEV, 1024, args.reps, "cuda", torch.bfloat16)
    blocks = "1 + 1" if args.dry_run else "19 + 38"
    logger.info("gpu bench (%s blocks): patched step %.3f s vs unpatched %.3f s", blocks, result["step_patched"],
                result["step_unpatched"])
    logger.info("gpu bench 1024 (%s blocks, 2 people): patched step %.3fx the unpatched step", blocks,
                result["step_ratio"])
    if result["peak_unpatched"]:
        logger.info("gpu bench 1024: peak VRAM %.1f GB with the adapter vs %.1f GB without (%.3fx)",
                    result["peak_patched"] / 1e9, result["peak_unpatched"] / 1e9,
                    result["peak_patched"] / result["peak_unpatched"])
    logger.info("gpu check finished in %.0f s", time.perf_counter() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
