"""The MultiID-Bench evaluation CLI on folders of samples built for the tiny detector (the folders and the
reference photos: tests/support/bench_samples.py)."""

import csv
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from support.bench_samples import reference_photo, write_sample
from withanyone_core import bench_eval
from withanyone_core.bench.report import load_paper_points
from withanyone_core.bench.tiny import build_random_inception, build_tiny_aesthetic, build_tiny_clip
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    insightface = root / "insightface"
    ante = build_tiny_antelopev2(insightface)
    buffalo = insightface / "models" / "buffalo_l"  # the same stand-ins under buffalo_l's file names
    buffalo.mkdir(parents=True)
    shutil.copy(ante / "scrfd_10g_bnkps.onnx", buffalo / "det_10g.onnx")
    shutil.copy(ante / "glintr100.onnx", buffalo / "w600k_r50.onnx")
    clip = build_tiny_clip(root / "clip")
    encoder, head = build_tiny_aesthetic(root / "siglip", root / "aesthetic_predictor_v2_5.safetensors")
    inception = build_random_inception(root / "pt_inception-2015-12-05-6726825d.safetensors")
    return {"insightface": insightface, "clip": clip, "encoder": encoder, "head": head, "inception": inception}


@pytest.fixture()
def bench(tmp_path):
    root = tmp_path / "ours"
    cells = [(5, 6), (13, 8)]
    truth = make_face_image(cells, identities=[1, 2], seed=3)[0]
    refs = [reference_photo(11, 21), reference_photo(12, 22)]
    # "gt": the output is the ground truth itself -> Sim(GT) 1, CP -1 (faces listed in any order)
    write_sample(root, "gt", truth, truth, refs)
    # "copy": the output shows the references' faces -> CP about +1
    write_sample(root, "copy", make_face_image(cells[::-1], identities=[12, 11], seed=4)[0], truth, refs)
    # "swapped": the gt sample with the persons listed in the other order (0-based names, the authors')
    write_sample(root, "swapped", truth, truth, refs[::-1], first=0)
    single_truth = make_face_image([(7, 7)], identities=[3], seed=5)[0]
    write_sample(root, "single", single_truth, single_truth, [reference_photo(13, 23)], prompt="one person")
    write_sample(
        root,
        "single_copy",
        make_face_image([(8, 6)], identities=[13], seed=6)[0],
        single_truth,
        [reference_photo(13, 23)],
        prompt="one person",
    )
    # "broken": the reference has no face -> reported, left out of every metric
    write_sample(root, "broken", truth, truth, [np.full((100, 100, 3), 90, np.uint8)])
    bad_meta = write_sample(root, "bad_meta", truth, truth, refs)
    (bad_meta / "meta.json").write_text("{not json")
    return root


def _record(root, name):
    return json.loads((root / name / "metrics.json").read_text())


