"""The ablation configurations (Table 3 of arXiv 2510.14975v1), parsed by the real config loader:
each equals the full recipe (flux-dev-adapter.yaml, the "Full Setting" row) except for its row's option."""

import dataclasses
import json
from pathlib import Path

import pytest

from train.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
ENV = ("FLUX_DEV", "INSIGHTFACE", "SIGLIP", "DATA", "FFHQ_DATA")
# config file -> Table 3 row (its "method" in withanyone_core/bench/paper_points.json)
ROWS = {
    "ablation-no-phase3.yaml": "w/o Phase 3",
    "ablation-no-gt-align.yaml": "w/o GT-Align",
    "ablation-no-ext-neg.yaml": "w/o Ext. Neg.",
    "ablation-ffhq-only.yaml": "FFHQ only",
}


@pytest.fixture()
def env(monkeypatch, tmp_path):
    for var in ENV:  # as the shipped-config tests do: the loader resolves paths, check_paths is not called
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("OUT", raising=False)
    return tmp_path


def _load(name):
    return dataclasses.asdict(load_config(CONFIGS / name))


def _differences(a, b, where=""):
    """Every leaf path where two nested dicts/lists differ (lists of unequal length: the list itself)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}" if where else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def test_every_ablation_row_has_a_config_and_every_config_a_row(env):
    shipped = {p.name for p in CONFIGS.glob("ablation-*.yaml")}
    assert shipped == set(ROWS)
    table3 = json.loads(
        (Path(__file__).resolve().parents[2] / "withanyone_core" / "bench" / "paper_points.json").read_text()
    )["ablation"]["rows"]
    assert sorted(ROWS.values()) == sorted(r["method"] for r in table3 if r["method"] != "Full Setting")
    outputs = {load_config(CONFIGS / name).output_dir for name in shipped}
    assert len(outputs) == len(shipped)  # no two runs write into one folder
    assert load_config(CONFIGS / "flux-dev-adapter.yaml").output_dir not in outputs


def test_each_config_changes_only_its_rows_option(env):
    full = _load("flux-dev-adapter.yaml")
    phases = [p["name"] for p in full["phases"]]
    assert phases == ["recon-fixed", "recon-captions", "paired", "quality"]

    no_phase3 = _load("ablation-no-phase3.yaml")
    assert [p["name"] for p in no_phase3["phases"]] == ["recon-fixed", "recon-captions", "quality"]
    assert no_phase3["phases"] == [p for p in full["phases"] if p["name"] != "paired"]
    assert _differences({**no_phase3, "phases": None}, {**full, "phases": None}) == ["output_dir"]

    no_align = _load("ablation-no-gt-align.yaml")
    assert [p["gt_aligned"] for p in full["phases"]] == [False, False, True, True]
    assert [p["gt_aligned"] for p in no_align["phases"]] == [False] * 4
    assert _differences(no_align, full) == ["output_dir", "phases[2].gt_aligned", "phases[3].gt_aligned"]

    no_ext = _load("ablation-no-ext-neg.yaml")
    assert [p["negatives"] for p in full["phases"]] == [4033] * 4
    assert [(p["negatives"], p["batch_negatives"]) for p in no_ext["phases"]] == [(0, "gt")] * 4
    assert _differences(no_ext, full) == ["output_dir"] + [f"phases[{i}].negatives" for i in range(4)]

    ffhq = _load("ablation-ffhq-only.yaml")
    assert ffhq["data"]["manifest"] == str(env / "ffhq_data" / "manifest.jsonl")
    assert [p["paired_fallback"] for p in ffhq["phases"]] == ["skip", "skip", "self", "self"]
    assert _differences(ffhq, full) == [
        "output_dir",
        "data.manifest",
        "data.negatives",
        "data.text_cache",
        "phases[2].paired_fallback",
        "phases[3].paired_fallback",
    ]
