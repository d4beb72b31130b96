"""Numbers stay finite, or the run stops: real tiny training runs (CPU) with non-finite losses and gradients.

A step whose loss or gradient is NaN/infinite is never applied (weights and optimizer state unchanged),
counted and named; a run of them in a row stops with a one-line error; no checkpoint holds a non-finite
tensor; ``losses.jsonl`` stays strict JSON Lines. (NaN *data* — a NaN embedding in a manifest or a shard —
is rejected by the data readers and tested with them; these tests make the training loop safe by itself.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.launch import accelerate_launch
from train import objective, run
from train.checkpointing import CheckpointError, verify_checkpoint
from train.smoke_data import build_smoke_set
from withanyone_core.checkpoints.reading import load_safetensors

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_set():
    return build_smoke_set(ROOT / ".cache" / "smoke")


def _reject_constant(name):
    raise ValueError(f"bare {name} in losses.jsonl")


def _strict_rows(out: Path) -> list[dict]:
    """losses.jsonl parsed as strict JSON: a bare NaN/Infinity fails here (Python's json accepts them)."""
    return [
        json.loads(line, parse_constant=_reject_constant) for line in (out / "losses.jsonl").read_text().splitlines()
    ]


def _train(out: Path, *overrides: str) -> None:
    run.main(["--config", str(SMOKE), "--set", f"output_dir={out}", *[a for o in overrides for a in ("--set", o)]])


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_safetensors(path).values() if t.is_floating_point())


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a gradient overflow with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_steps_are_skipped_and_never_applied(smoke_set, tmp_path, monkeypatch, caplog):
    """Step 5's loss is NaN, step 7's loss is finite but its gradient infinite. Neither is applied: the weights
    and the optimizer state after them equal those before them, the run goes on and finishes finite.

    Why a hook at the loss: finite tiny models on finite data do not produce NaN on demand, and NaN data
    never reaches the loop any more (the readers reject it). The hook wraps the real flow-matching loss of
    the real run at two chosen steps; everything else (backward, the check, optimizer, checkpoints) is real."""
    calls = []
    real_loss = objective.flow_matching_loss

    def poisoned(velocity, noise, clean):
        calls.append(1)
        if len(calls) == 5:
            return real_loss(velocity, noise, clean) * float("nan")
        if len(calls) == 7:
            return real_loss(_InfGradient.apply(velocity), noise, clean)
        return real_loss(velocity, noise, clean)

    monkeypatch.setattr(objective, "flow_matching_loss", poisoned)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        _train(out, "checkpoint.every=1", "checkpoint.keep=20", "sample.every=0")
    rows = _strict_rows(out)
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert rows[4]["skipped"] is True and rows[4]["loss/total"] is None and rows[4]["loss/flow"] is None
    assert "non-finite loss" in rows[4]["reason"] and "total" in rows[4]["reason"]
    assert rows[6]["skipped"] is True and rows[6]["reason"].startswith("non-finite gradient (first: adapter.")
    assert isinstance(rows[6]["loss/total"], float)  # the loss itself was finite
    for row in rows[:4] + [rows[5]] + rows[7:]:
        assert "skipped" not in row and all(isinstance(v, float) for k, v in row.items() if k.startswith("loss/"))

    ckpt = out / "checkpoints"
    adapters = {n: load_safetensors(ckpt / f"step-{n}" / "withanyone.safetensors") for n in (4, 5, 6, 7, 8)}
    optim = {
        n: torch.load(ckpt / f"step-{n}" / "accelerate" / "optimizer.bin", weights_only=True) for n in (4, 5, 6, 7)
    }
    for before, after in ((4, 5), (6, 7)):  # the skipped steps changed nothing
        assert all(torch.equal(adapters[before][k], adapters[after][k]) for k in adapters[before]), (before, after)
        assert optim[before]["state"].keys() == optim[after]["state"].keys()
        for key, state in optim[before]["state"].items():
            assert all(torch.equal(v, optim[after]["state"][key][name]) for name, v in state.items()), (before, key)
    for before, after in ((5, 6), (7, 8)):  # and the next steps trained again
        assert any(not torch.equal(adapters[before][k], adapters[after][k]) for k in adapters[before])
    for n in range(1, 13):
        verify_checkpoint(ckpt / f"step-{n}")  # every tensor of every checkpoint finite
    state = json.loads((ckpt / "step-12" / "trainer.json").read_text(), parse_constant=_reject_constant)
    assert state["nonfinite_steps"] == [5, 7] and state["nonfinite_in_row"] == 0
    assert "step 5 (phase recon-captions) skipped: non-finite loss" in caplog.text
    assert "2 step(s) skipped for a non-finite loss or gradient (never applied): steps 5, 7" in caplog.text


