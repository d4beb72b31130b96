"""Write golden parity data in the shipped format with the independent reference model.

Used by tests/core/test_golden_unseen.py to prove that tests/core/test_golden.py passes on data it
has never seen (other batch sizes, 3-4 persons, overlapping, fractional and partly
outside boxes, other resolutions and model sizes). Run as a script to write a set::

    cd tests && python -m support.make_golden OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from support.reference_flux import ReferenceWithAnyone, reference_mask
from withanyone_core.testing.bfl import bfl_shapes

logger = logging.getLogger(__name__)


def random_model(cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, shape in bfl_shapes(cfg).items():
        is_norm = name.endswith("scale") or ".norm" in name or (name.split(".")[-2] == "2" and "_in_" in name)
        if is_norm and len(shape) == 1:
            base = 1.0 if name.endswith(("weight", "scale")) else 0.0
            # perturbed, so a mis-mapped norm changes the output
            state[name] = base + 0.2 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[-1] if len(shape) == 2 else shape[0]
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def write_golden_set(out_dir: Path, name: str, cfg: dict, cases: dict, masks: dict, seed: int = 0) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = random_model(cfg, g)
    model = ReferenceWithAnyone(state, cfg)
    tensors = {}
    for case_name, c in cases.items():
        b, n, t_len = c["batch"], c["num_ids"], c["text_tokens"]
        length = (c["height"] // 16) * (c["width"] // 16)
        inputs = {
            "img": torch.randn(b, length, cfg["in_channels"], generator=g),
            "txt": torch.randn(b, t_len, cfg["context_in_dim"], generator=g),
            "y": torch.randn(b, cfg["vec_in_dim"], generator=g),
            "timesteps": torch.rand(b, generator=g),
            "guidance": torch.full((b,), 3.5),
        }
        if c["with_identities"]:
            inputs["arcface_embeddings"] = 20 * torch.randn(b, n, 512, generator=g)
            inputs["siglip_embeddings"] = torch.randn(b, n, 256, 768, generator=g)
        with torch.no_grad():
            inputs["output"] = model.forward(
                inputs["img"],
                inputs["txt"],
                inputs["y"],
                inputs["timesteps"],
                inputs["guidance"],
                c["height"],
                c["width"],
                inputs.get("arcface_embeddings"),
                inputs.get("siglip_embeddings"),
                c["bboxes"],
                c["use_mask"],
                c["id_weight"],
                c["siglip_weight"],
            )
        tensors.update({f"{case_name}.{k}": v.contiguous() for k, v in inputs.items()})
    for mask_name, m in masks.items():
        tensors[f"{mask_name}.mask"] = reference_mask([m["bboxes"]], m["height"], m["width"], m["id_len"], 1)[0, 0]
    save_file(state, str(out_dir / f"{name}_model.safetensors"))
    save_file(tensors, str(out_dir / f"{name}_cases.safetensors"))
    (out_dir / f"{name}_cases.json").write_text(
        json.dumps({"config": cfg, "seed": seed, "cases": cases, "masks": masks}, indent=1)
    )


UNSEEN_CONFIG = {
    "in_channels": 64,
    "vec_in_dim": 24,
    "context_in_dim": 40,
    "hidden_size": 192,
    "mlp_ratio": 4.0,
    "num_heads": 3,
    "depth": 1,
    "depth_single_blocks": 2,
    "axes_dim": [16, 24, 24],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}


def _case(h, w, boxes, n, batch=None, **kw):
    batch = batch if batch is not None else (len(boxes) if boxes is not None else 1)
    base = {
        "height": h,
        "width": w,
        "batch": batch,
        "num_ids": n,
        "bboxes": boxes,
        "id_weight": 1.0,
        "siglip_weight": 1.0,
        "use_mask": boxes is not None,
        "with_identities": n > 0,
        "text_tokens": 5,
    }
    base.update(kw)
    return base


UNSEEN_CASES = {
    "batch2_two_ids_different_layouts": _case(
        160, 224, [[[10, 12, 90, 100], [120, 30, 210, 140]], [[100, 8, 200, 90], [4.5, 60.25, 70.75, 150.5]]], 2
    ),
    "three_ids_overlapping_fractional": _case(
        192,
        192,
        [[[8.7, 10.1, 100.9, 120.3], [80.2, 20.6, 170.5, 130.0], [40.0, 90.5, 150.2, 185.9]]],
        3,
        id_weight=0.8,
        siglip_weight=0.6,
    ),
    "four_ids_partly_outside": _case(
        128, 320, [[[-20, -10, 60, 70], [70, 5, 150, 110], [150.5, 40, 240, 160], [250, 60, 400.5, 140]]], 4
    ),
    "batch3_no_layout": _case(128, 128, None, 2, batch=3),
    "batch2_siglip_only": _case(
        144, 144, [[[0, 0, 72, 72], [72, 72, 144, 144]], [[30, 30, 120, 120], [0, 100, 40, 144]]], 2, id_weight=0.0
    ),
    "batch2_no_identity": _case(96, 160, None, 0, batch=2, with_identities=False),
}

UNSEEN_MASKS = {
    "mask_three_overlap_arc": {
        "height": 256,
        "width": 384,
        "bboxes": [[10.5, 20.2, 150.9, 200.1], [100.0, 50.0, 300.7, 255.0], [290.1, 0.0, 384.0, 120.5]],
        "id_len": 8,
    },
    "mask_four_outside_siglip": {
        "height": 320,
        "width": 192,
        "bboxes": [[-30, -30, 40, 40], [20, 100, 90, 190], [100, 150.5, 260, 330], [150, 0, 191.9, 50]],
        "id_len": 264,
    },
}


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", default="withanyone_unseen")
    args = parser.parse_args()
    write_golden_set(args.out_dir, args.name, UNSEEN_CONFIG, UNSEEN_CASES, UNSEEN_MASKS)
    logger.info("wrote %s_* to %s", args.name, args.out_dir)


if __name__ == "__main__":
    main()
