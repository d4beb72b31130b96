"""The Kontext workflow specs (tools/common/workflow_specs.py) against a real ComfyUI server with the pack.

Both workflows are built from the server's /object_info, converted to API format and accepted
by the server (validation checks file names, so the models are empty placeholders; the run then
stops at the first loader). The face-edit preparation runs for real on a photo with two faces
(tiny antelopev2 stand-ins), its outputs shown by PreviewImage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support import comfy_env  # noqa: F401,I001  (the pack's folder on sys.path)
from tools.common.comfy_server import ComfyServer, execution_error


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ComfyServer:
    from PIL import Image

    from tools.common.workflow_specs import KONTEXT_PLACEHOLDER_INPUTS as PLACEHOLDER_INPUTS
    from tools.common.workflow_specs import KONTEXT_PLACEHOLDER_MODELS as PLACEHOLDER_MODELS
    from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image

    base = tmp_path_factory.mktemp("comfy")
    build_tiny_antelopev2(base / "models" / "insightface")
    for name in PLACEHOLDER_MODELS:
        (base / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / name).write_bytes(b"")
    (base / "input").mkdir()
    for name in PLACEHOLDER_INPUTS:
        Image.new("RGB", (64, 64), (90, 90, 90)).save(base / "input" / name)
    photo, _, _ = make_face_image([(5, 6), (14, 7)], seed=3, size=1280)
    Image.fromarray(photo).save(base / "input" / "group.png")
    with ComfyServer(Path(base)) as comfy:
        yield comfy


@pytest.mark.slow
def test_kontext_workflows_validate_on_the_server(server):
    from tools.common.workflow_specs import kontext_builders
    from tools.common.workflows import check_api, ui_to_api

    info = server.get_json("/object_info")
    assert {"WithAnyoneFaceEditPrepare", "WithAnyoneArcFaceIdentities", "ReferenceLatent"} <= set(info)
    for name, build in kontext_builders().items():
        workflow = build(info)
        prompt = ui_to_api(json.loads(json.dumps(workflow)), info)
        assert check_api(prompt, info) == [], name
        entry = server.run(prompt, timeout=120)  # a PromptRejected here would be a validation failure
        assert "execution_start" in json.dumps(entry["status"]["messages"]), name
        assert execution_error(entry) is not None  # empty placeholder weights: it stops in a loader


@pytest.mark.slow
def test_face_edit_prepare_runs_in_the_server(server):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "group.png"}},
        "2": {
            "class_type": "WithAnyoneFaceAnalyzerLoader",
            "inputs": {"provider": "CPU", "detection_threshold": 0.4, "detection_size": 640},
        },
        "3": {
            "class_type": "WithAnyoneFaceEditPrepare",
            "inputs": {
                "image": ["1", 0],
                "face_analyzer": ["2", 0],
                "face_order": "left to right",
                "aspect_limit": "authors (0.9-1.1)",
                "megapixels": 0.0,
                "box_mapping": "authors",
                "min_blur_face": 100,
                "blur_radius": 15.0,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }
    done = server.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    assert {"4", "5"} <= set(done["outputs"])
    import io

    from PIL import Image

    reference = np.asarray(Image.open(io.BytesIO(server.download_image(done["outputs"]["4"]["images"][0]))))
    assert reference.shape == (1280, 1280, 3)
