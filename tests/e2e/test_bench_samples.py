"""MultiID-Bench inputs: the folder layout (1- and 0-based references), the authors' hf2bench index, box mapping."""

import json

import pytest

from support.comfy_env import ROOT  # noqa: F401  (the pack's folder on sys.path)
from withanyone_core.bench.samples import list_samples, samples_from_index


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_folder_layout_with_one_and_zero_based_references(tmp_path):
    for name, stems in (("a", ["ref_1", "ref_2", "ref_3"]), ("b", ["ref_0", "ref_1"]), ("c", ["ref_1", "ref_3"])):
        for stem in ["ori", "out", *stems]:
            _touch(tmp_path / name / f"{stem}.jpg")
    (tmp_path / "a" / "meta.json").write_text(json.dumps({"caption_en": "three friends"}))
    a, b, c = list_samples(tmp_path)
    assert [p.name for p in a.refs] == ["ref_1.jpg", "ref_2.jpg", "ref_3.jpg"] and a.prompt == "three friends"
    assert [p.name for p in b.refs] == ["ref_0.jpg", "ref_1.jpg"] and b.subset == "multi"
    assert [p.name for p in c.refs] == ["ref_1.jpg"]  # numbering stops at the first gap


def test_hf2bench_index_with_boxes_and_crop(tmp_path):
    root = tmp_path / "p2" / "untar"
    for name in ("0007.jpg", "0007_1.jpg", "0007_2.jpg"):
        _touch(root / name)
    (root / "0007.json").write_text(
        json.dumps(
            {
                "caption_en": "two people",
                "bboxes": [[110, 60, 150, 110], [200, 70, 240, 120]],
                "crop": [100, 50, 400, 350],
            }
        )
    )
    index = tmp_path / "p2.json"
    index.write_text(
        json.dumps([{"prompt": "two people", "image_paths": ["0007_1.jpg", "0007_2.jpg"], "ori_img_path": "0007.jpg"}])
    )
    (sample,) = samples_from_index(index, root)
    assert sample.name == "0007" and sample.persons == 2 and sample.ground_truth == root / "0007.jpg"
    assert sample.meta["bboxes"] == [[10, 10, 50, 60], [100, 20, 140, 70]]  # shifted by the crop, as theirs


def test_boxes_follow_the_square_crop_of_the_ground_truth():
    import tools.bench_run as bench_run

    # a 1000 x 600 photo, faces on the right: the 600 px square is pushed right, then scaled to 512
    boxes = bench_run.output_boxes(1000, 600, [[700, 100, 800, 220], [850, 120, 950, 240]], 512)
    scale = 512 / 600
    assert boxes == [
        [round((700 - 400) * scale), round(100 * scale), round((800 - 400) * scale), round(220 * scale)],
        [round((850 - 400) * scale), round(120 * scale), round((950 - 400) * scale), round(240 * scale)],
    ]
    with pytest.raises(ValueError, match="outside the square crop"):
        bench_run.output_boxes(2000, 300, [[0, 0, 50, 50], [1900, 10, 1990, 90]], 512)
