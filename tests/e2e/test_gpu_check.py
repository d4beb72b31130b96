"""The GPU check script (make gpu-check) runs end to end: without CUDA it says so; its benchmark code runs on the CPU
at a tiny size (--dry-run), so the script a lent GPU machine runs is the tested one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine make gpu-check runs the real check")
def test_without_cuda_it_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "no CUDA device" in result.stdout


@pytest.mark.slow
def test_dry_run_prints_the_ratio_lines():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "patched step" in result.stdout and "x the unpatched step" in result.stdout
