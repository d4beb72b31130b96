"""The independent reference re-statement reproduces the authors' golden outputs.

This is what makes tests/support/reference_flux.py trustworthy as a generator of further
golden data (test_golden_unseen.py) and as the baseline in the benchmarks.
"""

import pytest
import torch

from support.golden import discover
from support.reference_flux import ReferenceWithAnyone, reference_mask
from withanyone_core.checkpoints.reading import load_safetensors

SETS = [s for s in discover() if s.name == "withanyone_tiny"]


@pytest.mark.skipif(not SETS, reason="the shipped golden set (../shared/golden) is not present")
def test_reference_restatement_matches_authors_outputs():
    gset = SETS[0]
    state, tensors = load_safetensors(gset.model_path), load_safetensors(gset.cases_path)
    model = ReferenceWithAnyone(state, gset.spec["config"])
    for name, c in gset.spec["cases"].items():
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        with torch.no_grad():
            out = model.forward(
                t["img"],
                t["txt"],
                t["y"],
                t["timesteps"],
                t["guidance"],
                c["height"],
                c["width"],
                t["arcface_embeddings"] if c["with_identities"] else None,
                t.get("siglip_embeddings"),
                c["bboxes"],
                c["use_mask"],
                c["id_weight"],
                c["siglip_weight"],
            )
        assert (out - t["output"]).abs().max().item() <= 1e-5, name
    for name, m in gset.spec["masks"].items():
        mask = reference_mask([m["bboxes"]], m["height"], m["width"], m["id_len"], num_heads=1)[0, 0]
        assert torch.equal(mask, tensors[name + ".mask"].bool()), name
