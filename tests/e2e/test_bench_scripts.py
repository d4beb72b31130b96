"""Every benchmark script and the GPU check start: each puts its own folders on sys.path and imports the tests'
helpers and runners by name, so a moved helper breaks them without breaking any test (bench_precision.py did,
when the golden tests moved to tests/e2e/). ``--help`` imports everything a run imports and stops before any
work; one process runs them all (torch is imported once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*(ROOT / "tests" / "bench").glob("bench_*.py"), ROOT / "tests" / "gpu" / "gpu_check.py"])

_START_EACH = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    path = list(sys.path)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        results[script] = "ran past --help"
    except SystemExit as done:
        results[script] = "ok" if done.code in (0, None) and "usage:" in out.getvalue() else f"exit {done.code}"
    except Exception as error:
        results[script] = f"{type(error).__name__}: {error}"
    sys.path[:] = path
print(json.dumps(results))
"""


def test_every_benchmark_script_starts():
    assert len(SCRIPTS) >= 7  # the six benchmarks and the GPU check
    done = subprocess.run(
        [sys.executable, "-c", _START_EACH, *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {Path(script).name: result for script, result in results.items() if result != "ok"}
    assert not failed, failed