def test_cli_scores_samples_tables_figure_and_resumes(bench, models, tmp_path, caplog):
    args = [
        str(bench),
        "--insightface",
        str(models["insightface"]),
        "--providers",
        "cpu",
        "--no-progress",
        "--clip",
        str(models["clip"]),
        "--aesthetic-encoder",
        str(models["encoder"]),
        "--aesthetic-head",
        str(models["head"]),
        "--fid-weights",
        str(models["inception"]),
        "--fid-form",
        "authors",
        "--device",
        "cpu",
    ]
    report = bench_eval.main(args)
    arc = {name: _record(bench, name)["face_models"]["arcface"] for name in ("gt", "copy", "swapped", "single")}
    assert arc["gt"]["sim_gt"] == pytest.approx(1.0, abs=1e-4) and arc["gt"]["cp"] == pytest.approx(-1.0, abs=1e-3)
    # the copy sample's faces sit on another background, which the aligned crop partly sees
    assert arc["copy"]["sim_ref"] == pytest.approx(1.0, abs=2e-3) and arc["copy"]["cp"] == pytest.approx(1.0, abs=0.05)
    for key in ("sim_gt", "sim_ref", "cp", "off_gt", "off_ref"):  # person order does not matter
        assert arc["swapped"][key] == pytest.approx(arc["gt"][key], abs=1e-6), key
    assert arc["single"]["off_ref"] == 0.0 and arc["gt"]["off_ref"] is not None
    gt = _record(bench, "gt")
    assert gt["status"] == "ok" and gt["prompt"] == "two people" and -1 <= gt["clip_t"] <= 1
    assert gt["clip_i"] == pytest.approx(1.0, abs=1e-5)  # CLIP-I of the ground truth with itself
    assert np.isfinite(gt["aesthetic"])
    broken = _record(bench, "broken")
    assert broken["status"] == "failed" and "no face found in reference(s) [1]" in broken["error"]
    assert "bad_meta/meta.json is not valid JSON" in _record(bench, "bad_meta")["error"]

    summary = json.loads((bench / "summary.json").read_text())
    multi, single = summary["subsets"]["multi"], summary["subsets"]["single"]
    assert multi["samples"] == 4 and multi["scored"] == 3 and single["samples"] == 3 and "broken" in single["failed"]
    assert multi["table"]["cp"] == pytest.approx(np.mean([arc[n]["cp"] for n in ("gt", "copy", "swapped")]), abs=1e-9)
    # per-sample gate (Sim(GT) > 0.35): the copy sample's faces are strangers to the GT and drop out
    assert arc["copy"]["sim_gt"] < 0.35 < arc["gt"]["sim_gt"]
    assert multi["face_models"]["arcface"]["cp_gated"]["n"] == 2
    assert multi["face_models"]["arcface"]["cp_gated"]["mean"] == pytest.approx(-1.0, abs=1e-3)
    assert single["scored"] == 2 and set(summary["subsets"]) == {"single", "multi", "multi_2"}
    assert set(multi["fid"]) == {"authors"} and multi["table"]["fid"] == multi["fid"]["authors"]

    tables = (bench / "tables.md").read_text()
    assert "### Table 1: single person" in tables and "### Table 2: multi-person (2-4 people)" in tables
    assert tables.count("| ours | measured |") == 3  # single, multi, multi_2
    paper = load_paper_points()["subsets"]
    published = {s: [r for r in paper[s]["rows"] if r["method"] not in ("GT", "Ref")] for s in paper}
    # every published row of Tables 1a, 2a, 2b is in tables.md, 2b's too (no measured 3-4 people sample)
    assert "### Table 2b: 3-4 people" in tables
    for subset, title in (("single", "Table 1a"), ("multi_2", "Table 2a"), ("multi_3_4", "Table 2b")):
        assert tables.count(f"| published ({title}) |") == len(paper[subset]["rows"]), subset
    csv_rows = list(csv.DictReader(io.StringIO((bench / "tables.csv").read_text())))
    assert list(csv_rows[0])[:6] == ["subset", "method", "sim_gt", "sim_ref", "cp", "bld"]
    measured = [r for r in csv_rows if r["source"] == "measured" and r["kind"] == "method"]
    assert [(r["subset"], r["method"]) for r in measured] == [
        ("single", "ours"),
        ("multi", "ours"),
        ("multi_2", "ours"),
    ]
    assert len([r for r in csv_rows if r["source"] == "published"]) == sum(len(p["rows"]) for p in paper.values())
    # the paper prints no FID and no single-person Bld: empty cells, never a value
    assert all(r["fid"] == "" for r in csv_rows if r["source"] == "published")
    assert all(r["bld"] == "" for r in csv_rows if r["subset"] == "single")
    assert next(r for r in measured if r["subset"] == "multi")["fid"] != ""
    with Image.open(bench / "tradeoff.png") as png:
        assert png.size == (1500, 450) and png.format == "PNG"
    assert report["figure"]["single"] == {"paper": len(published["single"]), "methods": 1, "curve": True}
    assert report["figure"]["single"]["paper"] == 15  # every method of Table 1a; GT/Ref are bounds
    assert report["figure"]["multi_2"] == {"paper": 9, "methods": 1, "curve": True}
    assert report["figure"]["multi_3_4"] == {"paper": 9, "methods": 0, "curve": True}

    # the paper's GT and Ref rows, measured on these samples: exactly its bounds (no epsilon bug)
    assert report["bounds_check"]["ok"] and report["bounds_check"]["deviations"] == []
    gt, ref = report["bounds"]["GT"]["subsets"], report["bounds"]["Ref"]["subsets"]
    for subset in ("single", "multi"):
        assert gt[subset]["table"]["sim_gt"] == pytest.approx(1.0, abs=1e-6)
        assert gt[subset]["table"]["cp"] == pytest.approx(-1.0, abs=1e-6)
    assert set(ref) == {"single"} and ref["single"]["scored"] == 2  # the reference as output: one person only
    assert ref["single"]["table"]["sim_ref"] == pytest.approx(1.0, abs=1e-6)
    assert ref["single"]["table"]["cp"] == pytest.approx(1.0, abs=1e-6)
    bound_rows = [(r["subset"], r["method"]) for r in csv_rows if r["source"] == "measured" and r["kind"] == "bound"]
    assert bound_rows == [("single", "GT"), ("single", "Ref"), ("multi", "GT"), ("multi_2", "GT")]

    # resume: nothing changed -> every record reused; a new output -> that sample alone is scored again
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in bench.glob("*/metrics.json")}
    os.utime(bench / "copy" / "out.png")
    caplog.clear()
    caplog.set_level(logging.INFO, "withanyone.bench_eval")
    bench_eval.main(
        args[:6]
        + [
            "--no-progress",
            "--clip",
            str(models["clip"]),
            "--aesthetic-encoder",
            str(models["encoder"]),
            "--aesthetic-head",
            str(models["head"]),
        ]
    )
    # the aesthetic/CLIP settings are the same but FID is not a per-sample setting: records are reused
    after = {p.parent.name: p.stat().st_mtime_ns for p in bench.glob("*/metrics.json")}
    assert [n for n in stamps if after[n] != stamps[n]] == ["copy"]
    assert "6 of 7 samples reused" in caplog.text


