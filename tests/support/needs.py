"""What a test needs from outside the repository (a browser, a package installed on demand, data beside the
checkout): where it is missing, CI fails the test and a developer's machine skips it with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def missing(message: str) -> None:
    """Stop the test for a missing part: a failure in CI (``CI`` set), a skip elsewhere."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(message)


def pip_install_into(target: Path, *requirements: str, upgrade: bool = False) -> str | None:
    """``pip install --no-deps --target target requirements``, outside the venv's own packages. Returns None when
    pip succeeded, else the end of what pip said (for :func:`missing`)."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *(["--upgrade"] if upgrade else [])]
    done = subprocess.run([*command, "--target", str(target), *requirements], capture_output=True, text=True)
    return (done.stderr[-500:] or f"pip exited {done.returncode}") if done.returncode else None
