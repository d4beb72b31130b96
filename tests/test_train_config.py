"""Trainer configuration, phases and losses that need no models."""

import dataclasses
import textwrap

import numpy as np
import pytest
import torch

from train.config import Config, ConfigError, PhaseConfig, check_paths, load_config
from train.data import DataOptions
from train.losses import (
    TRAIN_SCHEDULE_STEPS,
    contrastive_loss,
    id_gate,
    id_loss,
    match_detections,
    sample_timesteps,
    shift_mu,
    time_shift,
)
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
        (BASE, ["train.mode=dreambooth"], "adapter, lora, full"),
        (BASE, ["train.branch=clip"], "arcface, siglip, both"),
        (BASE, ["phases.0.crop=random"], r"phases\[0\] \(a\): crop must be one of"),
        (BASE, ["phases.1.contrastive_positive=ref"], "gt, reference"),
        (BASE, ["phases.0.paired_min_similarity=2"], "cosine similarity in"),
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


def test_timestep_sampling_modes():
    g = torch.Generator().manual_seed(0)
    # the authors': a uniform index into linspace(1, 0, 1000) shifted for the size (1024 tokens at 512 px)
    t = sample_timesteps(20000, 1024, g)
    mu = 0.5 + (1024 - 256) * 0.65 / 3840
    grid = np.linspace(1.0, 0.0, TRAIN_SCHEDULE_STEPS)
    shifted = np.where(grid > 0, np.exp(mu) / (np.exp(mu) + 1 / np.maximum(grid, 1e-12) - 1), 0.0)
    assert np.abs(t.numpy()[:, None] - shifted[None, :]).min(axis=1).max() < 1e-6  # every t is a schedule value
    assert len(np.unique(t.numpy())) > 900 and t.max() == 1.0
    assert abs((t <= 0.6).float().mean().item() - (shifted <= 0.6).mean()) < 0.02
    # logit-normal, then the same shift: median sigmoid(0) shifted by mu
    small = sample_timesteps(20000, 256, torch.Generator().manual_seed(0), "logit_normal")
    large = sample_timesteps(20000, 4096, torch.Generator().manual_seed(0), "logit_normal")
    assert 0 < small.min() and large.max() < 1
    assert abs(small.median().item() - 0.62) < 0.02  # mu = 0.5 at 256 tokens: sigmoid(0.5)
    assert large.median() > small.median()  # bigger images are pushed towards noise
    assert shift_mu(4096) == pytest.approx(1.15) and time_shift(1.0, torch.tensor([0.0])).item() == 0.0


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
    # the authors' negatives: per-anchor pool rows plus the batch's other GT faces (same identity left out)
    per_anchor = torch.randn(4, 16, 512)
    near = refs + 0.01 * torch.randn(4, 512)
    gt_mode = contrastive_loss(near, valid, refs, ids, per_anchor, batch_keys=refs)
    unit = torch.nn.functional.normalize
    expected = []
    for k in range(4):
        keys = torch.cat([refs[k:k + 1], refs[ids != ids[k]], per_anchor[k]])  # positive first
        logits = unit(keys, dim=1) @ unit(near[k], dim=0) / 0.1
        expected.append(torch.logsumexp(logits, 0) - logits[0])
    assert torch.isclose(gt_mode, torch.stack(expected).mean(), atol=1e-4)
    # rows 0 and 3 are the same person: neither is the other's negative
    anchors = refs.clone().requires_grad_(True)
    loss = contrastive_loss(anchors, valid, refs, ids, negatives, temperature=0.07)
    loss.backward()
    assert torch.isfinite(anchors.grad).all()
    none = contrastive_loss(anchors, torch.zeros(4, dtype=torch.bool), refs, ids, negatives)
    assert none.item() == 0.0 and none.requires_grad


def test_lr_is_a_function_of_the_step(tmp_path):
    """Warm-up over global steps, each phase's lr from its first step, the same for any process count."""
    schedule = PhaseSchedule(load_config(_write(tmp_path), ["phases.1.lr=0.5", "phases.2.lr=0.25"]).phases)
    trace = [schedule.lr_at(step, 1.0, warmup_steps=2) for step in range(schedule.total_steps)]
    assert trace == [0.5, 1.0, 1.0, 0.5, 0.5] + [0.25] * 4


