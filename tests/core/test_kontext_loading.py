"""Loading the three releases (base, WithAnyone.K, WithAnyone.Ke) and the Kontext-specific rules.

The released files are not downloadable here; their names and shapes are
(../shared/golden/withanyone_official_keys.json and withanyone_kontext_official_keys.json),
so the layouts are checked on meta-device state dicts built from those lists.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from support.golden import DEFAULT_GOLDEN_DIR
from withanyone_core.adapter import AdapterConfig, ArcFaceOnlyAdapter, IdentityAdapter, IdentityAdapterBase
from withanyone_core.checkpoints.adapter_files import (
    detect_adapter_layout,
    infer_adapter_config,
    infer_adapter_variant,
    load_adapter,
    save_adapter,
)
from withanyone_core.checkpoints.reading import CheckpointError
from withanyone_core.host import IdentityRequest, IdentityRun
from withanyone_core.layout import Layout, TokenGrid, box_token_ranges, build_layout

BASE_KEYS = DEFAULT_GOLDEN_DIR / "withanyone_official_keys.json"
KONTEXT_KEYS = DEFAULT_GOLDEN_DIR / "withanyone_kontext_official_keys.json"
SMALL_KE = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=2, num_single_blocks=2, variant="ke")


def _meta_state(shapes: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {k: torch.empty(tuple(s)) for k, s in shapes.items()}


def test_kontext_release_is_recognised_as_ke_with_its_exact_shapes(caplog):
    spec = json.loads(KONTEXT_KEYS.read_text())
    used, unused = spec["tensors"], spec["unused_tensors"]
    assert len(used) == spec["num_tensors"] == 405 and len(unused) == spec["unused_num_tensors"] == 6
    assert detect_adapter_layout({**used, **unused}) == "arcface_only"
    config = infer_adapter_config(used)
    assert config == AdapterConfig(variant="ke")  # 3072, 24 heads of 64, 19 + 38 blocks
    assert (config.layout, config.region_rule, config.requires_reference) == ("arcface_only", "kontext", True)
    with torch.device("meta"):
        adapter = ArcFaceOnlyAdapter(config)
    assert {k: list(v.shape) for k, v in adapter.state_dict().items()} == used
    assert sum(p.numel() for p in adapter.parameters()) == spec["num_params"]

    with caplog.at_level(logging.INFO, logger="withanyone_core.checkpoints.adapter_files"):
        loaded = load_adapter(_meta_state({**used, **unused}), device="meta")  # as released: siglip_in included
    assert isinstance(loaded, ArcFaceOnlyAdapter) and loaded.config.variant == "ke"
    assert "ignoring 6 siglip_in.* tensors" in caplog.text
    assert "WithAnyone.Ke" in caplog.text  # the log says which release was loaded
    assert load_adapter(_meta_state(used), device="meta").config == config  # siglip_in is not required


def test_base_release_is_two_branch_and_not_ke():
    shapes = json.loads(BASE_KEYS.read_text())["tensors"]
    assert detect_adapter_layout(shapes) == "two_branch"
    config = infer_adapter_config(shapes)
    assert (config.variant, config.region_rule, config.requires_reference) == ("base", "base", False)
    with pytest.raises(CheckpointError, match="two_branch layout"):
        infer_adapter_config(shapes, variant="ke")
    kontext = json.loads(KONTEXT_KEYS.read_text())["tensors"]
    with pytest.raises(CheckpointError, match="arcface_only layout"):
        infer_adapter_config(kontext, variant="base")
    with pytest.raises(CheckpointError, match="mixes"):
        detect_adapter_layout({**shapes, **kontext})


def test_k_is_told_by_metadata_or_name_and_runs_as_the_base_code(tmp_path):
    assert infer_adapter_variant("two_branch", {}, "withanyone.safetensors") == "base"
    assert infer_adapter_variant("two_branch", {}, "WithAnyone.K.preview.safetensors") == "k"
    assert infer_adapter_variant("two_branch", {}, "withanyone_kontext.safetensors") == "k"
    assert infer_adapter_variant("two_branch", {}, "withanyone_kontext_edit.safetensors") == "base"
    assert infer_adapter_variant("arcface_only", {}, "anything.safetensors") == "ke"
    adapter = IdentityAdapter(AdapterConfig(128, 2, 1, 1))
    named = tmp_path / "withanyone_kontext.safetensors"
    save_adapter(adapter, named, metadata={"withanyone_variant": "k"})
    loaded = load_adapter(named)
    assert loaded.config.variant == "k" and loaded.config.region_rule == "base"
    save_adapter(adapter, tmp_path / "x.safetensors", metadata={"withanyone_variant": "ke"})
    with pytest.raises(CheckpointError, match="metadata says WithAnyone.Ke"):
        load_adapter(tmp_path / "x.safetensors")


def test_training_siglip_branch_and_foreign_files_are_refused_with_advice():
    hidden = 128
    sig_branch = {
        "ipa.0.to_q.weight": (128, hidden),
        "arcface_in.0.weight": (512, 512),
        "siglip_in.0.weight": (hidden, 768),
    }
    with pytest.raises(CheckpointError, match="SigLIP-branch"):
        detect_adapter_layout(sig_branch)
    with pytest.raises(CheckpointError, match="WithAnyone.Ke"):
        detect_adapter_layout({"img_in.weight": (3072, 64)})


def test_the_two_adapters_are_siblings_over_one_base():
    """Ke is not a two-branch adapter with parts missing: both build their own keys over a shared base."""
    ke = ArcFaceOnlyAdapter(SMALL_KE)
    two = IdentityAdapter(AdapterConfig(**{**SMALL_KE.to_dict(), "variant": "base"}))
    assert isinstance(ke, IdentityAdapterBase) and isinstance(two, IdentityAdapterBase)
    assert not isinstance(ke, IdentityAdapter) and not isinstance(two, ArcFaceOnlyAdapter)
    assert ke.arc_blocks is ke.ipa and two.arc_blocks is two.ipa_arc
    assert {k.split(".")[0] for k in ke.state_dict()} == {"ipa", "arcface_in"}
    assert {k.split(".")[0] for k in two.state_dict()} == {
        "ipa_arc",
        "ipa_sig",
        "arcface_in_arc",
        "arcface_in_sig",
        "siglip_in_sig",
    }
    with pytest.raises(TypeError, match="abstract"):
        IdentityAdapterBase(SMALL_KE)


def test_ke_round_trip_and_same_maths_as_the_arcface_branch(tmp_path):
    torch.manual_seed(0)
    ke = ArcFaceOnlyAdapter(SMALL_KE).eval()
    with torch.no_grad():
        for p in ke.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "withanyone_ke.safetensors"
    save_adapter(ke, path)
    loaded = load_adapter(path)
    assert isinstance(loaded, ArcFaceOnlyAdapter) and loaded.config == SMALL_KE
    for k, v in ke.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    # the same weights in a two-branch adapter's ArcFace branch give the same residual (shared code)
    two = IdentityAdapter(AdapterConfig(**{**SMALL_KE.to_dict(), "variant": "base"})).eval()
    renamed = {
        k.replace("ipa.", "ipa_arc.", 1).replace("arcface_in.", "arcface_in_arc.", 1): v
        for k, v in ke.state_dict().items()
    }
    two.load_state_dict({**two.state_dict(), **renamed})
    grid = TokenGrid(6, 8)
    arc, img = 20 * torch.randn(2, 3, 512), torch.randn(2, grid.num_tokens, 128)
    boxes = [[[0, 0, 60, 50], [40, 20, 128, 96], [10, 60, 70, 96]], None]
    with torch.no_grad():
        a = ke.block_residual(3, img, ke.prepare(arc, None, grid, boxes, 0.7, 0.0))
        b = two.block_residual(
            3,
            img,
            IdentityAdapter.prepare_from(
                two.encode_identities(arc, None, with_siglip=False),
                build_layout(boxes, grid, 3, 2, rule="kontext"),
                0.7,
                0.0,
            ),
        )
    assert torch.equal(a, b) and a.abs().max() > 0
    with pytest.raises(ValueError, match="only the ArcFace branch"):
        IdentityRun(ke, IdentityRequest(arc[0], None, siglip_weight=0.5)).inputs(grid, 1, "cpu")


def test_kontext_rule_truncates_before_the_ceiling():
    grid = TokenGrid(16, 16)
    box = [[40.7, 33.2, 143.9, 160.5]]
    assert box_token_ranges(box, grid, "base").tolist() == [[2, 2, 9, 11]]  # ceil(143.9/16)=9, ceil(160.5/16)=11
    assert box_token_ranges(box, grid, "kontext").tolist() == [[2, 2, 9, 10]]  # ceil(160/16)=10
    assert box_token_ranges([[-5.5, 250.0, 300.0, 400.0]], grid, "kontext").tolist() == [[0, 15, 16, 16]]
    with pytest.raises(ValueError, match="region rule"):
        box_token_ranges(box, grid, "round")


def test_run_uses_the_adapters_rule_and_ke_needs_a_reference():
    torch.manual_seed(1)
    ke = ArcFaceOnlyAdapter(SMALL_KE).eval()
    grid = TokenGrid(16, 16)
    box = [[40.7, 33.2, 143.9, 160.5]]
    run = IdentityRun(ke, IdentityRequest(20 * torch.randn(1, 512), None, Layout(256, 256, box)))
    inputs = run.inputs(grid, 1, "cpu")
    expected = build_layout([box], grid, 1, 1, rule="kontext").allowed
    assert torch.equal(inputs.layout.allowed, expected)
    assert not torch.equal(expected, build_layout([box], grid, 1, 1, rule="base").allowed)
    forced = IdentityRun(ke, IdentityRequest(20 * torch.randn(1, 512), None, Layout(256, 256, box), region_rule="base"))
    assert torch.equal(forced.inputs(grid, 1, "cpu").layout.allowed, build_layout([box], grid, 1, 1).allowed)

    img = torch.randn(1, grid.num_tokens, 128)
    with torch.no_grad(), pytest.raises(ValueError, match="no reference image reached the model"):
        run.add_residual(0, img, inputs)
    with_ref = torch.cat([img, torch.randn(1, 100, 128)], dim=1)
    with torch.no_grad():
        out = run.add_residual(0, with_ref, inputs)
    assert torch.equal(out[:, grid.num_tokens :], with_ref[:, grid.num_tokens :])  # reference tokens untouched
    assert not torch.equal(out[:, : grid.num_tokens], img)
