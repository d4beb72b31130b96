"""Trainer configuration, phases and losses that need no models."""

import dataclasses
import os
import re
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
)
from train.phases import PhaseSchedule
from withanyone_core.recipe import flux_mu, time_shift

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
    assert flux_mu(4096) == pytest.approx(1.15) and time_shift(1.0, torch.tensor([0.0])).item() == 0.0


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
        keys = torch.cat([refs[k : k + 1], refs[ids != ids[k]], per_anchor[k]])  # positive first
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
        assert (
            phase_fields[name].default
            == dataclasses.fields(DataOptions)[[f.name for f in dataclasses.fields(DataOptions)].index(name)].default
        ), name
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
    from withanyone_core.testing.tiny_train import flux_transformer_config

    assert optimizer_memory(10**9) == (4e9, 4e9, 8e9)
    assert optimizer_memory(10**9, zero_stage=2, num_processes=8) == (2e9 + 0.5e9, 0.5e9, 1e9)
    flux = flux_transformer_config(num_layers=2, num_single_layers=2, num_heads=2, text_dim=32)
    kept = {ckpt: transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, ckpt) for ckpt in (True, False)}
    assert 0 < kept[True] < kept[False]
    assert transformer_activations(flux, 1, 512, 512, 32, torch.bfloat16, False) > 3 * kept[False]
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    small, large = (decoder_activations(vae, 1, s, s, torch.bfloat16) for s in (128, 256))
    assert 3.5 * small < large < 4.5 * small  # decoder activations grow with the pixel count


