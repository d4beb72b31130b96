"""GPU check (``make gpu-check``): the CUDA tests and a FLUX.1-dev-size benchmark, in under 8 minutes.

On a machine with CUDA:

1. the CUDA tests: the Triton kernel against SDPA on the GPU, and tests/nodes/test_comfy_host.py, whose
   fp16/bf16/fp8 adapter, partial-load (lowvram), K/V-once and coexistence tests then run with
   ComfyUI's real GPU/offload devices;
2. a benchmark at FLUX.1-dev size: ComfyUI's FLUX with 19 + 38 blocks, hidden 3072, random bf16
   weights, 1024 x 1024, two people, the full-size adapter (2.78 B parameters, bf16) through the
   pack's own patch: the per-step time patched vs unpatched (difference of a long and a short run,
   interleaved, minimum over repetitions) and the peak VRAM of a sampling run with and without the
   adapter, printed as ratios;
3. the memory-lean training mode (train/configs/consumer-24gb.yaml) at FLUX.1-dev size, 512 px: the peak
   of three training steps printed beside the trainer's estimate (:func:`lean_training_peak`).

The benchmark runs once per configuration, each in a process of its own (ComfyUI is process-global):
ComfyUI 0.3.75, and ComfyUI 0.30.0 with dynamic VRAM off and on (tools/common/get_comfyui.py's trees; "on" is set
up as 0.30's main.py does: comfy-aimdo initialised, ``CoreModelPatcher`` rebound to ``ModelPatcherDynamic``;
the FLUX loader and the pack's loaders then build their patchers with it). A configuration this machine
cannot run (no comfy-aimdo, no working aimdo device) is reported as skipped, with the reason.

Without CUDA it says so and exits 0. ``--dry-run`` runs part 2 on the CPU at a tiny size (1 + 1
blocks, 128 px) in this process, so the script itself is tested everywhere (tests/e2e/test_gpu_check.py).

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

from support.comfy_env import import_comfyui, import_pack  # noqa: E402

logger = logging.getLogger("gpu_check")
FLUX_DEV = {
    "in_channels": 64,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
SHORT, LONG = 2, 6


def run_cuda_tests() -> int:
    env = {**os.environ, "WITHANYONE_TEST_CUDA": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/core/test_triton_attention.py",
        "tests/nodes/test_comfy_host.py",
        "tests/core/test_adapter.py",
    ]
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
            t = torch.randn(shape, generator=g, device=device) * (
                0.5 / (shape[-1] if len(shape) == 2 else shape[0]) ** 0.5
            )
        state[name] = t.to(dtype)
    return state


def _random_adapter(config: dict, device: str, dtype: torch.dtype):
    """The full-size adapter (official layout), random, with ComfyUI's cast-on-use layers, in a ModelPatcher."""
    import comfy.model_management as mm
    from withanyone_pack.nodes.loaders import adapter_operations, auxiliary_patcher

    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    cfg = AdapterConfig(
        hidden_size=config["hidden_size"],
        num_heads=config["num_heads"],
        num_double_blocks=config["depth"],
        num_single_blocks=config["depth_single_blocks"],
    )
    with torch.device("meta"):
        adapter = IdentityAdapter(cfg, operations=adapter_operations())
    g = torch.Generator(device=device).manual_seed(1)
    state = {}
    for name, p in adapter.state_dict().items():
        if p.ndim == 1:
            state[name] = (1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(
                p.shape, generator=g, device=device
            )
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

    from withanyone_core.layout import Layout
    from withanyone_core.recipe import authors_sigmas

    started = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(
        _random_state(config, device, dtype), model_options={"dtype": dtype}
    )
    adapter = _random_adapter(config, device, dtype)
    logger.info("models built in %.0f s", time.perf_counter() - started)
    g = torch.Generator().manual_seed(0)
    arcface, siglip = 20 * torch.randn(2, 512, generator=g), torch.randn(2, 256, 768, generator=g)
    s = size
    boxes = ((0.15 * s, 0.2 * s, 0.4 * s, 0.45 * s), (0.6 * s, 0.2 * s, 0.85 * s, 0.45 * s))
    patched = apply_withanyone(model, adapter, arcface, siglip, Layout(s, s, boxes), 1.0, 0.0)
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
        comfy.sample.sample_custom(
            m, noise, 1.0, sampler, authors_sigmas(steps, s // 8, s // 8), cond, cond, latent, disable_pbar=True, seed=0
        )
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
    result = {
        "step_ratio": step["patched"] / step["unpatched"],
        "step_unpatched": step["unpatched"],
        "step_patched": step["patched"],
        "peak_unpatched": peak["unpatched"],
        "peak_patched": peak["patched"],
    }
    mm.unload_all_models()
    return result


def lean_training_peak(device: str, tiny: bool = False, steps: int = 3, size: int = 512) -> dict:
    """Peak memory of ``steps`` training steps of the adapter-lean mode (train/configs/consumer-24gb.yaml) at
    FLUX.1-dev size (random weights), next to the trainer's estimate for the same modules.

    Built with the trainer's own pieces: the FLUX blocks' weights in fp8 (cast on use), the ArcFace branch
    through LoRA rank 64, the idle SigLIP branch in CPU memory, 8-bit AdamW (bitsandbytes; plain AdamW with a
    log line where it is not installed, e.g. a CPU dry run), gradient checkpointing, bf16 autocast; the text
    encoders are released (random stand-ins for their cached embeddings); the VAE decodes the prediction and a
    stand-in for the ID loss reads it, so the decoder's activations count. Not built: the ArcFace network
    (0.26 GB, added to the estimate's frozen weights as the bench does)."""
    import importlib.util

    from bench.bench_train import FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, GLINTR100_PARAMS, LEAN
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from train.config import OptimConfig
    from train.lean import IDLE_MODULES, add_adapter_lora, build_optimizer, offload_idle_branch, store_frozen_fp8
    from train.losses import flow_matching_loss
    from train.memory import device_frozen_bytes, estimate_training_memory
    from train.models import BRANCH_PREFIXES, Denoiser, pack_latents, unpack_latents
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter

    bf16, cuda = torch.bfloat16, device == "cuda"
    flux_cfg = dict(FLUX_DEV_TRANSFORMER)
    vae_cfg = dict(FLUX_DEV_VAE)
    text_tokens = 512
    if tiny:
        flux_cfg.update(
            num_layers=1,
            num_single_layers=1,
            num_attention_heads=2,
            attention_head_dim=64,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(16, 24, 24),
        )
        vae_cfg.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
        text_tokens, size = 16, 128
    torch.manual_seed(0)
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**flux_cfg).to(bf16)
        vae = AutoencoderKL(**vae_cfg).to(bf16)
    for model in (flux, vae):  # random weights made in place (no fp32 copy of 12 B parameters)
        model.to_empty(device=device).requires_grad_(False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
                else:
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    store_frozen_fp8(flux, LEAN["frozen_storage"])
    hidden = flux_cfg["num_attention_heads"] * flux_cfg["attention_head_dim"]
    adapter = IdentityAdapter(
        AdapterConfig(
            hidden_size=hidden,
            num_heads=flux_cfg["num_attention_heads"],
            num_double_blocks=flux_cfg["num_layers"],
            num_single_blocks=flux_cfg["num_single_layers"],
        )
    )
    params = add_adapter_lora(
        adapter, BRANCH_PREFIXES["arcface"], LEAN["adapter_lora_rank"], float(LEAN["adapter_lora_rank"]), bf16
    )
    for p in adapter.parameters():
        if not p.requires_grad:
            p.data = p.data.to(bf16)
    denoiser = Denoiser(flux, adapter.to(device))
    offload_idle_branch(adapter, "arcface")
    denoiser.handle.enable_gradient_checkpointing()
    name = LEAN["optimizer"] if importlib.util.find_spec("bitsandbytes") else "adamw"
    if name != LEAN["optimizer"]:
        logger.info("bitsandbytes is not installed: the lean check runs plain AdamW")
    optimizer = build_optimizer(params, OptimConfig(name=name), 1e-4)
    idle = [getattr(adapter, n) for n in IDLE_MODULES["arcface"]]
    estimate = estimate_training_memory(
        frozen_bytes=device_frozen_bytes([denoiser, vae], idle) + GLINTR100_PARAMS * 4,
        trainable_params=sum(p.numel() for p in params),
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
        adapter_branches=("arc",),
        optimizer=name,
        trainable_numels=[p.numel() for p in params],
        frozen_storage=LEAN["frozen_storage"],
        adapter_lora_rank=LEAN["adapter_lora_rank"],
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    boxes = [[(0.15 * size, 0.2 * size, 0.4 * size, 0.45 * size), (0.6 * size, 0.2 * size, 0.85 * size, 0.45 * size)]]
    started = time.perf_counter()
    losses = []
    for _ in range(steps):
        clean = pack_latents(torch.randn(1, 16, size // 8, size // 8, generator=g)).to(device)
        noise = torch.randn(clean.shape, generator=g).to(device)
        t = torch.full((1,), 0.5, device=device)
        noisy = (1 - t.view(-1, 1, 1)) * clean + t.view(-1, 1, 1) * noise
        text = torch.randn(1, text_tokens, flux_cfg["joint_attention_dim"], generator=g).to(device)
        pooled = torch.randn(1, flux_cfg["pooled_projection_dim"], generator=g).to(device)
        arcface = (20 * torch.randn(1, 2, 512, generator=g)).to(device)
        siglip = torch.zeros(1, 2, 256, adapter.config.siglip_dim, device=device)
        with torch.autocast(device_type=device, dtype=bf16):
            v = denoiser(
                noisy, t, text, pooled, torch.ones(1, device=device), arcface, siglip, boxes, size, size, 1.0, 0.0
            )
            z = unpack_latents(noisy - t.view(-1, 1, 1) * v, size, size)
            image = vae.decode(z.to(bf16)).sample.float()
        loss = flow_matching_loss(v, noise, clean) + 1e-3 * image.square().mean()  # the ID loss's stand-in
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {
        "peak": peak,
        "estimate": estimate,
        "seconds": time.perf_counter() - started,
        "losses": losses,
        "optimizer": name,
        "size": size,
    }


def report_lean(result: dict, tiny: bool) -> None:
    est = result["estimate"]
    where = "tiny, CPU" if tiny else "FLUX.1-dev, 19 + 38 blocks"
    peak = f"peak {result['peak'] / 1e9:.1f} GB allocated" if result["peak"] else "peak not measured on the CPU"
    logger.info(
        "gpu lean training %d² batch 1 (%s, %s): %s over %d steps vs the estimate %.1f GB (static %.1f + "
        "activations %.1f; the estimate leaves out the CUDA context); %.1f s",
        result["size"],
        where,
        result["optimizer"],
        peak,
        len(result["losses"]),
        est.total / 1e9,
        est.static / 1e9,
        est.activations / 1e9,
        result["seconds"],
    )


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
    """The benchmark in every configuration, each a process on its ComfyUI tree (tools/common/get_comfyui.py)."""
    from tools.common.get_comfyui import environment

    status = 0
    for version, dynamic in CONFIGURATIONS:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--bench-only",
            "--dynamic-vram",
            dynamic,
            "--reps",
            str(reps),
        ]
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
    parser.add_argument(
        "--dynamic-vram",
        choices=["on", "off"],
        default="off",
        help="with --bench-only: ComfyUI's dynamic VRAM (comfy-aimdo) on or off",
    )
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
        report_lean(lean_training_peak("cuda"), False)  # once, in this process (it needs no ComfyUI)
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
    logger.info(
        "gpu bench (%s blocks): patched step %.3f s vs unpatched %.3f s",
        blocks,
        result["step_patched"],
        result["step_unpatched"],
    )
    logger.info(
        "gpu bench 1024 (%s blocks, 2 people): patched step %.3fx the unpatched step", blocks, result["step_ratio"]
    )
    if result["peak_unpatched"]:
        logger.info(
            "gpu bench 1024: peak VRAM %.1f GB with the adapter vs %.1f GB without (%.3fx)",
            result["peak_patched"] / 1e9,
            result["peak_unpatched"] / 1e9,
            result["peak_patched"] / result["peak_unpatched"],
        )
    if args.dry_run:  # on a GPU the parent process measures it once, not once per ComfyUI configuration
        report_lean(lean_training_peak("cpu", tiny=True), True)
    logger.info("gpu check finished in %.0f s", time.perf_counter() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
