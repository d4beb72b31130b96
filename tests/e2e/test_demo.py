"""README's first command: `make demo` (python -m tools.demo) on a machine without the real model files.

It must say which files go where, then run the single-person workflow's graph on small
random-weight models in a real ComfyUI server and save an image. COMFYUI_DIR points at a
ComfyUI whose models/ folder is empty (links to the test ComfyUI's code), as a user's
fresh install would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from support.comfy_env import ROOT, comfyui_dir
from tools.common.comfy_server import free_port
from tools.demo import TINY_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture
def empty_comfyui(tmp_path):
    source = comfyui_dir()
    fresh = tmp_path / "ComfyUI"
    fresh.mkdir()
    for entry in source.iterdir():
        if entry.name not in ("models", "custom_nodes", "input", "output", "user"):
            (fresh / entry.name).symlink_to(entry)
    (fresh / "models").mkdir()
    return fresh


def test_demo_without_model_files_runs_the_graph_on_small_models(empty_comfyui, tmp_path):
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--steps", "2", "--demo-dir", str(demo_dir)],
        env={**os.environ, "COMFYUI_DIR": str(empty_comfyui)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    models = empty_comfyui / "models"
    for line in (
        f"flux1-dev.safetensors (FLUX.1-dev, from black-forest-labs/FLUX.1-dev) -> {models / 'diffusion_models'}",
        f"withanyone.safetensors (WithAnyone release, 5.6 GB) -> {models / 'withanyone'}",
        f"-> {models / 'insightface' / 'models' / 'antelopev2'}",
        "random-weight models",
    ):
        assert line in log
    assert (empty_comfyui / "custom_nodes" / "comfyui-withanyone").resolve() == ROOT  # installed into it
    saved = sorted((demo_dir / "output" / "WithAnyone").glob("demo_random_weights_*.png"))
    assert len(saved) == 1 and f"saved {saved[0]}" in log
    image = Image.open(saved[0])
    assert image.size == (256, 256)
    assert len(set(image.convert("L").getdata())) > 16  # decoded pixels, not a blank canvas
    assert not any(p.is_file() for p in models.rglob("*"))  # nothing written into the user's models folders
    # it ends with how to open the UI on that ComfyUI, and how to use one's own
    tail = log[log.index("Next:") :]
    python = Path(sys.executable).absolute()
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    assert f"COMFYUI_DIR={empty_comfyui} {python} -m tools.demo --serve --demo-dir {demo_dir}" in tail
    assert "http://127.0.0.1:8188" in tail and "COMFYUI_DIR=/path/to/ComfyUI make demo" in tail

    # --serve (`make comfyui-ui`): the browser UI on the same ComfyUI and small models, with the pack and templates
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--serve", "--port", str(port), "--demo-dir", str(demo_dir)],
        env={**os.environ, "COMFYUI_DIR": str(empty_comfyui)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, deadline, info = f"http://127.0.0.1:{port}", time.time() + 300, None
        while info is None and time.time() < deadline and ui.poll() is None:
            try:
                info = json.load(urllib.request.urlopen(url + "/object_info/WithAnyoneAdapterLoader", timeout=5))
            except OSError:
                time.sleep(1)
        assert info is not None, ui.stdout.read()[-3000:] if ui.poll() is not None else "no answer"
        assert TINY_NAMES["adapter"] in json.dumps(info)  # the demo's small models
        templates = json.load(urllib.request.urlopen(url + "/workflow_templates", timeout=30))
        assert any("WithAnyone - save people" in listed for listed in templates.values())
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_help_states_the_recipe():
    from withanyone_core import recipe

    out = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert f"real models: {recipe.DEFAULT_STEPS}, the authors' recipe" in " ".join(out.split())
    assert "make comfyui-ui" in " ".join(out.split()) and "8188" in out