def test_flux_dev_configs_are_the_authors_recipe(monkeypatch, tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "train" / "configs"
    for var in ("FLUX_DEV", "INSIGHTFACE", "SIGLIP", "DATA"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    adapter = load_config(configs / "flux-dev-adapter.yaml")
    lora = load_config(configs / "flux-dev-lora.yaml")
    t = adapter.train
    assert (t.mode, t.branch, t.timesteps, t.mixed_precision, t.adapter_init) == (
        "adapter",
        "arcface",
        "shifted_uniform",
        "bf16",
        "authors",
    )
    assert (t.optimizer.lr, t.optimizer.weight_decay, t.optimizer.warmup_steps) == (1e-4, 0.0, 0)
    assert [p.gt_aligned for p in adapter.phases] == [False, False, True, True]
    assert [p.paired_ratio for p in adapter.phases] == [0.0, 0.0, 0.5, 0.5]
    for phase in adapter.phases + lora.phases:
        assert (phase.loss.id, phase.loss.contrastive, phase.id_gate, phase.temperature, phase.negatives) == (
            0.1,
            0.1,
            0.6,
            0.1,
            4033,
        )
        assert (phase.contrastive_positive, phase.batch_negatives, phase.crop, phase.min_face_size) == (
            "gt",
            "gt",
            "keep_faces",
            100.0,
        )
        assert (
            phase.paired_candidates,
            phase.paired_min_similarity,
            phase.paired_accept_similarity,
            phase.paired_fallback,
        ) == (20, 0.6, 0.8, "skip")


# --- configuration errors: one line, naming the file and line or the key, before anything loads ---

NUMBERS = textwrap.dedent(
    """
    output_dir: out
    models: {base: tiny}
    data: {manifest: data/manifest.jsonl, batch_size: ${BATCH:-2}}
    train:
      mixed_precision: no        # YAML 1.1 would read a boolean
      optimizer: {lr: 1e-4, eps: 1E-8, betas: [0.9, 0.999]}
    sample: {width: 2.56e2, height: 256}
    phases:
      - {name: a, steps: 1e3, prompt_mode: fixed, lr: 5e-5}
      - name: b
        steps: 10_000
        lr: "2e-5"
    """
)


def test_floats_written_1e_4_are_numbers_in_the_file_and_in_set(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCH", raising=False)
    config = load_config(_write(tmp_path, NUMBERS))
    assert config.train.optimizer.lr == 1e-4 and config.train.optimizer.eps == 1e-8
    assert [p.lr for p in config.phases] == [5e-5, 2e-5] and [p.steps for p in config.phases] == [1000, 10000]
    assert config.train.mixed_precision == "no" and config.sample.width == 256 and config.data.batch_size == 2
    monkeypatch.setenv("BATCH", "4")  # an unquoted ${VAR} is read like a value written there
    config = load_config(
        _write(tmp_path, NUMBERS),
        ["phases.1.lr=3e-4", "train.optimizer.lr=2E-3", "train.optimizer.betas=[9e-1, 0.99]", "data.mix=[1, 2e0]"],
    )
    assert config.data.batch_size == 4 and config.phases[1].lr == 3e-4 and config.train.optimizer.lr == 2e-3
    assert config.train.optimizer.betas == [0.9, 0.99] and config.data.mix == [1.0, 2.0]


def test_every_numeric_key_declares_its_range():
    """One mechanism for every number: a key added without ``Annotated[..., Range(...)]`` fails here."""
    from train.config import numeric_keys_without_range

    assert numeric_keys_without_range() == []


def _numeric_keys() -> list[tuple[str, str]]:
    """(--set path, name in the error, value template) of every numeric key under Config, phases as phases.0."""
    import typing

    from train.config import _hints, _strip_optional

    out = []

    def walk(cls, path, shown):
        for name, hint in _hints(cls).items():
            base = _strip_optional(hint)
            if typing.get_origin(base) is typing.Annotated:
                base = _strip_optional(typing.get_args(base)[0])
            p, s = f"{path}{name}", f"{shown}{name}"
            if base in (int, float):
                out.append((p, s, "{}"))
            elif dataclasses.is_dataclass(base):
                walk(base, p + ".", s + ".")
            elif typing.get_origin(base) is list and dataclasses.is_dataclass(typing.get_args(base)[0]):
                walk(typing.get_args(base)[0], p + ".0.", s + "[0].")
            elif typing.get_origin(base) is list:  # a list of numbers (or of lists of numbers): its first item
                item = typing.get_args(base)[0]
                nested = typing.get_origin(item) is list
                item = typing.get_args(item)[0] if nested else item
                if typing.get_origin(item) is typing.Annotated:
                    item = typing.get_args(item)[0]
                if item in (int, float):
                    out.append((p, s + ("[0][0]" if nested else "[0]"), "[[{}, 512]]" if nested else "[{}, 0.5]"))

    walk(Config, "", "")
    return out


MULTIID2M = BASE.replace(
    "data: {manifest: data/manifest.jsonl}", "data: {source: multiid2m, multiid2m: {shards: s/*.tar}}"
)


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "-1e30", "1e400"])
def test_every_numeric_key_refuses_non_finite_and_absurd_values_naming_the_key(tmp_path, bad):
    keys = _numeric_keys()
    assert len(keys) >= 40 and ("phases.0.lr", "phases[0].lr", "{}") in keys
    text = _write(tmp_path, MULTIID2M)
    for path, shown, template in keys:
        if bad == "-1e30" and path in ("phases.0.min_quality", "data.mix"):
            continue  # any finite quality threshold is meaningful; data.mix: its own rule, tested elsewhere
        with pytest.raises(ConfigError, match=re.escape(shown) + " must be"):
            load_config(text, [f"{path}={template.format(bad)}"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["phases.1.lr=-0.5"], r"^phases\[1\].lr must be > 0; got -0.5$"),  # gradient ascent, accepted before
        (["train.optimizer.lr=.nan"], r"^train.optimizer.lr must be a finite number"),
        (["train.optimizer.lr=-1e-3"], r"^train.optimizer.lr must be > 0; got -0.001$"),
        (["train.optimizer.lr=0"], r"train.optimizer.lr must be > 0"),
        (["phases.0.steps=0"], r"phases\[0\].steps must be >= 1"),
        (["phases.0.steps=2.5"], r"phases\[0\].steps: expected int \(a whole number\), got 2.5"),
        (["data.batch_size=0"], r"data.batch_size must be >= 1"),
        (["data.num_workers=-1"], r"data.num_workers must be >= 0"),
        (["data.buckets=[[0, 0]]"], r"data.buckets\[0\]\[0\] must be >= 16"),
        (["data.buckets=[[512]]"], r"data.buckets\[0\]: give \[width, height\]"),
        (["sample.width=100"], r"sample.width must be >= 16 and a multiple of 16"),
        (["train.optimizer.betas=[0.9, 1.0]"], r"train.optimizer.betas\[1\] must be in \[0, 1\)"),
        (["phases.2.temperature=0"], r"phases\[2\].temperature must be > 0"),
        (["phases.1.loss.id=-0.1"], r"phases\[1\].loss.id must be >= 0"),
        (["seed=-1"], r"seed must be in \[0, 4294967296\)"),
        (["checkpoint.every=0"], r"checkpoint.every must be >= 1"),
        (["train.optimizer.lr=fast"], r"train.optimizer.lr: expected float \(a number\), got 'fast'"),
        (["train.gradient_checkpointing=maybe"], r"train.gradient_checkpointing: expected true or false"),
    ],
)
def test_numeric_settings_are_range_checked_naming_the_key(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path), overrides)


