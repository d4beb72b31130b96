"""Trainer configuration, phases and losses that need no models."""

import textwrap

import pytest
import torch

from train.config import ConfigError, load_config
from train.losses import contrastive_loss, id_gate, id_loss, sample_timesteps, shift_mu
from train.phases import PhaseSchedule

BASE = textwrap.dedent(
    """
    output_dir: out
    models: {base: ${TINY_BASE:-tiny}}
    data: {manifest: data/manifest.jsonl}
    phases:
      - {name: a, steps: 3, prompt_mode: fixed}
      - {name: b, steps: 2, loss: {flow: 1.0, id: 0.1}}
      - {name: c, steps: 4, paired_ratio: 0.5}
    """
)


def _write(tmp_path, text=BASE):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_paths_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_BASE", "models/flux")
    config = load_config(_write(tmp_path), ["train.mode=lora", "phases.1.steps=7", "train.lora.rank=4"])
    assert config.models.base == str(tmp_path / "models" / "flux")
    assert config.train.mode == "lora" and config.train.lora.rank == 4
    assert config.total_steps == 3 + 7 + 4
    assert config.output_dir == str(tmp_path / "out")


def test_default_in_env_substitution(tmp_path, monkeypatch):
    monkeypatch.delenv("TINY_BASE", raising=False)
    assert load_config(_write(tmp_path)).models.base == str(tmp_path / "tiny")
    monkeypatch.delenv("TINY_BASE", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{NOPE\} is not set"):
        load_config(_write(tmp_path, BASE.replace("${TINY_BASE:-tiny}", "${NOPE}")))


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        (BASE + "learning_rate: 1\n", [], r"unknown key\(s\) \['learning_rate'\]"),
        (BASE, ["train.optimizer.lrr=1"], r"train.optimizer: unknown key\(s\) \['lrr'\]"),
        (BASE, ["train.mode=dreambooth"], "adapter, lora or full"),
        (BASE, ["phases.0.steps=many"], "phases\\[0\\].steps: expected int"),
        (BASE, ["phases.2.paired_ratio=1.5"], "paired_ratio must be in"),
        (BASE.replace("output_dir: out\n", ""), [], "output_dir is required"),
        (BASE, ["data.buckets=[[500, 512]]"], "multiple of 16"),
    ],
)
def test_strict_validation(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text), overrides)


def test_phase_boundaries(tmp_path):
    schedule = PhaseSchedule(load_config(_write(tmp_path)).phases)
    names = [schedule.at(step).phase.name for step in range(schedule.total_steps)]
    assert names == ["a"] * 3 + ["b"] * 2 + ["c"] * 4
    assert schedule.at(5).start_step == 5
    with pytest.raises(IndexError):
        schedule.at(9)


def test_timestep_schedule_is_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    small = sample_timesteps(20000, 256, g)
    large = sample_timesteps(20000, 4096, torch.Generator().manual_seed(0))
    assert 0 < small.min() and large.max() < 1
    assert abs(small.median().item() - 0.62) < 0.02  # mu = 0.5 at 256 tokens: sigmoid(0.5)
    assert large.median() > small.median()  # bigger images are pushed towards noise
    assert shift_mu(4096) == pytest.approx(1.15)


def test_id_loss_of_ground_truth_is_zero_and_gate():
    gt = torch.randn(3, 2, 512)
    assert id_loss(gt, gt).item() == pytest.approx(0.0, abs=1e-6)
    assert id_loss(-gt, gt).item() == pytest.approx(2.0, abs=1e-5)
    assert id_gate(torch.tensor([0.1, 0.5, 0.9]), 0.5).tolist() == [True, True, False]


def test_contrastive_prefers_the_reference_and_ignores_same_identity():
    torch.manual_seed(0)
    refs = torch.randn(4, 512)
    ids = torch.tensor([0, 1, 2, 0])
    negatives = torch.randn(16, 512)
    valid = torch.ones(4, dtype=torch.bool)
    good = contrastive_loss(refs + 0.01 * torch.randn(4, 512), valid, refs, ids, negatives)
    bad = contrastive_loss(torch.randn(4, 512), valid, refs, ids, negatives)
    assert good < bad
    # rows 0 and 3 are the same person: neither is the other's negative
    anchors = refs.clone().requires_grad_(True)
    loss = contrastive_loss(anchors, valid, refs, ids, negatives, temperature=0.07)
    loss.backward()
    assert torch.isfinite(anchors.grad).all()
    none = contrastive_loss(anchors, torch.zeros(4, dtype=torch.bool), refs, ids, negatives)
    assert none.item() == 0.0 and none.requires_grad
