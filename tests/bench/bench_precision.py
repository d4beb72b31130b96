"""Adapter storage precision on the authors' golden end-to-end cases (../shared/golden/*_e2e.json).

Each case is sampled with the WithAnyone Sampler's defaults through ComfyUI (FLUX in float32 via
ComfyUI's loader) with the adapter stored in fp32, bf16 and fp8_e4m3fn (cast to the MODEL's
compute dtype on use). Printed per dtype: the adapter's memory, and the worst max-abs error of the
final latent against the authors' result, also as a share of the case's identity effect (how far
the identities move the latent at all).

    .venv/bin/python tests/bench/bench_precision.py [--cases one_person two_people_form]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

import test_e2e_golden as e2e  # noqa: E402  (the parity test's runners and model cache)

from support.comfy_env import import_comfyui  # noqa: E402

logger = logging.getLogger("bench_precision")
DTYPES = ("fp32", "bf16", "fp8_e4m3fn")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="case names (default: all of every *_e2e.json)")
    args = parser.parse_args()
    import_comfyui()
    import comfy.sd

    pack = e2e._pack()
    worst = {d: (0.0, 0.0) for d in DTYPES}
    memory = {}
    for param in e2e.CASES:
        spec_path, name, case_name = param.values
        if args.cases and case_name not in args.cases:
            continue
        spec, case, t = e2e._case_data(spec_path, name, case_name)
        seed = int(case.get("weights_seed", spec["weights_seed"]))
        flux_path, adapter_path = e2e._load_e2e_model().write_model_files(seed, str(e2e.MODEL_CACHE / str(seed)))
        model = comfy.sd.load_diffusion_model(flux_path, model_options={"dtype": torch.float32})
        for dtype in DTYPES:
            adapter = pack.nodes.loaders.load_adapter_patcher(adapter_path, dtype)
            memory[dtype] = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
            err = float(
                (e2e._run_sampler(model, adapter, case, t).double() - t["expected_latent"].double()).abs().max()
            )
            share = err / case["identity_effect_max_abs"]
            logger.info(
                "%s:%s %s: max abs error %.2e (%.2f%% of the identity effect %.2f)",
                name,
                case_name,
                dtype,
                err,
                100 * share,
                case["identity_effect_max_abs"],
            )
            worst[dtype] = max(worst[dtype], (err, share))
            del adapter
    for dtype in DTYPES:
        err, share = worst[dtype]
        logger.info(
            "precision bench %s: adapter %.2fx the fp32 memory, worst latent error %.2e = %.2f%% of the "
            "identity effect",
            dtype,
            memory[dtype] / memory["fp32"],
            err,
            100 * share,
        )


if __name__ == "__main__":
    main()