def test_ranges_hold_in_the_file_too(tmp_path):
    for key, value, match in (
        ("lr", "-1e-3", r"train.optimizer.lr must be > 0"),
        ("lr", ".nan", r"train.optimizer.lr must be a finite number"),
        ("warmup_steps", "-2", r"train.optimizer.warmup_steps must be >= 0"),
    ):
        text = BASE + f"train: {{optimizer: {{{key}: {value}}}}}\n"
        with pytest.raises(ConfigError, match=match):
            load_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    "assignment,match",
    [
        (
            "phases.9.lr=1",
            r"--set phases.9.lr: '9' is not an index of phases, which is a list of 3: 0 \(a\), 1 \(b\), 2 \(c\)",
        ),
        ("phases.x.lr=1", r"--set phases.x.lr: 'x' is not an index of phases, which is a list of 3"),
        ("phases.-1.lr=1", r"'-1' is not an index of phases"),
        ("data.batch_size.x=1", r"--set data.batch_size.x: data.batch_size is a single value, it has no 'x'"),
        ("data.manifest.x=1", r"data.manifest is a single value, it has no 'x'"),
        ("train.optimizer.lrr=1", r"train.optimizer: unknown key\(s\) \['lrr'\]; allowed: \['betas', 'eps', 'lr'"),
        ("trian.mode=lora", r"the config: unknown key\(s\) \['trian'\]; allowed: \["),
        (
            "data.buckets.0=[256, 256]",
            r"data.buckets is not set in the config: set it whole \(--set data.buckets=\[...\]\)",
        ),
        ("phases..lr=1", r"'phases..lr' is not a key path"),
        ("phases.0.lr", r"use key.path=value"),
        ("train.optimizer.lr=[1", r"--set train.optimizer.lr line 1 column 3: not valid YAML"),
    ],
)
def test_a_bad_set_path_names_the_path_and_what_exists_there(tmp_path, assignment, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path), [assignment])


def test_set_reaches_lists_and_sections_the_file_leaves_out(tmp_path):
    config = load_config(_write(tmp_path), ["phases.2.loss.id=0.5", "train.lora.rank=8", "phases.1.lr=2e-4"])
    assert config.phases[2].loss.id == 0.5 and config.train.lora.rank == 8 and config.phases[1].lr == 2e-4


