"""Resume survives a damaged checkpoint: real tiny runs (CPU) whose newest checkpoint is truncated, altered,
incomplete or holds a NaN. The run resumes from the newest intact one (bit-identical to a run never
interrupted), keeps the damaged folder aside as ``step-<N>.damaged``, and with none intact stops with
one line saying what to do; it never starts over from scratch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from train import run
from train.checkpointing import MARKER, DamagedCheckpoint, complete_checkpoints, verify_checkpoint
from train.smoke_data import build_smoke_set

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_set():
    return build_smoke_set(ROOT / ".cache" / "smoke")


def _train(out: Path, *overrides: str) -> None:
    run.main(
        [
            "--config",
            str(SMOKE),
            "--set",
            f"output_dir={out}",
            "--set",
            "sample.every=0",
            *[a for o in overrides for a in ("--set", o)],
        ]
    )


@pytest.fixture(scope="module")
def reference_run(smoke_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-damaged") / "run"
    _train(out)  # checkpoints step-8 and step-12
    return out


def _losses(out: Path) -> list[str]:
    return (out / "losses.jsonl").read_text().splitlines()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_same_size(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _refresh_sizes(folder: Path) -> None:
    """Record the files' present sizes in the marker: damage that happened before it was written (a NaN saved
    by an older trainer), so the content checks, not the size check, must find it."""
    marker = json.loads((folder / MARKER).read_text())
    marker["sizes"] = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    (folder / MARKER).write_text(json.dumps(marker))


def _old_marker(folder: Path) -> None:
    """A marker as checkpoints written before sizes were recorded have it."""
    marker = json.loads((folder / MARKER).read_text())
    del marker["sizes"]
    (folder / MARKER).write_text(json.dumps(marker))


def _nan_in_safetensors(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)


def _nan_in_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)


DAMAGE = {
    # truncated (disk full, interrupted copy): found by the sizes the marker records, nothing read
    "truncated adapter": (
        lambda f: _truncate(f / "withanyone.safetensors"),
        r"withanyone.safetensors is \d+ bytes, written as \d+",
    ),
    "truncated model": (
        lambda f: _truncate(f / "accelerate" / "model.safetensors"),
        r"accelerate/model.safetensors is \d+ bytes, written as \d+",
    ),
    "truncated optimizer": (
        lambda f: _truncate(f / "accelerate" / "optimizer.bin"),
        r"accelerate/optimizer.bin is \d+ bytes",
    ),
    "truncated trainer.json": (lambda f: _truncate(f / "trainer.json"), r"trainer.json is \d+ bytes"),
    "truncated RNG state": (
        lambda f: _truncate(f / "accelerate" / "random_states_0.pkl"),
        r"accelerate/random_states_0.pkl is \d+ bytes",
    ),
    "missing optimizer": (lambda f: (f / "accelerate" / "optimizer.bin").unlink(), r"optimizer.bin is missing"),
    "missing adapter": (lambda f: (f / "withanyone.safetensors").unlink(), r"withanyone.safetensors is missing"),
    # altered in place, same size: found by reading
    "garbled adapter header": (
        lambda f: _overwrite_same_size(f / "withanyone.safetensors", 8),
        r"withanyone.safetensors is not readable \(SafetensorError",
    ),
    "garbled trainer.json": (lambda f: _overwrite_same_size(f / "trainer.json"), r"trainer.json is not valid JSON"),
    "garbled marker": (lambda f: (f / MARKER).write_text("{not json"), r"COMPLETE is not valid JSON"),
    # written so by an older trainer: non-finite tensors or numbers
    "NaN in adapter": (
        lambda f: (_nan_in_safetensors(f / "withanyone.safetensors"), _refresh_sizes(f)),
        r"withanyone.safetensors: tensor \S+ is not finite",
    ),
    "NaN in model": (
        lambda f: (_nan_in_safetensors(f / "accelerate" / "model.safetensors"), _refresh_sizes(f)),
        r"accelerate/model.safetensors: tensor \S+ is not finite",
    ),
    "NaN in optimizer": (
        lambda f: (_nan_in_optimizer(f / "accelerate" / "optimizer.bin"), _refresh_sizes(f)),
        r"accelerate/optimizer.bin: tensor state.\d+.exp_avg is not finite",
    ),
    "NaN in trainer.json": (
        lambda f: (
            (f / "trainer.json").write_text(
                (f / "trainer.json").read_text().replace('"losses": {', '"losses": {"loss/x": NaN, ')
            ),
            _refresh_sizes(f),
        ),
        r"trainer.json is not valid JSON \(NaN is not a number JSON allows\)",
    ),
    "wrong step in trainer.json": (
        lambda f: (
            (f / "trainer.json").write_text((f / "trainer.json").read_text().replace('"step": 12', '"step": 7')),
            _refresh_sizes(f),
        ),
        r"trainer.json says step 7, the folder step 12",
    ),
    # checkpoints written before sizes were recorded: truncation found by reading
    "old marker, truncated optimizer": (
        lambda f: (_old_marker(f), _truncate(f / "accelerate" / "optimizer.bin")),
        r"accelerate/optimizer.bin is not readable",
    ),
    "old marker, truncated model": (
        lambda f: (_old_marker(f), _truncate(f / "accelerate" / "model.safetensors")),
        r"accelerate/model.safetensors is not readable",
    ),
    "old marker, truncated RNG state": (
        lambda f: (_old_marker(f), _truncate(f / "accelerate" / "random_states_0.pkl")),
        r"accelerate/random_states_0.pkl is not readable",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verification_names_each_kind_of_damage(reference_run, tmp_path, kind):
    folder = tmp_path / "step-12"
    shutil.copytree(reference_run / "checkpoints" / "step-12", folder)
    verify_checkpoint(folder)  # intact
    damage, reason = DAMAGE[kind]
    damage(folder)
    with pytest.raises(DamagedCheckpoint, match=reason) as info:
        verify_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_an_intact_checkpoint_with_an_old_marker_verifies(reference_run, tmp_path):
    folder = tmp_path / "step-12"
    shutil.copytree(reference_run / "checkpoints" / "step-12", folder)
    _old_marker(folder)
    verify_checkpoint(folder)


@pytest.mark.parametrize("damaged", ["accelerate/model.safetensors", "accelerate/optimizer.bin", "trainer.json"])
def test_resume_from_the_newest_intact_checkpoint(reference_run, tmp_path, caplog, damaged):
    """The issue's repro: a truncated model, optimizer or trainer.json in the newest checkpoint used to stop
    the resume with a raw SafetensorError / RuntimeError / JSONDecodeError."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ckpt = out / "checkpoints"
    _truncate(ckpt / "step-12" / damaged)
    with caplog.at_level(logging.INFO):
        _train(out, "checkpoint.keep=1")  # keep=1: the .damaged folder must not count, nor be pruned
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and f"checkpoint {ckpt / 'step-12'} is damaged: {damaged} is" in warnings[0]
    assert "kept aside as step-12.damaged" in warnings[0]
    assert f"resuming from {ckpt / 'step-8'}" in caplog.text
    assert _losses(out) == _losses(reference_run)  # as if never damaged: steps 9-12 again, bit-identical
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-12", "step-12.damaged"]
    verify_checkpoint(ckpt / "step-12")
    aside = ckpt / "step-12.damaged" / damaged  # kept as it was found
    assert aside.stat().st_size == (reference_run / "checkpoints" / "step-12" / damaged).stat().st_size // 2
    assert [s for s, _ in complete_checkpoints(out)] == [12]


