"""`make train-smoke`, README's training demo, from a fresh clone with no environment variables."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.needs import missing
from withanyone_core.checkpoints.reading import load_safetensors

ROOT = Path(__file__).resolve().parents[2]


def _fresh_clone(dest: Path) -> None:
    """The files a clone has (tracked, plus new files not ignored: the work being tested), no .cache."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.mark.slow
def test_make_train_smoke_from_a_fresh_clone_with_no_environment(tmp_path):
    """The Makefile's own commands (the venv step skipped with `make -o setup`: the test runs inside the
    installed venv) build the smoke set and train both smoke configs; a ${VAR} in a YAML comment stopped it."""
    if shutil.which("make") is None or shutil.which("git") is None:
        missing("needs make and git")
    clone = tmp_path / "clone"
    _fresh_clone(clone)
    assert not (clone / ".cache").exists()
    (clone / ".venv").symlink_to((ROOT / ".venv").resolve())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path))}
    result = subprocess.run(
        ["make", "-o", "setup", "train-smoke"], cwd=clone, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for run, steps in (("run", 12), ("run-multiid2m", 5)):
        out = clone / ".cache" / "smoke" / run
        rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, steps + 1)), run
        assert all(math.isfinite(v) for row in rows for k, v in row.items() if k.startswith("loss")), run
        adapter = load_safetensors(out / "checkpoints" / f"step-{steps}" / "withanyone.safetensors")
        assert adapter and all(t.isfinite().all() for t in adapter.values()), run
