"""AdaFace IR-50, FaceNet and facexlib's RetinaFace alignment, rebuilt for local safetensors, against the originals.

facenet-pytorch and facexlib (installed without their extra dependencies) provide the
reference implementations; AdaFace is not a package, so its IR-50 is checked against the
size of the authors' ``net.build_model('ir_50')`` state dict (467 tensors, 43,623,694 values),
and numerically against that code when it was written.
"""

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from withanyone_core.bench.quality import MissingWeights
from withanyone_core.bench.torch_faces import (
    AdaFaceIR50,
    FaceNetInceptionResnetV1,
    RetinaFaceR50,
    TorchFaceModel,
    align_faces,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> dict:
    """Random weights with non-trivial BatchNorm statistics (so every layer matters)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        value = value.clone()
        if value.dtype.is_floating_point:
            if key.endswith("running_var"):
                value = 0.5 + torch.rand(value.shape, generator=g)
            elif key.endswith("running_mean"):
                value = 0.1 * torch.randn(value.shape, generator=g)
            elif value.ndim >= 2:
                fan_in = value[0].numel()
                value = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
            else:
                value = 0.1 * torch.randn(value.shape, generator=g) + (1.0 if key.endswith("weight") else 0.0)
        state[key] = value.contiguous()
    module.load_state_dict(state)
    return state


def _facexlib_detection():
    """facexlib.detection without facexlib/__init__ (which imports its tracking extras)."""
    import facexlib as probe  # noqa: F401  (fails here only if facexlib is missing)

    root = Path(importlib.util.find_spec("facexlib").origin).parent
    for name in [m for m in sys.modules if m == "facexlib" or m.startswith("facexlib.")]:
        del sys.modules[name]
    stub = types.ModuleType("facexlib")
    stub.__path__ = [str(root)]
    sys.modules["facexlib"] = stub
    return importlib.import_module("facexlib.detection.retinaface")


def test_adaface_ir50_layout_and_output():
    net = AdaFaceIR50().eval()
    state = net.state_dict()
    assert len(state) == 467 and sum(v.numel() for v in state.values()) == 43_623_694
    _randomise(net)
    out = net(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2))
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # blue in a BGR crop
    x = AdaFaceIR50.preprocess([crop])
    assert x[0, 0].eq(1).all() and x[0, 1].eq(-1).all()  # channel 0 stays B: the authors' BGR input


def test_facenet_equals_facenet_pytorch():
    from facenet_pytorch import InceptionResnetV1

    mine = FaceNetInceptionResnetV1().eval()
    reference = InceptionResnetV1(pretrained=None).eval()
    state = _randomise(reference)
    missing, unexpected = mine.load_state_dict(state)
    assert not missing and not unexpected
    crops = [np.random.default_rng(k).integers(0, 256, (112, 112, 3), dtype=np.uint8) for k in range(2)]
    x = FaceNetInceptionResnetV1.preprocess(crops)
    with torch.no_grad():
        assert torch.allclose(mine(x), reference(x), atol=1e-5)
    assert x.max() <= 1 and x.shape == (2, 3, 112, 112)  # the BGR crop scaled to [0, 1] at 112 px, as the authors


def test_retinaface_and_alignment_equal_facexlib():
    import cv2

    retinaface = _facexlib_detection()
    reference = retinaface.RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu")).eval()
    state = _randomise(reference, seed=3)
    bgr = np.random.default_rng(1).integers(0, 256, (200, 168, 3), dtype=np.uint8)
    x = torch.from_numpy(bgr.astype(np.float32).transpose(2, 0, 1))[None] - torch.tensor([104.0, 117.0, 123.0]).view(
        1, 3, 1, 1
    )
    feats = []
    hooks = [getattr(reference, f"ssh{k}").register_forward_hook(lambda m, i, o: feats.append(o)) for k in (1, 2, 3)]
    with torch.no_grad():
        reference(x)
    for h in hooks:
        h.remove()
    scale = float(torch.cat([f.flatten() for f in feats]).std())
    g = torch.Generator().manual_seed(5)
    for name, value in state.items():  # heads whose outputs are O(1): offsets without exp() overflow, spread scores
        if name.startswith(("BboxHead", "LandmarkHead", "ClassHead")):
            target = 2.0 if name.startswith("ClassHead") else 0.3
            fan_in = value[0].numel() if value.ndim > 1 else 1
            value.copy_(
                torch.randn(value.shape, generator=g) * target / ((scale if value.ndim > 1 else 1) * fan_in**0.5)
            )
    reference.load_state_dict(state)
    mine = RetinaFaceR50().eval()
    assert mine.load_state_dict(state) is not None
    with torch.no_grad():
        expected = reference.detect_faces(bgr, conf_threshold=0.3)
    found = mine.detect(bgr, threshold=0.3)
    assert len(found) > 0 and found.shape == expected.shape
    assert np.allclose(found, expected, atol=1e-3)
    # facexlib's FaceRestoreHelper(face_size=112).align_warp_face on the same landmarks
    template = np.array(
        [
            [192.98138, 239.94708],
            [318.90277, 240.1936],
            [256.63416, 314.01935],
            [201.26117, 371.41043],
            [313.08905, 371.15118],
        ]
    ) * (112 / 512.0)
    landmark = np.array([[expected[0][i], expected[0][i + 1]] for i in range(5, 15, 2)])
    matrix = cv2.estimateAffinePartial2D(landmark, template, method=cv2.LMEDS)[0]
    crop = cv2.warpAffine(bgr, matrix, (112, 112), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
    assert np.array_equal(align_faces(bgr, found[:1])[0], crop)


def test_torch_face_model_from_a_folder_and_missing_files(tmp_path):
    detector = RetinaFaceR50()
    save_file(_randomise(detector), str(tmp_path / "detection_Resnet50_Final.safetensors"))
    with pytest.raises(MissingWeights, match="adaface_ir50_ms1mv2"):
        TorchFaceModel("adaface", tmp_path, "cpu")
    save_file(_randomise(AdaFaceIR50()), str(tmp_path / "adaface_ir50_ms1mv2.safetensors"))
    model = TorchFaceModel("adaface", tmp_path, "cpu")
    model.detector.detect = lambda bgr, **_: np.array(  # a fixed face: random weights find none at 0.97
        [[40, 40, 120, 130, 0.99, 60, 70, 100, 70, 80, 90, 65, 110, 95, 110]], dtype=np.float32
    )
    image = np.random.default_rng(0).integers(0, 256, (200, 160, 3), dtype=np.uint8)
    faces = model.faces(image)
    assert faces.shape == (1, 512) and np.isclose(np.linalg.norm(faces[0]), 1.0)
    assert model.reference(image).shape == (512,)
    with pytest.raises(MissingWeights, match="detection_Resnet50_Final"):
        TorchFaceModel("facenet", tmp_path / "empty", "cpu")


def test_cli_adds_adaface_facenet_and_the_pooled_average(tmp_path):
    from support.bench_samples import reference_photo, write_sample
    from withanyone_core import bench_eval
    from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image

    weights = tmp_path / "torch_faces"
    weights.mkdir()
    detector = RetinaFaceR50()
    with torch.no_grad():
        for head in detector.ClassHead:  # an untrained detector that finds no face (fast, and well defined)
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0]).repeat(2))
    for net, name in (
        (detector, "detection_Resnet50_Final"),
        (AdaFaceIR50(), "adaface_ir50_ms1mv2"),
        (FaceNetInceptionResnetV1(), "facenet_vggface2"),
    ):
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        if name == "facenet_vggface2":  # the release also carries its VGGFace2 classifier, which is left out
            state.update({"logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)})
        save_file(state, str(weights / f"{name}.safetensors"))
    build_tiny_antelopev2(tmp_path / "insightface")
    truth = make_face_image([(5, 6), (13, 8)], identities=[1, 2], seed=3)[0]
    write_sample(tmp_path / "pack", "gt", truth, truth, [reference_photo(11, 21), reference_photo(12, 22)])
    bench_eval.main(
        [
            str(tmp_path / "pack"),
            "--insightface",
            str(tmp_path / "insightface"),
            "--face-model",
            "antelopev2",
            "--torch-faces",
            str(weights),
            "--device",
            "cpu",
            "--providers",
            "cpu",
            "--no-progress",
        ]
    )
    import json

    record = json.loads((tmp_path / "pack" / "gt" / "metrics.json").read_text())
    assert set(record["face_models"]) == {"arcface", "adaface", "facenet"} and record["status"] == "ok"
    summary = json.loads((tmp_path / "pack" / "summary.json").read_text())["subsets"]["multi"]
    assert set(summary["face_models"]) == {"arcface", "adaface", "facenet", "average"}
    assert record["face_models"]["adaface"]["error"].startswith("no face found in reference")
    # the table shows the pooled average; the detector finds no face, so it equals ArcFace's here
    pooled = [m.get("sim_gt") for m in record["face_models"].values() if m.get("sim_gt") is not None]
    assert summary["table"]["sim_gt"] == pytest.approx(float(np.mean(pooled)))
