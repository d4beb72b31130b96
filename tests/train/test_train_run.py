"""The trainer end to end on the tiny model set (CPU): smoke run, resume, crashes, modes, losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support.launch import accelerate_launch
from train import run
from train.checkpointing import latest_checkpoint
from train.smoke_data import build_smoke_set
from withanyone_core.checkpoints.adapter_files import load_adapter
from withanyone_core.checkpoints.reading import load_safetensors, read_safetensors_metadata

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_set():
    return build_smoke_set(ROOT / ".cache" / "smoke")


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def _train(out: Path, *overrides: str) -> None:
    run.main(["--config", str(SMOKE), "--set", f"output_dir={out}", *[a for o in overrides for a in ("--set", o)]])


@pytest.fixture(scope="session")
def reference_run(smoke_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    _train(out)
    return out


def test_smoke_run_writes_checkpoints_samples_and_logs(reference_run):
    out = reference_run
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert steps == [8, 12]  # every 4 steps, keep the last 2
    ckpt = out / "checkpoints" / "step-12"
    adapter = load_adapter(ckpt / "withanyone.safetensors")  # the official key layout
    assert adapter.config.num_double_blocks == 1 and adapter.config.siglip_dim == 32
    assert read_safetensors_metadata(ckpt / "withanyone.safetensors")["branch"] == "both"
    assert (out / "samples" / "step-000008.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    phases = [row["phase"] for row in _losses(out)]
    assert phases == ["recon-fixed-prompt"] * 3 + ["recon-captions"] * 3 + ["paired"] * 3 + ["quality"] * 3
    paired = [row for row in _losses(out) if row["phase"] == "paired"]
    assert all("loss/id" in row and "loss/contrastive" in row for row in paired)
    # recon-captions: faces detected on the prediction; the random tiny model draws none, so no face counts
    detected = [row for row in _losses(out) if row["phase"] == "recon-captions"]
    assert all(row["loss/id"] == 0.0 and row["loss/contrastive"] == 0.0 for row in detected)
    assert not any("loss/id" in row for row in _losses(out) if row["phase"] in ("recon-fixed-prompt", "quality"))
    # warm-up over 2 steps, then 1e-3; the quality phase's 5e-4 from its first step (step 10)
    assert [row["lr"] for row in _losses(out)] == pytest.approx([5e-4] + [1e-3] * 8 + [5e-4] * 3)


def test_resume_is_bit_identical(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "checkpoints" / "step-12")  # as if killed after step 8's checkpoint
    _train(out)
    assert _losses(out) == _losses(reference_run)


def test_kill_9_mid_run_and_partial_checkpoints_never_break_resume(reference_run, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "train" / "run.py"),
        "--config",
        str(SMOKE),
        "--set",
        f"output_dir={out}",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=3",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and latest_checkpoint(out) is None:  # wait until saving has begun
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # debris of saves that never finished: a temp folder and a step folder without its marker
    (out / "checkpoints" / ".tmp-step-99").mkdir(parents=True, exist_ok=True)
    broken = out / "checkpoints" / "step-98"
    broken.mkdir(exist_ok=True)
    (broken / "withanyone.safetensors").write_bytes(b"truncated")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert not (out / "checkpoints" / ".tmp-step-99").exists() and not broken.exists()
    assert _losses(out) == _losses(reference_run)  # same losses as never interrupted


@pytest.mark.parametrize(
    "mode,branch",
    [("adapter", "both"), ("adapter", "arcface"), ("adapter", "siglip"), ("lora", "both"), ("full", "both")],
)
def test_each_mode_trains_exactly_its_parameters(smoke_set, tmp_path, mode, branch):
    from train.config import load_config
    from train.models import BRANCH_PREFIXES, load_models, set_trainable

    config = load_config(
        SMOKE, [f"output_dir={tmp_path}", f"train.mode={mode}", "train.lora.rank=4", f"train.branch={branch}"]
    )
    models = load_models(config)
    params = set_trainable(models, mode, config.train.lora, branch)
    names = {n for n, p in models.denoiser.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in models.denoiser.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights
    adapter_names = {
        "adapter." + n for n, _ in models.adapter.named_parameters() if n.startswith(BRANCH_PREFIXES[branch])
    }
    assert (models.siglip is None) == (branch == "arcface")  # the ArcFace branch never loads SigLIP
    transformer_names = {n for n, _ in models.denoiser.named_parameters() if n.startswith("transformer.")}
    if mode == "adapter":
        assert names == adapter_names
    elif mode == "lora":
        lora = {n for n in transformer_names if ".lora_" in n}
        assert lora and names == adapter_names | lora
        assert any(".attn.to_q.lora_A" in n for n in lora) and any("ff.net.2.lora_B" in n for n in lora)
    else:
        assert names == adapter_names | transformer_names
    assert all(not p.requires_grad for p in models.vae.parameters())


def test_lora_checkpoint_is_comfyui_format_and_only_trainables_change(smoke_set, tmp_path):
    out = tmp_path / "lora"
    _train(
        out,
        "train.mode=lora",
        "train.lora.rank=4",
        "phases.0.steps=2",
        "phases.1.steps=1",
        "phases.2.steps=1",
        "phases.3.steps=1",
        "checkpoint.every=5",
        "sample.every=0",
    )
    ckpt = out / "checkpoints" / "step-5"
    lora = load_safetensors(ckpt / "lora.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in lora
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in lora
    assert float(lora["transformer.transformer_blocks.0.attn.to_q.alpha"]) == 16.0
    assert lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 4
    base = load_safetensors(smoke_set / "tiny-flux" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_safetensors(ckpt / "accelerate" / "model.safetensors")
    for name, value in base.items():  # the frozen base weights are untouched
        key = "transformer." + name
        key = (
            key if key in trained else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(trained[key], value), name


def test_id_loss_gradient_and_gate(smoke_set, tmp_path, monkeypatch, caplog):
    from train.config import load_config

    config = load_config(SMOKE, [f"output_dir={tmp_path}", "tensorboard=false"])
    with caplog.at_level("INFO", logger="withanyone.train"):
        trainer = run.Trainer(config)
    assert "estimated memory per process" in caplog.text and trainer.memory_estimate.total > 0
    assert f"models.base = {smoke_set / 'tiny-flux'}" in caplog.text  # each resolved path, once
    assert caplog.text.count("models.base = ") == 1
    with torch.no_grad():  # a trained adapter: non-zero output projections
        for block in list(trainer.models.adapter.ipa_arc) + list(trainer.models.adapter.ipa_sig):
            block.to_out.weight.normal_(0, 0.05)
    trainer._enter_phase(trainer.schedule.at(6))  # the paired phase uses the ID losses
    batch = trainer._next_batch()
    phase = trainer.schedule.at(6).phase
    decodes = []
    original = trainer.models.vae.decode
    monkeypatch.setattr(trainer.models.vae, "decode", lambda *a, **k: decodes.append(1) or original(*a, **k))

    open_gate = phase.__class__(**{**phase.__dict__, "id_gate": 1.0, "loss": phase.loss.__class__(0.0, 1.0, 0.0)})
    losses = trainer.objective(batch, open_gate, torch.Generator().manual_seed(0))
    losses["total"].backward()
    grads = [p.grad for p in trainer.params if p.grad is not None and p.grad.abs().sum() > 0]
    assert losses["id"] > 0 and len(grads) > 0 and decodes
    trainer.optimizer.zero_grad(set_to_none=True)

    decodes.clear()
    closed = phase.__class__(**{**phase.__dict__, "id_gate": 0.0, "loss": phase.loss.__class__(0.0, 1.0, 1.0)})
    losses = trainer.objective(batch, closed, torch.Generator().manual_seed(0))
    assert "id" not in losses and "contrastive" not in losses and not decodes  # no decode at all above the gate


def test_loss_falls_on_synthetic_data(smoke_set, tmp_path):
    out = tmp_path / "fit"
    _train(
        out,
        "train.mode=full",
        "phases=[{name: fit, steps: 40, prompt_mode: fixed, min_face_size: 32}]",
        "checkpoint.every=40",
        "sample.every=0",
        "train.optimizer.lr=3.0e-4",
        "data.batch_size=4",
    )
    flow = [row["loss/flow"] for row in _losses(out)]
    assert sum(flow[-10:]) / 10 < 0.8 * sum(flow[:10]) / 10


def _launch(
    out: Path, *launch_args: str, cpu_ddp: bool = False, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    overrides = [a for o in ("sample.every=0", *extra) for a in ("--set", o)]
    return accelerate_launch(
        ROOT / "train" / "run.py", "--config", str(SMOKE), "--set", f"output_dir={out}", *overrides,
        launch_args=launch_args, cpu=cpu_ddp,
    )  # fmt: skip


def test_two_process_accelerate_run(smoke_set, reference_run, tmp_path):
    """Two real processes, DDP over gloo on the CPU: torchrun's launcher (--multi_gpu) with
    ACCELERATE_USE_CPU=1. (accelerate's --cpu launcher starts a single process unless MPI is
    installed; that command is checked in test_cpu_launch_command.)"""
    out = tmp_path / "ddp"
    # both ranks cache the same fixed prompts at the same steps (a shared temporary name used to collide)
    cache = (f"data.text_cache={tmp_path / 'text-cache'}",)
    result = _launch(out, "--multi_gpu", "--num_processes", "2", cpu_ddp=True, extra=cache)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "text-cache").glob("*.safetensors"))) >= 3 and not list(
        (tmp_path / "text-cache").glob("*.tmp")
    )
    # one scheduler step per optimizer step whatever the process count, each phase's lr from its first step
    assert [row["lr"] for row in _losses(out)] == [row["lr"] for row in _losses(reference_run)]
    state = sorted((out / "checkpoints" / "step-12" / "accelerate").glob("random_states_*.pkl"))
    assert [p.name for p in state] == ["random_states_0.pkl", "random_states_1.pkl"]  # every rank's state
    assert any("loss/contrastive" in row for row in _losses(out))
    assert len(_losses(out)) == 12
    assert _losses(out) != _losses(reference_run)  # each rank saw half the batches: a different run
    shutil.rmtree(out / "checkpoints" / "step-12")
    uninterrupted = _losses(out)
    resumed = _launch(out, "--multi_gpu", "--num_processes", "2", cpu_ddp=True, extra=cache)  # every rank's state
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert _losses(out) == uninterrupted  # DataLoader workers on both ranks: the resumed steps are bit-identical


def test_cpu_launch_command(smoke_set, reference_run, tmp_path):
    out = tmp_path / "cpu"
    result = _launch(out, "--cpu", "--num_processes", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert latest_checkpoint(out)[0] == 12


def test_misconfigured_multi_process_launch_is_refused(smoke_set, tmp_path):
    result = _launch(tmp_path / "bad", "--multi_gpu", "--num_processes", "2")
    assert result.returncode != 0 and "ACCELERATE_USE_CPU=1" in result.stderr


PAIRED_ONLY = (
    "phases=[{name: paired, steps: 3, paired_ratio: 0.5, min_face_size: 32, "
    "loss: {flow: 1.0, id: 0.1, contrastive: 0.1}, id_gate: 1.0, negatives: 8}]"
)


def test_gradient_checkpointing_and_bf16(smoke_set, tmp_path, monkeypatch):
    """Gradient checkpointing recomputes the blocks (it is really on) and changes no loss; bf16
    autocast trains with finite losses close to fp32's. All three runs use the ID losses."""
    import torch.utils.checkpoint

    common = ("train.mode=lora", PAIRED_ONLY, "checkpoint.every=3", "sample.every=0")
    _train(tmp_path / "plain", *common)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    _train(tmp_path / "checkpointed", *common, "train.gradient_checkpointing=true")
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", original)
    assert calls  # the transformer's blocks went through torch.utils.checkpoint
    plain, checkpointed = _losses(tmp_path / "plain"), _losses(tmp_path / "checkpointed")
    assert len(plain) == 3 and all("loss/id" in row for row in plain)
    for a, b in zip(plain, checkpointed):
        for key in ("loss/flow", "loss/id", "loss/contrastive"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)

    # accelerate fixes the precision once per process: a fresh one, as a user would run it
    args = [a for o in (*common, "train.mixed_precision=bf16", f"output_dir={tmp_path / 'bf16'}") for a in ("--set", o)]
    subprocess.run(
        [sys.executable, str(ROOT / "train" / "run.py"), "--config", str(SMOKE), *args],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    bf16 = _losses(tmp_path / "bf16")
    assert len(bf16) == 3
    first, first_bf16 = plain[0], bf16[0]  # same weights and batch: only the precision differs
    for key in ("loss/flow", "loss/id", "loss/contrastive"):
        assert torch.isfinite(torch.tensor([row[key] for row in bf16])).all()
        assert abs(first_bf16[key] - first[key]) <= 0.05 * abs(first[key]) + 1e-3, (key, first, first_bf16)


def test_wrong_paths_fail_fast_naming_key_and_path(smoke_set, tmp_path):
    """A missing model folder is an error naming the key and the path, never a Hugging Face hub request;
    a smoke run before the smoke set exists says how to build it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "no-such-flux"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "run.py"),
            "--config",
            str(SMOKE),
            "--set",
            f"models.base={missing}",
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"models.base: {missing} does not exist" in result.stderr and "make train-smoke" in result.stderr
    assert "huggingface" not in result.stderr.lower() and "connect" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_branches_train_separately_and_merge(smoke_set, tmp_path):
    """The authors' way: the ArcFace and the SigLIP branch in separate runs, merged into one file."""
    from train import merge

    one_phase = "phases=[{name: fit, steps: 2, prompt_mode: fixed, min_face_size: 32}]"
    for branch in ("arcface", "siglip"):
        _train(
            tmp_path / branch,
            f"train.branch={branch}",
            one_phase,
            "checkpoint.every=1",
            "sample.every=0",
            "tensorboard=false",
        )
    files = {b: tmp_path / b / "checkpoints" / "step-2" / "withanyone.safetensors" for b in ("arcface", "siglip")}
    first = load_safetensors(tmp_path / "arcface" / "checkpoints" / "step-1" / "withanyone.safetensors")
    arc, sig = load_safetensors(files["arcface"]), load_safetensors(files["siglip"])
    assert not torch.equal(first["ipa_arc.0.to_q.weight"], arc["ipa_arc.0.to_q.weight"])  # the ArcFace branch trains
    assert all(torch.equal(first[k], arc[k]) for k in arc if k.startswith(("ipa_sig.", "siglip_in_sig.")))
    out = merge.main(
        [
            "--arcface",
            str(files["arcface"]),
            "--siglip",
            str(files["siglip"]),
            "--out",
            str(tmp_path / "withanyone.safetensors"),
            "--dtype",
            "fp32",
        ]
    )
    merged = load_safetensors(out)
    assert set(merged) == set(arc)
    for key, value in merged.items():
        assert torch.equal(value, (arc if key.startswith(("ipa_arc.", "arcface_in_arc.")) else sig)[key]), key
    load_adapter(out)  # loads as one adapter
    with pytest.raises(SystemExit):  # a SigLIP-branch file passed as the ArcFace branch
        merge.main(["--arcface", str(files["siglip"]), "--siglip", str(files["siglip"]), "--out", str(out)])


def test_detected_faces_are_matched_to_the_gt_boxes(smoke_set):
    """The non-GT-aligned ID loss: antelopev2's detector runs on the (decoded) image, faces are put in the
    GT boxes' order by IoU, and an image with a face missing leaves the ID losses."""
    from train.losses import detected_landmarks
    from withanyone_core.faces import FaceAnalyzer
    from withanyone_core.testing.faces import make_face_image

    detector = FaceAnalyzer(smoke_set / "insightface", providers="cpu")
    image, boxes, marks = make_face_image([(4, 6), (14, 7)], identities=[0, 1], seed=3)
    one_face, _, _ = make_face_image([(4, 6)], identities=[0], seed=4)
    images = torch.from_numpy(np.stack([image, one_face])).permute(0, 3, 1, 2).float() / 255
    gt = torch.from_numpy(np.stack([boxes[::-1], boxes[::-1]]).copy()) + 3.0  # GT in the other order, a bit off
    landmarks, found = detected_landmarks(images, gt, detector)
    assert found.tolist() == [True, False]
    assert torch.allclose(landmarks[0], torch.from_numpy(marks[::-1].copy()), atol=1.0)


def test_a_phase_without_usable_items_stops_with_the_reason(smoke_set, tmp_path):
    """The authors skip an item without a good paired reference; when no item qualifies the run stops and says why."""
    phases = "phases=[{name: strict, steps: 2, paired_ratio: 1.0, paired_min_similarity: 1.0, min_face_size: 32}]"
    with pytest.raises(RuntimeError, match="no usable item .*paired_no_similar_reference.*paired_fallback: self"):
        _train(tmp_path / "strict", phases, "data.num_workers=0", "sample.every=0", "tensorboard=false")


def test_a_failure_on_the_main_process_stops_every_rank(tmp_path):
    """Two real processes (gloo): what only the main process does (indexing references, detecting landmarks,
    the negative pool) fails there; the other rank must stop with its message, not wait at a barrier."""
    script = tmp_path / "fails_on_main.py"
    script.write_text(
        "import sys\n"
        "from accelerate import Accelerator\n"
        "from train.run import main_process_first\n"
        "acc = Accelerator(cpu=True)\n"
        "def work():\n"
        "    raise OSError('re_000003.tar: unexpected end of data')\n"
        "try:\n"
        "    main_process_first(acc, work, 'indexing the references')\n"
        "except Exception as exc:\n"
        "    print(f'rank {acc.process_index} stopped: {exc}', flush=True)\n"
        "    sys.exit(3)\n"
        "print(f'rank {acc.process_index} went on', flush=True)\n"
    )
    result = accelerate_launch(script, timeout=300)
    assert result.returncode != 0
    assert "rank 0 stopped: re_000003.tar: unexpected end of data" in result.stdout, (
        result.stdout + result.stderr[-3000:]
    )
    assert (
        "rank 1 stopped: the main process failed while indexing the references: OSError: re_000003.tar" in result.stdout
    ), result.stdout + result.stderr[-3000:]
    assert "went on" not in result.stdout
