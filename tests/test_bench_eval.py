"""The MultiID-Bench evaluation CLI on a folder of samples built with the tiny detector."""

import json

import numpy as np
import pytest
from PIL import Image

from withanyone_core import bench_eval
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image


def _save(path, image):
    Image.fromarray(image).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(image).save(path)


def test_cli_scores_samples_and_sanity_rows(tmp_path):
    models = tmp_path / "insightface"
    build_tiny_antelopev2(models)
    bench = tmp_path / "bench"
    # sample "gt": the output is the ground truth itself -> Sim(GT) = 1, CP = -1
    # sample "copy": the output is the references' faces -> CP = +1
    cells = [(5, 6), (13, 8)]
    ground_truth = make_face_image(cells, identities=[1, 2], seed=3)[0]
    for name, out in (("gt", ground_truth), ("copy", make_face_image(cells[::-1], identities=[12, 11], seed=4)[0])):
        folder = bench / name
        folder.mkdir(parents=True)
        _save(folder / "ori.png", ground_truth)
        _save(folder / "out.png", out)
        for k, ident in enumerate([11, 12], 1):
            _save(folder / f"ref_{k}.png", make_face_image([(9, 9)], identities=[ident], seed=10 + k)[0])
        (folder / "meta.json").write_text(json.dumps({"prompt": "two people"}))
    (bench / "broken").mkdir()
    _save(bench / "broken" / "out.png", make_face_image([(5, 5)])[0])
    _save(bench / "broken" / "ref_1.png", np.full((100, 100, 3), 90, np.uint8))

    summary = bench_eval.main([str(bench), "--antelopev2", str(models), "--providers", "cpu"])
    gt = json.loads((bench / "gt" / "metrics.json").read_text())
    copy = json.loads((bench / "copy" / "metrics.json").read_text())
    assert gt["sim_gt"] == pytest.approx(1.0, abs=1e-4) and gt["cp"] == pytest.approx(-1.0, abs=1e-3)
    # the copy sample's faces sit on another background, which the aligned crop partly sees
    assert copy["sim_ref"] == pytest.approx(1.0, abs=2e-3) and copy["cp"] == pytest.approx(1.0, abs=0.05)
    assert gt["prompt"] == "two people"
    assert summary["scored"] == 2 and "broken" in summary["failed"] and "no face" in summary["failed"]["broken"]
    assert json.loads((bench / "summary.json").read_text())["samples"] == 3
