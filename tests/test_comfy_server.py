"""The pack inside a real ComfyUI server (booted once): it loads, and /object_info lists its nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import numpy as np
import pytest

from comfy_env import PACK_NAME, ROOT, comfyui_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image, paint_face, remove_green

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
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
        cwd=comfyui_dir(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("ComfyUI exited during start-up:\n" + (base / "server.log").read_text()[-4000:])
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
    yield url, base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_object_info_lists_every_node(server):
    url, base = server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=30))
    ours = {k: v for k, v in info.items() if k.startswith("WithAnyone")}
    assert set(ours) == {"WithAnyoneAdapterLoader", "WithAnyoneFaceAnalyzerLoader", "WithAnyoneSiglipLoader",
                         "WithAnyoneFaceExtract", "WithAnyoneIdentityEncode", "WithAnyoneLayout", "WithAnyoneApply",
                         "WithAnyoneSampler", "WithAnyoneIdentityMetrics"}, (base / "server.log").read_text()[-3000:]
    for node in ours.values():
        assert node["category"].startswith("WithAnyone") and node["description"]
    assert ours["WithAnyoneApply"]["output"] == ["MODEL"]
    assert "layout" in ours["WithAnyoneApply"]["input"]["optional"]
    layout = ours["WithAnyoneLayout"]
    assert {"width", "height", "source", "people", "boxes"} <= set(layout["input"]["required"])
    assert layout["output"] == ["WITHANYONE_LAYOUT", "IMAGE"]
    assert "Import failed" not in (base / "server.log").read_text()


def _run(url: str, prompt: dict, timeout: float = 120) -> dict:
    body = json.dumps({"prompt": prompt, "client_id": "withanyone-tests"}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        prompt_id = json.load(urllib.request.urlopen(req, timeout=30))["prompt_id"]
    except urllib.error.HTTPError as err:  # validation errors come back as 400 with details
        return {"validation_error": json.loads(err.read())}
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30))
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.3)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def test_layout_preview_runs_and_errors_reach_history(server):
    url, _ = server
    layout = {"class_type": "WithAnyoneLayout",
              "inputs": {"width": 1024, "height": 768, "source": "preset", "people": 3, "boxes": ""}}
    done = _run(url, {"1": layout, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}})
    assert done["status"]["status_str"] == "success"
    assert done["outputs"]["2"]["images"][0]["type"] == "temp"
    bad = {**layout, "inputs": {**layout["inputs"], "source": "text", "boxes": "10,10,5"}}
    failed = _run(url, {"1": bad, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error" and "expected 4 numbers x1,y1,x2,y2" in messages


def test_face_extraction_layout_and_no_face_error(server):
    url, _ = server
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "group.png"}},
        "2": {"class_type": "WithAnyoneFaceAnalyzerLoader",
              "inputs": {"provider": "CPU", "detection_threshold": 0.4, "detection_size": 640}},
        "3": {"class_type": "WithAnyoneFaceExtract",
              "inputs": {"image": ["1", 0], "face_analyzer": ["2", 0], "face_index": 1, "min_face_size": 32}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "5": {"class_type": "WithAnyoneLayout",
              "inputs": {"width": 1024, "height": 768, "source": "image", "people": 2, "boxes": "",
                         "layout_image": ["1", 0], "face_analyzer": ["2", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
    }
    done = _run(url, prompt)
    assert done["status"]["status_str"] == "success", done["status"]
    assert set(done["outputs"]) == {"4", "6"}
    # one failing branch per run: ComfyUI's execution order between independent branches is not fixed
    no_face = {"1": {"class_type": "LoadImage", "inputs": {"image": "no_face.png"}}}
    failed = _run(url, {**no_face, **{k: prompt[k] for k in ("2", "3", "4")}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error"
    assert "no face found in photo 1 of 1" in messages and "WithAnyoneFaceExtract" in messages
    failed = _run(url, {**no_face, **{k: prompt[k] for k in ("2", "5", "6")}})
    messages = json.dumps(failed["status"]["messages"])
    assert failed["status"]["status_str"] == "error"
    assert "no face found in the layout image" in messages and "WithAnyoneLayout" in messages
