"""The test server itself (no missing modules in its log) and the shipped workflows as the real frontend
loads them."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from support.comfy_env import ROOT

from .pages import open_app

pytestmark = pytest.mark.slow


def test_server_log_has_no_missing_modules(pinned_server):
    """make setup installs ComfyUI's own optional requirements (requirements-dev.txt), so the test server's
    log opens without import tracebacks; torchaudio alone is left out (no release matches torch 2.14.1)."""
    log = json.load(urllib.request.urlopen(pinned_server + "/internal/logs/raw", timeout=30))
    text = "\n".join(entry["m"] for entry in log["entries"])
    missing = set(re.findall(r"No module named '([\w.]+)'", text))
    # PyOpenGL (ComfyUI 0.30's requirement, via comfy-angle) notes at INFO that its optional C speed-up, in no
    # ComfyUI requirements file, is absent: "No OpenGL_accelerate module loaded: No module named ..."
    optional = set(re.findall(r"No (\w+) module loaded: No module named '\1'", text))
    assert missing - optional <= {"torchaudio"}, f"ComfyUI's log names missing modules: {sorted(missing - optional)}"


def test_shipped_workflows_load_in_the_frontend_as_our_converter_reads_them(pinned_server, browser):
    """Each shipped workflow loads in the real frontend, and the prompt the frontend builds from it is
    the one tools/common/workflows.py's ui_to_api (used by the server test and the demo) builds."""
    from tools.common.workflows import ui_to_api

    url = pinned_server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    page, page_errors = open_app(browser, url)
    folder = ROOT / "example_workflows" if (ROOT / "example_workflows").is_dir() else ROOT / "workflows"
    files = sorted(folder.glob("*.json"))
    assert len(files) >= 5
    for path in files:
        workflow = json.loads(path.read_text())
        output = page.evaluate(
            """async (workflow) => {
            await app.loadGraphData(workflow, true, true, "test");
            return (await app.graphToPrompt()).output;
        }""",
            workflow,
        )
        frontend = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in output.items()}
        assert frontend == ui_to_api(workflow, info), path.name
    assert not page_errors, page_errors
    page.close()