def test_no_intact_checkpoint_stops_with_one_line_and_never_starts_over(reference_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ckpt = out / "checkpoints"
    _truncate(ckpt / "step-12" / "accelerate" / "optimizer.bin")
    (ckpt / "step-8" / "trainer.json").write_text("")
    losses = _losses(out)
    for attempt in ("first", "again"):
        caplog.clear()
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as info:
            _train(out)
        assert info.value.code == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert errors[0].startswith(f"no usable checkpoint in {ckpt}: ")
        assert "move" in errors[0] and "copy an intact step-<N> folder back" in errors[0]
        if attempt == "first":
            assert "step-12 (accelerate/optimizer.bin is" in errors[0] and "step-8 (trainer.json is" in errors[0]
        else:  # the rerun finds the folders set aside: still no training from scratch
            assert "set aside by an earlier resume (step-12.damaged, step-8.damaged)" in errors[0]
        assert sorted(p.name for p in ckpt.iterdir()) == ["step-12.damaged", "step-8.damaged"]
        assert _losses(out) == losses  # nothing trained, the loss log untouched
        assert "starting a new run" not in caplog.text


def test_a_damaged_folder_set_aside_before_gets_a_new_name(reference_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ckpt = out / "checkpoints"
    shutil.copytree(ckpt / "step-12", ckpt / "step-12.damaged")  # from an earlier resume
    (ckpt / "step-12" / "withanyone.safetensors").unlink()
    (ckpt / "step-8" / "withanyone.safetensors").unlink()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        _train(out)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-12.damaged", "step-12.damaged-2", "step-8.damaged"]
    assert not (ckpt / "step-12.damaged-2" / "withanyone.safetensors").exists()