@pytest.mark.parametrize(
    "content,match",
    [
        (b"output_dir: out\nmodels: {base: x}\n  bad: [\n", r"c.yaml line 3 column 3: not valid YAML"),
        (
            b"output_dir: out\nphases:\n  - {name: a, steps: 3\n",
            r"c.yaml line 4 column 1: not valid YAML: .*expected ',' or '}'",
        ),
        (
            b"output_dir: out\nseed: 1\noutput_dir: again\n",
            r"c.yaml line 3 column 1: .*'output_dir' is given twice \(first on line 1\)",
        ),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            r"c.yaml line 1: not a text config \(byte 0x89 at offset 0 is not UTF-8\)",
        ),
        (
            b"output_dir: out\nseed: 1\x00\x01\n",
            r"c.yaml line 2: character U\+0000 at offset 23 is not allowed in YAML",
        ),
        (b"- output_dir\n- models\n", r"c.yaml: the config must be a mapping of keys .* not a list"),
        (b"output_dir: out\n---\nseed: 1\n", r"c.yaml line 2 column 1: not valid YAML: .*single document"),
        (b"output_dir: out\nseed: !!int 1e3\n", r"c.yaml line 2 column 7: not valid YAML: '1e3' is not an integer"),
        (b"output_dir: out\n\tseed: 1\n", r"c.yaml line 2 column 1: not valid YAML: .*'\\t'"),
        (b"output_dir: !!python/object:os.system x\n", r"c.yaml line 1 column 13: not valid YAML: could not determine"),
    ],
)
def test_malformed_or_binary_yaml_names_the_file_and_line(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_errors_show_a_short_value_however_large_or_nested(tmp_path):
    """A value nested through aliases (9^9 strings) is named in one short line, at once."""
    lines = ["    fixed_prompt:", "      - &a [" + ", ".join(["lol"] * 9) + "]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"      - &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    text = BASE.replace(
        "  - {name: a, steps: 3, prompt_mode: fixed}\n", "  - name: a\n    steps: 3\n" + "\n".join(lines) + "\n"
    )
    with pytest.raises(ConfigError, match=r"^phases\[0\].fixed_prompt: expected str, got \[\['lol'") as error:
        load_config(_write(tmp_path, text))
    assert len(str(error.value)) < 200 and "\n" not in str(error.value)


def test_environment_is_substituted_in_values_never_in_comments(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    monkeypatch.setenv("FLUX", "models/flux")
    text = BASE.replace("models: {base: ${TINY_BASE:-tiny}}\n", "") + textwrap.dedent(
        """\
        # a comment naming ${NOT_SET_ANYWHERE} and ${NOT_SET_ANYWHERE:-x}
        models: {base: ${FLUX}, adapter: ${NOT_SET_ANYWHERE:-}}  # ${NOT_SET_ANYWHERE}
        seed: ${SEED:-7}   # ${NOT_SET_ANYWHERE}
        setup_hint: "${NOT_SET_ANYWHERE:-no hint} #1"
        """
    )
    config = load_config(_write(tmp_path, text))
    assert config.models.base == str(tmp_path / "models" / "flux")  # inside a flow mapping too
    assert config.seed == 7 and config.models.adapter is None and config.setup_hint == "no hint #1"
    with pytest.raises(ConfigError, match=r"c.yaml line 2: environment variable \$\{NOT_SET_ANYWHERE\} is not set"):
        load_config(_write(tmp_path, BASE.replace("output_dir: out", "output_dir: ${NOT_SET_ANYWHERE}")))


def test_smoke_configs_load_with_no_environment_variables(monkeypatch):
    """`make train-smoke` from a fresh clone: no WITHANYONE_* set (a ${...} in a comment broke it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in list(os.environ):
        if name.startswith("WITHANYONE_"):
            monkeypatch.delenv(name)
    smoke = load_config(root / "train" / "configs" / "smoke.yaml")
    shards = load_config(root / "train" / "configs" / "smoke-multiid2m.yaml")
    assert smoke.output_dir == str(root / ".cache" / "smoke" / "run")
    assert shards.output_dir == str(root / ".cache" / "smoke" / "run-multiid2m")
    assert shards.data.multiid2m.shards == str(root / ".cache" / "smoke" / "multiid2m" / "train" / "re_*.tar")


def test_readme_yaml_examples_parse():
    """Every ```yaml block of README reads with the trainer's YAML rules (numbers as numbers)."""
    from pathlib import Path

    from train.config import read_yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        assert isinstance(read_yaml(block, "README.md", substitute=False), dict)


def test_output_dir_that_is_a_file_or_inside_one_is_refused_before_anything_is_written(tmp_path):
    from train.config import check_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir: .*/file is not a folder: give a folder"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(
        ConfigError,
        match=r"^output_dir: .*/file/run is not a folder \(it would be inside .*/file, "
        r"which is a file\)",
    ):
        check_output_dir(str(tmp_path / "file" / "run"))
    check_output_dir(str(tmp_path / "new" / "run"))  # creatable: fine, and nothing is created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")  # where the run keeps a folder
    with pytest.raises(ConfigError, match=r"^output_dir: .*/run/checkpoints is a file where the run keeps a folder"):
        check_output_dir(str(run))
    with pytest.raises(ConfigError, match=r"^output_dir is empty"):
        load_config(_write(tmp_path, BASE.replace("output_dir: out", 'output_dir: ""')))


def _without_root_override():
    """Root writes into read-only folders: when the tests run as root, the child process loses the
    capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as a user's process never has them."""
    if os.geteuid() != 0:
        return None

    def drop():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone at exec
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def test_read_only_output_dir_is_refused_before_anything_loads(tmp_path):
    """A read-only output_dir that holds a run failed only after loading the models and resuming. Checked in
    a process without root's override (the tests may run as root); run.py's one-line exit for every
    ConfigError is the next test."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "c.yaml").write_text(BASE)
    out = tmp_path / "out"
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    code = (
        "import sys\nfrom train.config import ConfigError, check_output_dir, load_config\n"
        "try:\n    check_output_dir(load_config(sys.argv[1]).output_dir)\n"
        "except ConfigError as exc:\n    sys.exit(f'error: {exc}')\nprint('writable')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    for folder, name in ((out, "out"), (out / "checkpoints", "out/checkpoints")):
        folder.chmod(0o555)
        try:
            result = subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / "c.yaml")],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                preexec_fn=_without_root_override(),
            )
        finally:
            folder.chmod(0o755)
        assert result.returncode == 1, result.stdout + result.stderr[-3000:]
        assert re.fullmatch(
            rf"error: output_dir: .*/{name} is not writable \(Permission denied\): give a folder "
            r"you can write \(--set output_dir=...\)\n",
            result.stderr,
        ), result.stderr[-3000:]


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        (BASE + "train: {optimizer: {lr: .nan}}\n", [], r"train.optimizer.lr must be a finite number"),
        (BASE, ["train.optimizer.lr=-1e-3"], r"train.optimizer.lr must be > 0; got -0.001"),
        (BASE, ["phases.2.lr=-0.5"], r"phases\[2\].lr must be > 0; got -0.5"),
        (BASE, ["phases.9.lr=1"], r"'9' is not an index of phases"),
        (BASE, ["data.batch_size.x=1"], r"data.batch_size is a single value"),
        ("output_dir: out\nmodels: [\n", [], r"c.yaml line 3 column 1: not valid YAML"),
        (BASE, ["output_dir=c.yaml"], r"output_dir: .*c.yaml is not a folder"),
    ],
)
def test_run_py_reports_configuration_errors_as_one_line(tmp_path, capsys, monkeypatch, text, overrides, match):
    """The trainer's entry point: exit 2 with one line naming the key, before any model loads."""
    from train import models, run

    monkeypatch.chdir(tmp_path)  # a guard, not a mock: the test fails if a model load is ever reached
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    monkeypatch.setattr(run, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--config", str(_write(tmp_path, text)), *[a for o in overrides for a in ("--set", o)]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(r"\S+: error: ", err) and re.search(match, err), err  # prog: run.py, or pytest's


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("--det-thresh", "nan", r"argument --det-thresh: must be a finite number \(in \(0, 1\]\); got nan"),
        ("--det-thresh", "1e-1x", r"argument --det-thresh: expected float \(a number\), got '1e-1x'"),
        ("--det-size", "100", r"argument --det-size: must be >= 32 and a multiple of 32; got 100"),
        ("--min-face", "-5", r"argument --min-face: must be >= 0; got -5"),
        ("--cluster-threshold", "1.5", r"argument --cluster-threshold: must be a cosine similarity in \[-1, 1\]"),
        ("--cluster-nprobe", "0", r"argument --cluster-nprobe: must be >= 1; got 0"),
        ("--shard-size", "0", r"argument --shard-size: must be >= 1; got 0"),
        ("--ray-actors", "-1", r"argument --ray-actors: must be >= 0; got -1"),
    ],
)
def test_prepare_number_arguments_are_range_checked(tmp_path, capsys, option, value, match):
    """prepare.py's numbers are read and range-checked like the config's, before any photo is read."""
    from train import prepare

    with pytest.raises(SystemExit) as exit_info:
        prepare.main(
            ["--images", str(tmp_path), "--out", str(tmp_path / "out"), "--antelopev2", str(tmp_path), option, value]
        )
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_prepare_accepts_numbers_written_as_in_the_config():
    from train.config import AT_LEAST_1, COSINE, number_arg

    assert number_arg(float, COSINE)("5e-1") == 0.5 and number_arg(int, AT_LEAST_1)("1e3") == 1000