def test_a_run_of_nan_steps_stops_with_one_line_and_finite_checkpoints(smoke_set, tmp_path):
    """The issue's repro class: a NaN inside the models made every loss NaN, the run exited 0 and wrote an
    all-NaN adapter. Here a NaN in the frozen VAE's weights (a real file, a real CLI run): every step is
    skipped, the run stops after train.max_nonfinite_steps of them with one line and a non-zero exit, and
    the checkpoints written meanwhile hold the untouched, finite weights."""
    from safetensors.torch import save_file

    base = tmp_path / "tiny-flux"
    shutil.copytree(smoke_set / "tiny-flux", base)
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_safetensors(vae_file)
    vae["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(vae, str(vae_file))
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "run.py"),
            "--config",
            str(SMOKE),
            "--set",
            f"output_dir={out}",
            "--set",
            f"models.base={base}",
            "--set",
            "train.max_nonfinite_steps=3",
            "--set",
            "checkpoint.every=1",
            "--set",
            "sample.every=0",
            "--set",
            "tensorboard=false",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "stopped at step 3: 3 steps in a row had a non-finite loss" in errors[0]
    assert "train.max_nonfinite_steps=3" in errors[0]
    assert "The frozen model weight VAE encoder.conv_in.weight is not finite" in errors[0]  # the cause, named
    rows = _strict_rows(out)
    assert len(rows) == 3 and all(row["skipped"] and row["loss/total"] is None for row in rows)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-1", "step-2"]  # the stopping step writes none
    for name in steps:
        verify_checkpoint(out / "checkpoints" / name)
        assert _all_finite(out / "checkpoints" / name / "withanyone.safetensors")


def _nothing_written(out: Path) -> bool:
    return not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_checkpoint_with_a_nonfinite_tensor_is_never_written(smoke_set, tmp_path):
    """Weights and optimizer state are checked before anything is written; the error names the tensor."""
    from train.config import load_config

    out = tmp_path / "run"
    trainer = run.Trainer(load_config(SMOKE, [f"output_dir={out}", "tensorboard=false", "sample.every=0"]))
    active = trainer.schedule.at(0)
    trainer.step = 1
    weight = trainer.models.adapter.ipa_arc[0].to_q.weight
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(
        CheckpointError,
        match=r"step-1 not written: withanyone.safetensors ipa_arc.0.to_q.weight "
        r"is not finite",
    ):
        trainer.save(active)
    assert _nothing_written(out)
    with torch.no_grad():
        weight[0, 0] = 0.0

    for p in trainer.params:  # a real optimizer step creates the AdamW moments
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    inner = trainer.optimizer.optimizer
    first = trainer.params[0]
    inner.state[first]["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(
        CheckpointError,
        match=rf"optimizer state exp_avg_sq of {trainer.param_names[id(first)]} "
        r"is not finite",
    ):
        trainer.save(active)
    assert _nothing_written(out)
    inner.state[first]["exp_avg_sq"].view(-1)[0] = 0.0

    from train.checkpointing import save_checkpoint

    with pytest.raises(CheckpointError, match="trainer state holds a non-finite number"):
        save_checkpoint(trainer.accelerator, out, 1, trainer.models, {"step": 1, "loss": float("nan")}, None, 2)
    assert _nothing_written(out)

    trainer.save(active)  # finite again: written and verifiable
    verify_checkpoint(out / "checkpoints" / "step-1")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_nonfinite_steps_is_range_checked(value):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps must be >= 1; got -?\d"):
        load_config(SMOKE, [f"train.max_nonfinite_steps={value}"])


def test_every_rank_skips_together(smoke_set, tmp_path):
    """Two real processes (DDP over gloo): only rank 1's loss is NaN at step 2, and its gradient is finite
    (a constant NaN added to the loss), so DDP's gradient all-reduce carries nothing to rank 0. Both ranks
    must still skip: rank 0 stepping alone would split the weights. The hook is the only way to make one
    rank alone see a NaN in a real run; the rest is the real trainer."""
    script = tmp_path / "nan_on_rank_1.py"
    out = tmp_path / "ddp"
    script.write_text(
        "import sys, torch\n"
        "from train import objective, run\n"
        "from train.config import load_config\n"
        "real, calls = objective.flow_matching_loss, []\n"
        "def hooked(velocity, noise, clean):\n"
        "    calls.append(1)\n"
        "    loss = real(velocity, noise, clean)\n"
        "    return loss + float('nan') if trainer.accelerator.process_index == 1 and len(calls) == 2 else loss\n"
        "objective.flow_matching_loss = hooked\n"
        f"config = load_config({str(SMOKE)!r}, sys.argv[1:])\n"
        "trainer = run.Trainer(config)\n"
        "trainer.run()\n"
        "total = sum(float(p.detach().double().sum()) for p in trainer.params)\n"
        "print(f'rank {trainer.accelerator.process_index} weights {total!r}', flush=True)\n"
    )
    result = accelerate_launch(
        script,
        f"output_dir={out}",
        "sample.every=0",
        "tensorboard=false",
        "checkpoint.every=1",
        "checkpoint.keep=5",
        "phases=[{name: fit, steps: 3, prompt_mode: fixed, min_face_size: 32}]",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    weights = sorted(line.split(" weights ")[1] for line in result.stdout.splitlines() if " weights " in line)
    assert len(weights) == 2 and weights[0] == weights[1], result.stdout  # the ranks agree
    rows = _strict_rows(out)
    assert [row.get("skipped", False) for row in rows] == [False, True, False]
    assert rows[1]["reason"] == "non-finite loss or gradient on another process" and rows[1]["loss/total"] is None
    adapters = [load_safetensors(out / "checkpoints" / f"step-{n}" / "withanyone.safetensors") for n in (1, 2, 3)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # rank 0 did not step either
    assert any(not torch.equal(adapters[1][k], adapters[2][k]) for k in adapters[1])