def test_data_options_follow_the_phase_keys():
    """Every data rule is a PhaseConfig key of the same name and default, validated once (in DataOptions)."""
    phase_fields = {f.name: f for f in dataclasses.fields(PhaseConfig)}
    for name in DataOptions.phase_fields():
        assert name in phase_fields, name
        assert phase_fields[name].default == dataclasses.fields(DataOptions)[
            [f.name for f in dataclasses.fields(DataOptions)].index(name)].default, name
    phase = PhaseConfig(name="p", steps=1, paired_ratio=0.5, crop="center")
    options = DataOptions.from_phase(phase, [[256, 128]])
    assert options.paired_ratio == 0.5 and options.crop == "center" and options.buckets == ((256, 128),)


def test_command_line_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = _write(tmp_path / "configs")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path, ["data.manifest=mine/manifest.jsonl", "models.siglip=sig"])
    assert config.data.manifest == str(elsewhere / "mine" / "manifest.jsonl")  # --set: the current directory
    assert config.models.siglip == str(elsewhere / "sig")
    assert config.output_dir == str(tmp_path / "configs" / "out")  # in the file: the file's folder


def test_missing_paths_fail_fast_with_key_path_and_hint(tmp_path):
    config = load_config(_write(tmp_path, BASE + 'setup_hint: "build it with make train-smoke"\n'))
    with pytest.raises(ConfigError, match=r"models.base: .*tiny does not exist .*\nbuild it with make train-smoke"):
        check_paths(config)
    for folder in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer"):
        (tmp_path / "tiny" / folder).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"models.base: .*tiny/tokenizer_2 does not exist"):
        check_paths(config)
    (tmp_path / "tiny" / "tokenizer_2").mkdir()
    with pytest.raises(ConfigError, match=r"data.manifest: .*manifest.jsonl does not exist .*prepare.py"):
        check_paths(config)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text("")
    with pytest.raises(ConfigError, match="models.antelopev2 is empty but a phase uses the ID losses"):
        check_paths(config)


def test_detections_are_matched_to_gt_boxes_by_iou():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)
    assert match_detections(gt, gt[::-1] + 1) == [1, 0]
    assert match_detections(gt, gt) == [0, 1]
    assert match_detections(gt, gt[:1]) is None  # a face missing: the sample leaves the ID losses
    assert isinstance(Config, type)


def test_memory_arithmetic_and_measured_activations():
    """16 bytes per trained parameter on one GPU (fp32 weights, gradients, two AdamW states); ZeRO-2 shards
    all but the bf16 weights. Activations are measured on the meta device: checkpointing keeps less, a larger
    image keeps more, and the VAE decode of the ID losses is counted."""
    from train.memory import decoder_activations, optimizer_memory, transformer_activations

    assert optimizer_memory(10**9) == (4e9, 4e9, 8e9)
    assert optimizer_memory(10**9, zero_stage=2, num_processes=8) == (2e9 + 0.5e9, 0.5e9, 1e9)
    flux = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(16, 24, 24))
    kept = {ckpt: transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, ckpt) for ckpt in (True, False)}
    assert 0 < kept[True] < kept[False]
    assert transformer_activations(flux, 1, 512, 512, 32, torch.bfloat16, False) > 3 * kept[False]
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
               layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    small, large = (decoder_activations(vae, 1, s, s, torch.bfloat16) for s in (128, 256))
    assert 3.5 * small < large < 4.5 * small  # decoder activations grow with the pixel count


def test_flux_dev_configs_are_the_authors_recipe(monkeypatch, tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "train" / "configs"
    for var in ("FLUX_DEV", "INSIGHTFACE", "SIGLIP", "DATA"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    adapter = load_config(configs / "flux-dev-adapter.yaml")
    lora = load_config(configs / "flux-dev-lora.yaml")
    t = adapter.train
    assert (t.mode, t.branch, t.timesteps, t.mixed_precision, t.adapter_init) == (
        "adapter", "arcface", "shifted_uniform", "bf16", "authors")
    assert (t.optimizer.lr, t.optimizer.weight_decay, t.optimizer.warmup_steps) == (1e-4, 0.0, 0)
    assert [p.gt_aligned for p in adapter.phases] == [False, False, True, True]
    assert [p.paired_ratio for p in adapter.phases] == [0.0, 0.0, 0.5, 0.5]
    for phase in adapter.phases + lora.phases:
        assert (phase.loss.id, phase.loss.contrastive, phase.id_gate, phase.temperature, phase.negatives) == (
            0.1, 0.1, 0.6, 0.1, 4033)
        assert (phase.contrastive_positive, phase.batch_negatives, phase.crop, phase.min_face_size) == (
            "gt", "gt", "keep_faces", 100.0)
        assert (phase.paired_candidates, phase.paired_min_similarity, phase.paired_accept_similarity,
                phase.paired_fallback) == (20, 0.6, 0.8, "skip")
