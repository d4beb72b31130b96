"""Real multi-process runs: ``accelerate launch`` of a script in fresh interpreters, as users start training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def accelerate_launch(
    script: Path,
    *script_args: str,
    launch_args: tuple[str, ...] = ("--multi_gpu", "--num_processes", "2"),
    cpu: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``accelerate launch [launch_args] script script_args`` on one machine, no mixed precision, no dynamo;
    ``cpu``: DDP over gloo on the CPU (ACCELERATE_USE_CPU). The pack's folder is on PYTHONPATH."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if cpu:
        full_env["ACCELERATE_USE_CPU"] = "1"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", *launch_args, "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), *script_args]  # fmt: skip
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
