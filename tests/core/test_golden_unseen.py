"""tests/core/test_golden.py must pass on golden data of the same format that it has never seen.

The data is written by an independent re-statement of the reference model
(tests/support/reference_flux.py, itself checked against the authors' golden outputs in
test_reference_model.py): batch 2-3, 3 and 4 persons, overlapping, fractional and
partly-outside boxes, non-square sizes, another model size, SigLIP-only and
identity-free cases. The golden test runs in a subprocess pointed at that folder,
exactly as it would be run against new data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.make_golden import UNSEEN_CASES, UNSEEN_CONFIG, UNSEEN_MASKS, write_golden_set

TESTS = Path(__file__).resolve().parent


def _run_golden_test(golden_dir):
    """tests/core/test_golden.py in its own pytest process, discovering the sets in ``golden_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "test_golden.py"), "-q", "-p", "no:cacheprovider"],
        cwd=TESTS.parents[1],
        env={**os.environ, "WITHANYONE_GOLDEN_DIR": str(golden_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_golden_test_passes_on_unseen_data(tmp_path):
    write_golden_set(tmp_path, "withanyone_unseen", UNSEEN_CONFIG, UNSEEN_CASES, UNSEEN_MASKS, seed=7)
    result = _run_golden_test(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    expected = len(UNSEEN_CASES) + len(UNSEEN_MASKS) + 1
    assert re.search(rf"\b{expected} passed\b", result.stdout), result.stdout[-2000:]


def test_golden_test_fails_on_wrong_outputs(tmp_path):
    """The parity check is not vacuous: corrupt one expected output and it must fail."""
    from safetensors.torch import load_file, save_file

    cases = {"three_ids_overlapping_fractional": UNSEEN_CASES["three_ids_overlapping_fractional"]}
    write_golden_set(tmp_path, "withanyone_corrupt", UNSEEN_CONFIG, cases, {}, seed=3)
    path = tmp_path / "withanyone_corrupt_cases.safetensors"
    tensors = load_file(str(path))
    key = "three_ids_overlapping_fractional.output"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 5, 3] += 1e-3
    save_file(tensors, str(path))
    result = _run_golden_test(tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed" in result.stdout
