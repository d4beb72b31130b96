"""The MultiID-Bench generation runner end to end: a real ComfyUI with the pack and the small
random-weight model set (tools/demo.py), the shipped workflows submitted over HTTP, then the
evaluation CLI on what it wrote. One slow test: it boots the server once and renders three images."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from support.comfy_env import ROOT  # noqa: F401  (the pack's folder on sys.path)
from tools.common.comfy_server import ComfyServer

pytestmark = pytest.mark.slow


def _bench(root):
    from withanyone_core.testing.faces import make_face_image

    samples = {"a_single": [(9, 8)], "b_pair": [(5, 6), (14, 7)], "c_unused": [(9, 8)]}
    for k, (name, cells) in enumerate(samples.items()):
        folder = root / name
        folder.mkdir(parents=True)
        truth, boxes, _ = make_face_image(cells, identities=list(range(1, len(cells) + 1)), seed=k)
        Image.fromarray(truth).save(folder / "ori.jpg", quality=95)
        for p in range(len(cells)):
            ref = make_face_image([(9, 9)], identities=[p + 1], seed=10 + p)[0]
            Image.fromarray(ref).save(folder / f"ref_{p + 1}.jpg", quality=95)
        (folder / "meta.json").write_text(json.dumps({"prompt": f"photo {name}", "bboxes": boxes.tolist()}))


def test_runner_generates_resumes_and_feeds_the_evaluation(tmp_path, tiny_comfy_models):
    import tools.bench_run as bench_run
    from tools.demo import TINY_NAMES
    from withanyone_core import bench_eval

    base = tiny_comfy_models(tmp_path / "comfy")
    bench, results = tmp_path / "bench", tmp_path / "results"
    _bench(bench)
    args = [
        str(bench),
        "--out",
        str(results),
        "--unet",
        TINY_NAMES["flux"],
        "--vae",
        TINY_NAMES["vae"],
        "--adapter",
        TINY_NAMES["adapter"],
        "--siglip",
        TINY_NAMES["siglip"],
        "--clip-l-only",
        TINY_NAMES["clip"],
        "--steps",
        "1",
        "--size",
        "256",
        "--min-face-size",
        "16",
        "--limit",
        "2",
        "--siglip-share",
        "0.25",
    ]
    with ComfyServer(base) as server:
        written = bench_run.main(args + ["--server", server.url])
        assert [p.parent.name for p in written] == ["a_single", "b_pair"]  # --limit 2: c_unused left alone
        assert not (results / "c_unused").exists()
        for name, persons in (("a_single", 1), ("b_pair", 2)):
            folder = results / name
            with Image.open(folder / "out.jpg") as out:
                assert out.size == (256, 256) and out.format == "JPEG"
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                ["out.jpg", "ori.jpg", "meta.json", *[f"ref_{k}.jpg" for k in range(1, persons + 1)]]
            )
            meta = json.loads((folder / "meta.json").read_text())
            assert meta["prompt"] == f"photo {name}" and meta["bench_run"]["seed"] == 1234
            # the 640 px ground truth's boxes, through its square crop, at 256 px
            source = json.loads((bench / name / "meta.json").read_text())["bboxes"]
            assert meta["bench_run"]["boxes"] == [[round(v * 256 / 640) for v in b] for b in source]
        # what the server ran: the sample's prompt, refs and boxes reached the nodes
        history = server.get_json("/history")
        ran = [entry["prompt"][2] for entry in history.values()]
        layouts = [n["inputs"] for p in ran for n in p.values() if n["class_type"] == "WithAnyoneLayout"]
        assert sorted(lay["people"] for lay in layouts) == [1, 2] and all(lay["source"] == "text" for lay in layouts)
        shares = [n["inputs"]["siglip_share"] for p in ran for n in p.values() if "siglip_share" in n["inputs"]]
        assert shares == [0.25, 0.25]
        texts = {n["inputs"]["text"] for p in ran for n in p.values() if n["class_type"] == "CLIPTextEncode"}
        assert {"photo a_single", "photo b_pair"} <= texts
        loads = sorted(n["inputs"]["image"] for p in ran for n in p.values() if n["class_type"] == "LoadImage")
        assert loads == [
            "withanyone_bench_a_single_ref_1.jpg",
            "withanyone_bench_b_pair_ref_1.jpg",
            "withanyone_bench_b_pair_ref_2.jpg",
        ]

        # resume: existing outputs are kept; --overwrite with the same seed renders the same image
        before = (results / "a_single" / "out.jpg").read_bytes()
        stamp = (results / "a_single" / "out.jpg").stat().st_mtime_ns
        bench_run.main(args + ["--server", server.url])
        assert (results / "a_single" / "out.jpg").stat().st_mtime_ns == stamp
        assert len(server.get_json("/history")) == 2
        bench_run.main(args + ["--server", server.url, "--overwrite", "--limit", "1"])
        assert (results / "a_single" / "out.jpg").read_bytes() == before

    report = bench_eval.main(
        [
            str(results),
            "--insightface",
            str(base / "models" / "insightface"),
            "--face-model",
            "antelopev2",
            "--providers",
            "cpu",
            "--no-progress",
        ]
    )
    records = [json.loads((results / n / "metrics.json").read_text()) for n in ("a_single", "b_pair")]
    assert [r["persons"] for r in records] == [1, 2]  # scored (random weights draw no face: reported as such)
    assert all(r["status"] in ("ok", "failed") for r in records) and (results / "tables.md").is_file()
    assert set(report["methods"]) == {"results"}