def test_several_methods_are_rows_and_face_model_choice(bench, models, tmp_path):
    other = tmp_path / "copier"
    shutil.copytree(bench, other)
    for name in ("gt", "swapped", "single"):  # this method copies the reference everywhere
        shutil.copy(bench / ("copy" if name != "single" else "single_copy") / "out.png", other / name / "out.png")
    out = tmp_path / "report"
    bench_eval.main(
        [
            str(bench),
            str(other),
            "--names",
            "Pack",
            "Copier",
            "--out",
            str(out),
            "--insightface",
            str(models["insightface"]),
            "--face-model",
            "antelopev2",
            "--providers",
            "cpu",
            "--no-progress",
        ]
    )
    tables = (out / "tables.md").read_text()
    single_table = tables.split("### Table 2")[0]
    assert "| Pack |" in single_table and "| Copier |" in single_table
    report = json.loads((out / "report.json").read_text())["methods"]
    assert report["Pack"]["settings"]["face_model"] == "antelopev2"
    cp = {m: report[m]["subsets"]["multi"]["table"]["cp"] for m in ("Pack", "Copier")}
    assert cp["Copier"] > 0.9 and cp["Pack"] < cp["Copier"]
    # the copier's CP is the lowest-ranked; ranking marks the best CP in bold among gated methods
    pack_row = next(line for line in tables.split("### Table 2:")[1].splitlines() if line.startswith("| Pack |"))
    assert "**" in pack_row


