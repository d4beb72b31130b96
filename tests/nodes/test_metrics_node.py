"""The Identity Metrics node gives the CLI's numbers for the same images and face model (real ComfyUI modules)."""

import asyncio
import json

import numpy as np
import pytest
import torch
from PIL import Image

from support.bench_samples import reference_photo, write_sample
from support.comfy_env import import_comfyui, import_pack
from withanyone_core import bench_eval
from withanyone_core.bench.faces import pad_reference
from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image
from withanyone_core.testing.siglip import build_tiny_siglip


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    import_comfyui(models)
    pack = import_pack()
    listed = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    build_tiny_antelopev2(models / "insightface")
    build_tiny_siglip(models / "siglip" / "tiny-siglip", hidden_size=768)
    return {n.GET_SCHEMA().node_id: n for n in listed}, models


def _tensor(image: np.ndarray, alpha: bool = False) -> torch.Tensor:
    pixels = image.astype(np.float32) / 255
    if alpha:  # a 4-channel IMAGE (e.g. from a PNG with transparency)
        pixels = np.concatenate([pixels, np.ones_like(pixels[..., :1])], axis=-1)
    return torch.from_numpy(pixels)[None]


def _cli_scores(pack, folder, models) -> dict:
    """The MultiID-Bench CLI's ArcFace scores of the sample ``folder`` (scored with the whole ``pack``)."""
    bench_eval.main(
        [
            str(pack),
            "--insightface",
            str(models / "insightface"),
            "--face-model",
            "antelopev2",
            "--det-thresh",
            "0.4",
            "--providers",
            "cpu",
            "--no-progress",
        ]
    )
    return json.loads((folder / "metrics.json").read_text())["face_models"]["arcface"]


def test_node_matches_cli_for_the_same_images_and_face_model(nodes, tmp_path):
    nodes, models = nodes
    cells = [(5, 6), (13, 8), (9, 15)]
    truth = make_face_image(cells, identities=[1, 2, 3], seed=3)[0]
    refs = [reference_photo(11 + k, 21 + k) for k in range(3)]
    # person 1 is a copy of its reference, person 2 its ground truth, person 3 got lost
    output = make_face_image(cells[:2], identities=[11, 2], seed=3)[0]
    folder = write_sample(tmp_path / "pack", "mixed", output, truth, refs)
    cli = _cli_scores(tmp_path / "pack", folder, models)
    assert cli["cp"] is None and cli["missing"] == [3]  # 2 faces for 3 people: CP undefined, as the authors'

    analyzer = nodes["WithAnyoneFaceAnalyzerLoader"].execute("CPU", 0.4, 640).result[0]
    siglip = nodes["WithAnyoneSiglipLoader"].execute("tiny-siglip").result[0]
    faces = [nodes["WithAnyoneFaceExtract"].execute(_tensor(pad_reference(r)), analyzer, -1, 0).result[0] for r in refs]
    identities = nodes["WithAnyoneIdentityEncode"].execute(siglip, *faces).result[0]
    out = nodes["WithAnyoneIdentityMetrics"].execute(_tensor(output, alpha=True), analyzer, identities, _tensor(truth))
    node = json.loads(out.result[0])
    for key in ("sim_ref", "sim_gt", "off_ref", "off_gt", "faces_generated", "faces_ground_truth", "missing"):
        assert node[key] == pytest.approx(cli[key], abs=1e-6), key
    for a, b in zip(node["persons"], cli["persons"]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a if a[k] is not None)
    text = json.dumps(out.ui.as_dict())
    assert "CP undefined: 2 face(s) generated, 3 in the ground truth" in text and "person 3: no matching face" in text

    # with every face present the node's CP is the CLI's too
    Image.fromarray(truth).save(folder / "out.png")
    cli = _cli_scores(tmp_path / "pack", folder, models)
    node = json.loads(
        nodes["WithAnyoneIdentityMetrics"].execute(_tensor(truth), analyzer, identities, _tensor(truth)).result[0]
    )
    assert node["cp"] == pytest.approx(cli["cp"], abs=1e-6) and cli["cp"] == pytest.approx(-1.0, abs=1e-3)
