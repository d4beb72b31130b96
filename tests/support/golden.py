"""Discovery and running of golden parity data (see ../shared/golden/README.md).

Kept apart from the test module so benchmarks and other tests can reuse the runner.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from withanyone_core.checkpoints.adapter_files import load_adapter
from withanyone_core.checkpoints.reading import load_safetensors
from withanyone_core.hosts.diffusers import attach_adapter, flux_from_bfl_state

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


def golden_dir() -> Path:
    """``$WITHANYONE_GOLDEN_DIR``, else ``golden/`` of the shared folder (``$WITHANYONE_SHARED``, else ../shared)."""
    if os.environ.get("WITHANYONE_GOLDEN_DIR"):
        return Path(os.environ["WITHANYONE_GOLDEN_DIR"])
    if os.environ.get("WITHANYONE_SHARED"):
        return Path(os.environ["WITHANYONE_SHARED"]) / "golden"
    return DEFAULT_GOLDEN_DIR


@dataclass(frozen=True)
class GoldenSet:
    name: str
    spec: dict
    cases_path: Path
    model_path: Path


def discover() -> list[GoldenSet]:
    root = golden_dir()
    sets = []
    for spec_path in sorted(root.glob("*_cases.json")):
        name = spec_path.name[: -len("_cases.json")]
        spec = json.loads(spec_path.read_text())
        sets.append(GoldenSet(name, spec, root / f"{name}_cases.safetensors", root / f"{name}_model.safetensors"))
    return sets


def position_ids(height: int, width: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = height // 16, width // 16
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return img_ids.reshape(rows * cols, 3), torch.zeros(text_tokens, 3)


class GoldenModel:
    """One golden model loaded through the project's own loaders, on the diffusers host."""

    def __init__(self, gset: GoldenSet):
        state = load_safetensors(gset.model_path)
        cfg = gset.spec["config"]
        self.transformer = flux_from_bfl_state(state, axes_dims_rope=tuple(cfg["axes_dim"])).eval()
        self.adapter = load_adapter(state).eval()  # split read from the FLUX keys
        self.handle = attach_adapter(self.transformer, self.adapter)
        self.tensors = load_safetensors(gset.cases_path)

    def run_case(self, name: str, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
        t = {k[len(name) + 1 :]: v for k, v in self.tensors.items() if k.startswith(name + ".")}
        img_ids, txt_ids = position_ids(case["height"], case["width"], t["txt"].shape[1])
        kwargs = dict(
            hidden_states=t["img"],
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            guidance=t["guidance"],
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )
        with torch.no_grad():
            if case["with_identities"] and case["num_ids"] > 0:
                boxes = case["bboxes"] if case["use_mask"] else None
                with self.handle.conditioning(
                    t["arcface_embeddings"],
                    t["siglip_embeddings"],
                    height=case["height"],
                    width=case["width"],
                    boxes=boxes,
                    id_weight=case["id_weight"],
                    siglip_weight=case["siglip_weight"],
                ):
                    out = self.transformer(**kwargs)[0]
            else:
                out = self.transformer(**kwargs)[0]
        return out, t["output"]
