"""The new shipped workflows RUN in a real ComfyUI server on the small random-weight models (the demo's):
editing a group photo (masked inpainting of the faces only), refining faces, and saved people (Save then
Load WithAnyone Identity, with no face analyzer or SigLIP in the second graph).

The graphs are the shipped files converted to API format; only model names, sizes and step counts are
swapped for the small models (CLIP-L alone stands in for CLIP-L + T5-XXL, as in the demo).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from support.comfy_env import ROOT
from tools.common.comfy_server import ComfyServer, execution_error

pytestmark = pytest.mark.slow
SIZE = 640  # the tiny detector's painted faces are made for 640 px


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_comfy_models):
    from tools.common.workflow_specs import GROUP_PHOTO, PERSON_PHOTOS, SMALL_FACES_PHOTO
    from withanyone_core.testing.faces import paint_face, remove_green

    base = tiny_comfy_models(tmp_path_factory.mktemp("comfy"))  # models + input/PERSON_PHOTOS[0] with one face
    shutil.copy(base / "input" / PERSON_PHOTOS[0], base / "input" / PERSON_PHOTOS[1])
    rng = np.random.default_rng(3)
    group = remove_green(rng.integers(40, 200, (SIZE, SIZE, 3), dtype=np.uint8))
    paint_face(group, 4, 7, identity=1)
    paint_face(group, 13, 7, identity=2)
    for name in (GROUP_PHOTO, SMALL_FACES_PHOTO):
        Image.fromarray(group).save(base / "input" / name)
    with ComfyServer(base) as comfy:
        yield comfy, base, group


def _tiny(workflow_name: str, info: dict, steps: int = 2) -> dict:
    from tools.common.workflows import ui_to_api
    from tools.demo import TINY_NAMES

    workflow = json.loads((ROOT / "example_workflows" / f"{workflow_name}.json").read_text(encoding="utf-8"))
    prompt = ui_to_api(workflow, info)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = TINY_NAMES["flux"]
        elif kind == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": TINY_NAMES["clip"], "type": "stable_diffusion", "device": "default"}
        elif kind == "VAELoader":
            inputs["vae_name"] = TINY_NAMES["vae"]
        elif kind == "WithAnyoneAdapterLoader":
            inputs["adapter_name"] = TINY_NAMES["adapter"]
        elif kind == "WithAnyoneSiglipLoader":
            inputs["siglip_name"] = TINY_NAMES["siglip"]
        elif kind == "WithAnyoneFaceAnalyzerLoader":
            inputs["provider"] = "CPU"
        elif kind == "WithAnyoneFaceExtract":
            inputs["min_face_size"] = 16
        elif kind in ("WithAnyoneSchedule", "WithAnyoneSampler"):
            inputs["steps"] = steps
        elif kind == "ImageScaleToMaxDimension":
            inputs["largest_size"] = SIZE  # the photo at its own size: pixels away from the faces stay exact
        elif kind == "ImageScaleBy" and inputs["scale_by"] > 1:
            inputs["scale_by"] = 1.0  # the 2x pass costs too much on CPU; the plumbing is the same
    return prompt


def _saved(entry: dict, base) -> list[np.ndarray]:
    error = execution_error(entry)
    assert error is None, error
    return [
        np.asarray(Image.open(base / "output" / i["subfolder"] / i["filename"]).convert("RGB"))
        for out in entry["outputs"].values()
        for i in out.get("images", [])
        if i["type"] == "output"
    ]


def _face_boxes(base_photo_size: int):
    from withanyone_core.testing.faces import paint_face

    canvas = np.zeros((base_photo_size, base_photo_size, 3), np.uint8)
    return [paint_face(canvas, x, 7, identity=1)[0] for x in (4, 13)]


def test_edit_a_group_photo_redraws_only_the_faces(server):
    comfy, base, group = server
    info = comfy.get_json("/object_info")
    [edited] = _saved(comfy.run(_tiny("WithAnyone - edit a group photo", info), timeout=900), base)
    assert edited.shape == group.shape
    changed = np.abs(edited.astype(int) - group.astype(int)).max(axis=-1) > 2
    inside = np.zeros(changed.shape, bool)
    for x1, y1, x2, y2 in _face_boxes(SIZE):
        inside[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    # the faces were redrawn (random weights: something else is there now) ...
    assert changed[inside].mean() > 0.5
    # ... and far from them (beyond the grown box and the soft edge) the photo is untouched
    near = np.zeros(changed.shape, bool)
    for x1, y1, x2, y2 in _face_boxes(SIZE):
        pad = 24 + 16 + 16  # the layout squares the box; grown 24 px; blurred edge
        near[max(0, int(y1) - pad) : int(y2) + pad, max(0, int(x1) - pad) : int(x2) + pad] = True
    assert not changed[~near].any()


def test_refine_small_faces_runs_and_keeps_the_size(server):
    comfy, base, group = server
    info = comfy.get_json("/object_info")
    [refined] = _saved(comfy.run(_tiny("WithAnyone - refine small faces", info), timeout=900), base)
    assert refined.shape == (SIZE // 2, SIZE // 2, 3)  # scale 1 in this test, then the workflow's 0.5


def _choices(info: dict, node: str, name: str) -> list[str]:
    spec = info[node]["input"]["required"][name]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def test_saved_people_need_no_face_analyzer_or_siglip(server):
    """'save people' (shipped) saves the two people 'saved people' (shipped) loads; Save writes again after its file
    was deleted by hand (ComfyUI's cache must not answer "already saved")."""
    comfy, base, _ = server
    from tools.common.workflow_specs import SAVE_PEOPLE, SAVED_PEOPLE
    from tools.demo import TINY_NAMES

    info = comfy.get_json("/object_info")
    folder = base / "models" / "withanyone" / "identities"
    save = _tiny(SAVE_PEOPLE, info)
    saves = sorted(k for k, n in save.items() if n["class_type"] == "WithAnyoneSaveIdentity")
    entry = comfy.run(save, timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    assert sorted(entry["outputs"][k]["text"][0] for k in saves) == [f"saved {f} (1 photo)" for f in SAVED_PEOPLE]
    assert all((folder / f).is_file() for f in SAVED_PEOPLE)
    (folder / SAVED_PEOPLE[0]).unlink()  # deleted by hand: the same graph must write it again
    entry = comfy.run(save, timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    texts = sorted(entry.get("outputs", {}).get(k, {}).get("text", [""])[0] for k in saves)
    assert f"saved {SAVED_PEOPLE[0]} (1 photo)" in texts, texts
    assert (folder / SAVED_PEOPLE[0]).is_file()
    info = comfy.get_json("/object_info")
    assert set(SAVED_PEOPLE) <= set(_choices(info, "WithAnyoneLoadIdentity", "identity_name"))
    adapters = _choices(info, "WithAnyoneAdapterLoader", "adapter_name")
    assert TINY_NAMES["adapter"] in adapters
    assert not [a for a in adapters if "identities" in a]
    prompt = _tiny("WithAnyone - saved people", info)
    kinds = {n["class_type"] for n in prompt.values()}
    assert not kinds & {"WithAnyoneFaceAnalyzerLoader", "WithAnyoneSiglipLoader", "WithAnyoneFaceExtract"}
    prompt[next(k for k, n in prompt.items() if n["class_type"] == "WithAnyoneLayout")]["inputs"].update(
        width=256, height=256
    )
    [image] = _saved(comfy.run(prompt, timeout=900), base)
    assert image.shape == (256, 256, 3)
