"""Training on MultiID-2M-layout shards: the smoke config end to end, and a resume mid-stream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.launch import accelerate_launch
from train import run
from train.config import ConfigError, load_config
from train.smoke_data import build_smoke_set

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "train" / "configs" / "smoke-multiid2m.yaml"


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory, monkeypatch_module):
    root = build_smoke_set(ROOT / ".cache" / "smoke")  # the fixture test_train_run.py uses, plus its shards
    out = tmp_path_factory.mktemp("multiid2m") / "run"
    monkeypatch_module.setenv("WITHANYONE_SHARDS", str(root / "multiid2m" / "train" / "re_*.tar"))
    run.main(["--config", str(CONFIG), "--set", f"output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_trains_on_shards_with_gt_aligned_id_losses(shards_run):
    rows = _losses(shards_run)
    assert [r["phase"] for r in rows] == ["recon"] * 2 + ["id-losses"] * 3
    assert all("loss/id" in r and "loss/contrastive" in r for r in rows[2:])
    assert sorted(p.name for p in (shards_run / "checkpoints").iterdir()) == ["step-4", "step-5"]
    state = json.loads((shards_run / "checkpoints" / "step-4" / "trainer.json").read_text())
    assert state["stream"] == {"batches": 2, "workers": 2, "world": 1}  # the stream position is checkpointed
    assert (shards_run / "samples" / "step-000004.png").is_file()


def test_resume_mid_stream_is_bit_identical(shards_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(shards_run, out)
    shutil.rmtree(out / "checkpoints" / "step-5")  # as if killed after step 4, mid-phase
    run.main(["--config", str(CONFIG), "--set", f"output_dir={out}"])
    assert _losses(out) == _losses(shards_run)
    with pytest.raises(RuntimeError, match="saved with 1 process.*x 2 DataLoader worker"):
        shutil.rmtree(out / "checkpoints" / "step-5")
        run.main(["--config", str(CONFIG), "--set", f"output_dir={out}", "--set", "data.num_workers=1"])


def test_data_source_section_is_strict(shards_run, tmp_path):
    base = ["output_dir=" + str(tmp_path)]
    with pytest.raises(ConfigError, match="data.source must be one of manifest, multiid2m, mix"):
        load_config(CONFIG, base + ["data.source=tars"])
    with pytest.raises(ConfigError, match="data.source=mix needs data.manifest"):
        load_config(CONFIG, base + ["data.source=mix"])
    with pytest.raises(ConfigError, match=r"data.multiid2m: unknown key\(s\) \['shard'\]"):
        load_config(CONFIG, base + ["data.multiid2m.shard=x"])
    with pytest.raises(ConfigError, match="data.mix must be two non-negative weights"):
        load_config(CONFIG, base + ["data.mix=[1.0, -1.0]"])
    config = load_config(CONFIG, base + [f"data.multiid2m.shards={tmp_path}/none_*.tar"])
    from train.config import check_paths

    with pytest.raises(ConfigError, match="data.multiid2m.shards: no .tar shard matches"):
        check_paths(config)


def test_mix_of_manifest_and_shards_trains_on_both(shards_run, tmp_path, caplog):
    import logging

    root = ROOT / ".cache" / "smoke"
    caplog.set_level(logging.INFO)
    run.main(
        [
            "--config",
            str(CONFIG),
            "--set",
            f"output_dir={tmp_path / 'mix'}",
            "--set",
            "data.source=mix",
            "--set",
            f"data.manifest={root / 'data' / 'manifest.jsonl'}",
            "--set",
            "data.mix=[1.0, 1.0]",
            "--set",
            "phases.1.steps=6",
            "--set",
            "sample.every=0",
            "--set",
            f"data.multiid2m.landmarks={tmp_path / 'landmarks'}",
        ]
    )
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: "))
    assert "batches_from_manifest" in summary and "batches_from_multiid2m" in summary
    # an empty landmark cache: the trainer detected the GT faces' landmarks before training
    assert len(list((tmp_path / "landmarks").glob("*.landmarks.json"))) == 5
    assert "detected GT landmarks of 5 shard(s)" in caplog.text and "no_gt_landmarks" not in summary
    assert len(_losses(tmp_path / "mix")) == 8


def test_gt_landmarks_detected_once_match_the_prepared_ones(shards_run, tmp_path):
    """The release has no landmarks: detected on the GT faces with antelopev2 (here the tiny one)."""
    import numpy as np

    from train.data.multiid2m import detect_landmarks, expand_shards, load_landmarks
    from withanyone_core.faces import FaceAnalyzer

    root = ROOT / ".cache" / "smoke"
    shards = expand_shards(str(root / "multiid2m" / "train" / "re_*.tar"))[:1]
    detector = FaceAnalyzer(root / "insightface", providers="cpu")
    assert detect_landmarks(shards, tmp_path, detector) == 1
    assert detect_landmarks(shards, tmp_path, detector) == 0  # cached: detected once
    detected, prepared = load_landmarks(shards, tmp_path), load_landmarks(shards, root / "multiid2m" / "landmarks")
    assert detected.keys() == prepared.keys() and detected
    for key, rows in detected.items():
        assert all(r is not None for r in rows)
        np.testing.assert_allclose(rows, prepared[key], atol=3.0)  # JPEG re-encoding moves them a little


def test_two_process_run_on_shards_resumes_bit_identically(shards_run, tmp_path):
    """Two real processes (DDP over gloo on the CPU) x 2 DataLoader workers: 4 stream slots over 5 shards."""

    def launch(out):
        shards = str(ROOT / ".cache" / "smoke" / "multiid2m" / "train" / "re_*.tar")
        return accelerate_launch(
            ROOT / "train" / "run.py", "--config", str(CONFIG), "--set", f"output_dir={out}",
            "--set", "sample.every=0", env={"WITHANYONE_SHARDS": shards}, timeout=600,
        )  # fmt: skip

    out = tmp_path / "ddp"
    result = launch(out)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoints" / "step-4" / "trainer.json").read_text())
    assert state["stream"] == {"batches": 2, "workers": 2, "world": 2}
    uninterrupted = _losses(out)
    assert len(uninterrupted) == 5 and uninterrupted != _losses(shards_run)  # each rank streams its own shards
    shutil.rmtree(out / "checkpoints" / "step-5")
    resumed = launch(out)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert _losses(out) == uninterrupted