def test_missing_models_say_which_file_and_where(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_eval.main([str(bench), "--insightface", str(tmp_path / "nothing"), "--providers", "cpu"])
    err = capsys.readouterr().err
    assert "det_10g.onnx" in err and "w600k_r50.onnx" in err and "models/buffalo_l" in err


def test_face_model_equals_insightface_face_analysis_as_the_authors_call_it(models):
    """buffalo_l through insightface's own FaceAnalysis (det_thresh 0.45, every model run), on the image
    and on the reference padded with PIL as the authors' pad_image does, gives the same embeddings."""
    import cv2
    from insightface.app import FaceAnalysis

    from withanyone_core.bench.faces import InsightFaceModel, pad_reference

    root = models["insightface"]
    buffalo = root / "models" / "buffalo_l"
    for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"):  # FaceAnalysis loads the whole pack
        shutil.copy(root / "models" / "antelopev2" / name, buffalo / name)
    app = FaceAnalysis(name="buffalo_l", root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_thresh=0.45)
    ours = InsightFaceModel(root, "buffalo_l", providers="cpu")

    image = make_face_image([(4, 5), (12, 9), (15, 15)], identities=[1, 2, 3], seed=7)[0]
    theirs = np.stack([f.embedding for f in app.get(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))])
    assert np.allclose(ours.faces(image), theirs, atol=1e-5)  # same faces, same (score) order

    ref = Image.fromarray(reference_photo(11, 21))
    side = int(max(ref.size) * 1.5)  # their pad_image: black square, centred by integer division
    padded = Image.new("RGB", (side, side), (0, 0, 0))
    padded.paste(ref, ((side - ref.size[0]) // 2, (side - ref.size[1]) // 2))
    assert np.array_equal(pad_reference(np.asarray(ref)), np.asarray(padded))
    first = app.get(cv2.cvtColor(np.asarray(padded), cv2.COLOR_RGB2BGR))[0].embedding
    assert np.allclose(ours.reference(np.asarray(ref)), first, atol=1e-5)


def test_bounds_self_check_catches_the_papers_epsilon_normalisation(bench, models, tmp_path, monkeypatch, capsys):
    """The self-check fails a run whose CP misses the bounds: here CP computed with the paper's
    x / (|x| + 1e-6) normalisation (README, "Their bugs"), which puts -1 / +1 out of reach."""
    from withanyone_core import metrics

    def cp_with_epsilon(generated, ground_truth, reference, eps=metrics.EPS):
        g, t, r = (np.asarray(v, np.float64) / (np.linalg.norm(v) + 1e-6) for v in (generated, ground_truth, reference))
        theta = lambda a, b: float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))  # noqa: E731
        return 0.0 if theta(t, r) < eps else (theta(g, t) - theta(g, r)) / theta(t, r)

    monkeypatch.setattr(metrics, "copy_paste_score", cp_with_epsilon)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as stop:
        bench_eval.main(
            [
                str(bench),
                "--out",
                str(out),
                "--insightface",
                str(models["insightface"]),
                "--providers",
                "cpu",
                "--no-progress",
            ]
        )
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "self-check failed" in err and "miss the paper's bounds" in err
    check = json.loads((out / "report.json").read_text())["bounds_check"]  # written, with the reason
    assert not check["ok"] and any(
        line.startswith("gt, arcface: the ground truth scored as the output gives cp") for line in check["deviations"]
    )
    assert any(
        line.startswith("single, arcface: the reference scored as the output gives cp") for line in check["deviations"]
    )
    # --no-bounds skips the rows and their check
    bench_eval.main(
        [
            str(bench),
            "--out",
            str(out),
            "--insightface",
            str(models["insightface"]),
            "--providers",
            "cpu",
            "--no-progress",
            "--no-bounds",
        ]
    )
    assert "| GT | measured |" not in (out / "tables.md").read_text()


def test_bounds_leave_cp_unchecked_where_ground_truth_and_reference_coincide(models, tmp_path):
    """A reference that is the ground truth's own face: CP is 0 by definition (theta(t, r) = 0), not a miss."""
    from withanyone_core.bench.faces import pad_reference

    ref = reference_photo(13, 23)
    truth = pad_reference(ref)  # the ground truth is the padded reference itself: the same embedding
    write_sample(
        tmp_path / "pack",
        "same",
        make_face_image([(8, 6)], identities=[13], seed=6)[0],
        truth,
        [ref],
        prompt="one person",
    )
    report = bench_eval.main(
        [str(tmp_path / "pack"), "--insightface", str(models["insightface"]), "--providers", "cpu", "--no-progress"]
    )
    assert report["bounds_check"] == {
        "ok": True,
        "tolerance": 1e-4,
        "deviations": [],
        "samples_from": str(tmp_path / "pack"),
    }
    gt = report["bounds"]["GT"]["subsets"]["single"]["face_models"]["arcface"]
    assert gt["sim_gt"]["mean"] == pytest.approx(1.0) and gt["cp"]["mean"] == 0.0
