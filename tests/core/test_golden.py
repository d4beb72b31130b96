"""Exact parity with the authors' reference implementation (golden data).

Discovers every ``*_cases.json`` in ``WITHANYONE_GOLDEN_DIR`` (default ../shared/golden)
and checks each case's output (max |error| <= 1e-4) and each mask (exact) through the
project's own loaders and the diffusers host. One test per case and per mask.
"""

from __future__ import annotations

import functools

import pytest
import torch

from support.golden import GoldenModel, discover
from withanyone_core.checkpoints.reading import load_safetensors
from withanyone_core.layout import TokenGrid, build_layout

TOLERANCE = 1e-4

SETS = discover()
CASES = [(s, name) for s in SETS for name in s.spec.get("cases", {})]
MASKS = [(s, name) for s in SETS for name in s.spec.get("masks", {})]


@functools.lru_cache(maxsize=4)
def _model(set_name: str) -> GoldenModel:
    return GoldenModel(next(s for s in SETS if s.name == set_name))


def test_golden_data_found():
    assert SETS, "no *_cases.json found: set WITHANYONE_GOLDEN_DIR to the golden data folder"
    assert CASES or MASKS


@pytest.mark.parametrize("gset,case", CASES, ids=[f"{s.name}:{c}" for s, c in CASES])
def test_case_matches_reference(gset, case):
    spec = gset.spec["cases"][case]
    out, expected = _model(gset.name).run_case(case, spec)
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    assert err <= TOLERANCE, f"{case}: max |error| {err:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("gset,mask_name", MASKS, ids=[f"{s.name}:{m}" for s, m in MASKS])
def test_mask_matches_reference(gset, mask_name):
    spec = gset.spec["masks"][mask_name]
    expected = load_safetensors(gset.cases_path)[f"{mask_name}.mask"]
    boxes = spec["bboxes"]
    layout = build_layout([boxes], TokenGrid.for_pixels(spec["height"], spec["width"], padded=False), len(boxes), 1)
    mask = layout.token_mask(spec["id_len"])[0]
    assert mask.shape == expected.shape
    assert torch.equal(mask, expected.bool()), f"{int((mask != expected.bool()).sum())} entries differ"
