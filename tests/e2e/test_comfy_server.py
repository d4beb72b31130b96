"""The pack inside a real ComfyUI server (booted once): it loads, and /object_info lists its nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support.comfy_env import ROOT
from tools.common.comfy_server import ComfyServer


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ComfyServer:
    base = tmp_path_factory.mktemp("comfy")
    from withanyone_core.testing.faces import build_tiny_antelopev2, paint_face, remove_green

    build_tiny_antelopev2(base / "models" / "insightface")
    # insightface's own group photo, with faces painted where the tiny detector sees them
    import insightface
    from PIL import Image

    photo = Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB")
    canvas = remove_green(np.asarray(photo.resize((640, 640))))
    paint_face(canvas, 5, 6, identity=1)
    paint_face(canvas, 14, 7, identity=2)
    (base / "input").mkdir()
    Image.fromarray(canvas).save(base / "input" / "group.png")
    Image.fromarray(remove_green(np.asarray(photo))).save(base / "input" / "no_face.png")
    _workflow_placeholders(base)
    with ComfyServer(base) as comfy:
        yield comfy


def _workflow_placeholders(base: Path) -> None:
    """Empty files under the names the shipped workflows use, so the server's file lists offer them
    (validation checks names, not contents; running these would fail at the first loader)."""
    from tools.common.workflow_specs import PLACEHOLDER_INPUTS, PLACEHOLDER_MODELS

    for name in PLACEHOLDER_MODELS:
        (base / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / name).write_bytes(b"")
    from PIL import Image

    for name in PLACEHOLDER_INPUTS:
        Image.new("RGB", (64, 64), (90, 90, 90)).save(base / "input" / name)


def test_object_info_lists_every_node(server):
    comfy = server
    info = comfy.get_json("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("WithAnyone")}
    assert set(ours) == {
        "WithAnyoneAdapterLoader",
        "WithAnyoneFaceAnalyzerLoader",
        "WithAnyoneSiglipLoader",
        "WithAnyoneFaceExtract",
        "WithAnyoneIdentityEncode",
        "WithAnyoneLayout",
        "WithAnyoneApply",
        "WithAnyoneSchedule",
        "WithAnyoneSampler",
        "WithAnyoneIdentityMetrics",
        "WithAnyoneFaceEditPrepare",
        "WithAnyoneArcFaceIdentities",
        "WithAnyoneSaveIdentity",
        "WithAnyoneLoadIdentity",
    }, comfy.log_tail(100_000)[-3000:]
    for node in ours.values():
        assert node["category"].startswith("WithAnyone") and node["description"]
        assert node["search_aliases"], node["name"]  # words the node search also finds it by
    assert ours["WithAnyoneApply"]["output"] == ["MODEL"]
    assert "layout" in ours["WithAnyoneApply"]["input"]["optional"]
    layout = ours["WithAnyoneLayout"]
    assert {"width", "height", "source", "people", "boxes"} <= set(layout["input"]["required"])
    assert layout["output"] == ["WITHANYONE_LAYOUT", "IMAGE", "MASK", "MASK"]
    assert "Import failed" not in comfy.log_tail(100_000)


def test_layout_preview_runs_and_errors_reach_history(server):
    comfy = server
    layout = {
        "class_type": "WithAnyoneLayout",
        "inputs": {"width": 1024, "height": 768, "source": "preset", "people": 3, "boxes": ""},
    }
    done = comfy.run({"1": layout, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}})
    assert done["status"]["status_str"] == "success"
    assert done["outputs"]["2"]["images"][0]["type"] == "temp"
    bad = {**layout, "inputs": {**layout["inputs"], "source": "text", "boxes": "10,10,5"}}
    failed = comfy.run({"1": bad, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error" and "expected 4 numbers x1,y1,x2,y2" in messages


def _post_layout(comfy, data, chunked: bool = False) -> tuple[int, dict, float]:
    import time
    import urllib.error
    import urllib.request

    body = (data[i : i + 65536] for i in range(0, len(data), 65536)) if chunked else data
    req = urllib.request.Request(
        comfy.url + "/withanyone/layout", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.load(response), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), time.perf_counter() - start


def test_layout_route_answers_every_bad_request_with_a_4xx(server):
    """Through the real server: a 27 MB body of 3 M box lines is refused at once (it stalled the server 20 s and
    answered 99 MB), sent whole or chunked; the bodies that gave a 500 give a 400 naming the field."""
    comfy = server
    good = {"width": 1024, "height": 768, "source": "text", "people": 2, "boxes": "0.1,0.2,0.4,0.6"}
    huge = json.dumps({**good, "boxes": "10,10,50,50\n" * 3_000_000}).encode()
    for chunked in (False, True):
        status, answer, seconds = _post_layout(comfy, huge, chunked)
        assert status == 413 and "above 65536" in answer["error"] and seconds < 10, (status, answer, seconds)
    cases = {
        b"[" * 30000 + b"]" * 30000: "nested too deeply",
        b'{"width": 1' + b"0" * 400 + b', "height": 768, "source": "preset", "people": 1}': "width must be an integer",
        json.dumps({**good, "source": ["text"]}).encode(): "source must be one of preset, text, image, mask",
        json.dumps({**good, "boxes": "\n".join(["1,1,9,9"] * 65)}).encode(): "more than 64 boxes given",
        b"\xff": "not JSON",
    }
    for body, message in cases.items():
        status, answer, _ = _post_layout(comfy, body)
        assert status == 400 and message in answer["error"], (body[:60], status, answer)
    status, answer, seconds = _post_layout(comfy, json.dumps(good).encode())
    assert status == 200 and answer["boxes"] == [pytest.approx([102.4, 153.6, 409.6, 460.8])] and seconds < 5


def test_a_missing_saved_person_is_refused_with_how_to_save_one(server):
    from tools.common.comfy_server import PromptRejected
    from tools.common.workflow_specs import SIGLIP_NAME

    prompt = {
        "1": {"class_type": "WithAnyoneLoadIdentity", "inputs": {"identity_name": "nobody.safetensors"}},
        "2": {"class_type": "WithAnyoneSiglipLoader", "inputs": {"siglip_name": SIGLIP_NAME}},
        "3": {
            "class_type": "WithAnyoneSaveIdentity",
            "inputs": {"faces": ["1", 0], "siglip": ["2", 0], "name": "x", "overwrite": False},
        },
    }
    with pytest.raises(
        PromptRejected,
        match="no saved identity 'nobody.safetensors' in models/withanyone/"
        "identities/.*save the person first with a Save WithAnyone Identity",
    ):
        server.queue(prompt)


def test_face_extraction_layout_and_no_face_error(server):
    comfy = server
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "group.png"}},
        "2": {
            "class_type": "WithAnyoneFaceAnalyzerLoader",
            "inputs": {"provider": "CPU", "detection_threshold": 0.4, "detection_size": 640},
        },
        "3": {
            "class_type": "WithAnyoneFaceExtract",
            "inputs": {"image": ["1", 0], "face_analyzer": ["2", 0], "face_index": 1, "min_face_size": 32},
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "5": {
            "class_type": "WithAnyoneLayout",
            "inputs": {
                "width": 1024,
                "height": 768,
                "source": "image",
                "people": 2,
                "boxes": "",
                "layout_image": ["1", 0],
                "face_analyzer": ["2", 0],
            },
        },
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
    }
    done = comfy.run(prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    assert set(done["outputs"]) == {"3", "4", "6"}  # Face Extract shows its crops on the node
    assert done["outputs"]["3"]["text"] == ["1 photo used"]
    # one failing branch per run: ComfyUI's execution order between independent branches is not fixed
    no_face = {"1": {"class_type": "LoadImage", "inputs": {"image": "no_face.png"}}}
    failed = comfy.run({**no_face, **{k: prompt[k] for k in ("2", "3", "4")}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error"
    assert "no face found in photo 1 of 1" in messages and "WithAnyoneFaceExtract" in messages
    failed = comfy.run({**no_face, **{k: prompt[k] for k in ("2", "5", "6")}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error"
    assert "no face found in the layout image" in messages and "WithAnyoneLayout" in messages


WORKFLOW_NAMES = {
    "WithAnyone - one person",
    "WithAnyone - two people, layout from a photo",
    "WithAnyone - four people, typed boxes",
    "WithAnyone - with a FLUX LoRA",
    "WithAnyone - copy-paste meter",
    "WithAnyone - edit a group photo",
    "WithAnyone - refine small faces",
    "WithAnyone - save people",
    "WithAnyone - saved people",
}
LOADERS = {"UNETLoader", "DualCLIPLoader", "VAELoader", "WithAnyoneAdapterLoader", "WithAnyoneSiglipLoader"}


def _fetch(comfy, path: str) -> bytes:
    import urllib.parse
    import urllib.request

    return urllib.request.urlopen(comfy.url + urllib.parse.quote(path), timeout=60).read()


def test_shipped_workflows_are_templates_and_validate(server):
    """Every workflow in example_workflows/: served as a template with its .jpg thumbnail, identical to what its
    spec builds against this server's /object_info (thumbnail included), every public model file with its
    download and folder for the missing-models dialog, a note, and, converted to API format, accepted by the
    server."""
    import io

    from PIL import Image

    from tools.common.comfy_server import PromptRejected, execution_error
    from tools.common.workflow_specs import BUILDERS, MODEL_SOURCES, build_all, dumps, thumbnail
    from tools.common.workflows import check_api, thumbnail_jpeg, ui_to_api, version_neutral

    comfy = server
    files = {p.stem: p for p in (ROOT / "example_workflows").glob("*.json")}
    assert WORKFLOW_NAMES <= set(files) and set(files) == set(BUILDERS)
    assert {p.stem for p in (ROOT / "example_workflows").glob("*.jpg")} == set(files)  # one thumbnail each
    templates = comfy.get_json("/workflow_templates")
    pack = next(name for name, listed in templates.items() if WORKFLOW_NAMES <= set(listed))
    info = comfy.get_json("/object_info")
    folders = set(comfy.get_json("/models"))  # the folders the missing-models dialog checks a directory against
    rebuilt = build_all(info)
    for name, path in sorted(files.items()):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        assert json.loads(_fetch(comfy, f"/api/workflow_templates/{pack}/{name}.json")) == workflow
        # built on this server equals the shipped file, output sockets other ComfyUIs add to output nodes aside
        assert path.read_text(encoding="utf-8") == dumps(workflow), f"{name}: rerun dev/build_workflows.py"
        assert dumps(version_neutral(workflow, info)) == dumps(version_neutral(rebuilt[name], info)), (
            f"{name}: rerun dev/build_workflows.py"
        )
        served = _fetch(comfy, f"/api/workflow_templates/{pack}/{name}.jpg")
        assert served == path.with_suffix(".jpg").read_bytes()
        shipped = np.asarray(Image.open(io.BytesIO(served)).convert("RGB"), dtype=np.float32)
        fresh = np.asarray(Image.open(io.BytesIO(thumbnail_jpeg(thumbnail(name, rebuilt[name])))), dtype=np.float32)
        assert shipped.shape == fresh.shape == (512, 512, 3)
        assert np.abs(shipped - fresh).mean() < 1.0, f"{name}.jpg: rerun dev/build_workflows.py"
        for node in workflow["nodes"]:
            named = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in MODEL_SOURCES]
            models = node["properties"].get("models", [])
            assert [m["name"] for m in models] == named, (name, node["type"])
            for entry in models:
                assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith(".safetensors")
                assert entry["directory"] in folders, entry
            # every loader of a public file has its source; the Kontext previews' file names are the user's choice
            kontext_adapter = name.startswith("WithAnyone Kontext") and node["type"] == "WithAnyoneAdapterLoader"
            if node["type"] in LOADERS and not kontext_adapter:
                assert len(models) == (2 if node["type"] == "DualCLIPLoader" else 1), (name, node["type"])
            if kontext_adapter:
                kontext_files = [v for v in node["widgets_values"] if isinstance(v, str)][:1]
        notes = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
        assert len(notes) == 1 and notes[0]["widgets_values"][0].startswith(f"## {name}\n")
        text = notes[0]["widgets_values"][0]
        if name.startswith("WithAnyone Kontext"):
            assert f"| {kontext_files[0]} | models/withanyone/ | the WithAnyone release" in text
        for node in workflow["nodes"]:
            for entry in node["properties"].get("models", []):
                assert f"| {entry['name']} | models/{entry['directory']}/ | [download]({entry['url']})" in text
        prompt = ui_to_api(workflow, info)
        assert check_api(prompt, info) == [], name
        assert any(n["class_type"].startswith("WithAnyone") for n in prompt.values())
        entry = comfy.run(prompt, timeout=120)  # PromptRejected here would be a validation failure
        # it validated; with empty placeholder weights and faceless photos it then fails in a node
        assert "execution_start" in json.dumps(entry["status"]["messages"]), name
        assert execution_error(entry) is not None
    # the checker and the real server agree on a broken value
    prompt = ui_to_api(json.loads(files["WithAnyone - one person"].read_text()), info)
    sampler = next(n for n in prompt.values() if n["class_type"] == "WithAnyoneSampler")
    sampler["inputs"]["steps"] = 0
    assert any("'steps' = 0 outside" in p for p in check_api(prompt, info))
    with pytest.raises(PromptRejected, match="steps"):
        comfy.queue(prompt)
