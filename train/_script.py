"""``python train/<name>.py``: a file run as a script becomes ``python -m train.<name>``.

Inside a ComfyUI install the project is not pip-installed, and Python puts ``train/`` itself first on the
import path of a script, where ``config.py`` or ``data/`` could stand for other packages. The command is
run again as the package module, with the pack's folder on ``PYTHONPATH``, so every module is imported
once, under its package name (``train.config``), and the import path is not edited at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_as_module(name: str) -> None:
    pack = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pack, os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", f"train.{name}", *sys.argv[1:]]
    if os.name == "posix":
        os.execve(sys.executable, argv, env)  # the same process: launchers' signals and exit status stay as they were
    raise SystemExit(subprocess.call(argv, env=env))
