"""Fixtures of the browser tests: one ComfyUI server per frontend and one Chromium, shared by the package.

One server boot per frontend: the frontend ComfyUI 0.3.75 pins (comfyui-frontend-package in
requirements-dev.txt) and the newest one on PyPI (LATEST_FRONTEND, installed on demand into
.cache/frontend-<version>/ and served with ComfyUI's own --front-end-root).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from support.comfy_env import ROOT, import_comfyui, import_pack
from support.needs import missing, pip_install_into
from tools.common.comfy_server import ComfyServer

from .pages import CHROMIUM, CHROMIUM_ARGS, FRONTENDS, LATEST_FRONTEND, PHOTO_COLORS, PINNED_FRONTEND


def pytest_generate_tests(metafunc):
    """These tests face ComfyUI as tests/conftest.py's COMFY_FACING modules do: the id names the ComfyUI version
    the process runs ("[comfyui-0.3.75]"), and `make test` runs them on every ComfyUI in tools/common/get_comfyui.py."""
    from support.comfy_env import comfyui_dir
    from tools.common.get_comfyui import tree_version

    version = tree_version(comfyui_dir())
    metafunc.parametrize("comfyui", [version], ids=[f"comfyui-{version}"], scope="session")


def _frontend_root(version: str) -> Path | None:
    """The static folder of comfyui-frontend-package ``version`` (None: the one installed in the venv)."""
    if version == PINNED_FRONTEND:
        return None
    target = ROOT / ".cache" / f"frontend-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        shutil.rmtree(target, ignore_errors=True)
        # a folder of its own: the venv keeps the frontend ComfyUI 0.3.75 pins
        error = pip_install_into(target, f"comfyui-frontend-package=={version}")
        if error or not (static / "index.html").is_file():
            missing(f"comfyui-frontend-package=={version} could not be installed: {error}")
    return static


@pytest.fixture(scope="package")
def layout_module():
    """withanyone_core.layout as the server's route and the node import it: the single source of the boxes."""
    import_comfyui()
    import_pack()
    return importlib.import_module("withanyone_core.layout")


@pytest.fixture(scope="package")
def servers(tmp_path_factory):
    """Boots one ComfyUI server per frontend version on first use; all stop after the last test of tests/web."""
    booted = {}
    with contextlib.ExitStack() as stack:

        def get(version: str) -> tuple[str, str]:
            if version not in booted:
                root = _frontend_root(version)
                base = tmp_path_factory.mktemp(f"comfy_web_{version}")
                # a returning user: no template browser over the canvas on the first page load
                settings = base / "user" / "default" / "comfy.settings.json"
                settings.parent.mkdir(parents=True)
                settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
                _write_photos(base / "input")
                extra = ("--front-end-root", str(root)) if root else ()
                comfy = stack.enter_context(ComfyServer(base, extra_args=extra))
                registered = json.load(urllib.request.urlopen(comfy.url + "/object_info/WithAnyoneLayout", timeout=60))
                assert registered, "the pack's nodes did not load:\n" + comfy.log_tail()
                booted[version] = (comfy.url, version)
            return booted[version]

        yield get


@pytest.fixture(params=FRONTENDS, ids=lambda v: f"frontend-{v}")
def server(request, servers):
    """(url, frontend version), for the tests that run on every frontend."""
    return servers(request.param)


@pytest.fixture
def latest_server(servers):
    """The server with the newest frontend."""
    return servers(LATEST_FRONTEND)[0]


@pytest.fixture
def pinned_server(servers):
    """The server with the frontend ComfyUI 0.3.75 pins, for what does not depend on the frontend."""
    return servers(PINNED_FRONTEND)[0]


def _write_photos(folder: Path) -> None:
    """Two flat-colour "photos" in the server's input/ folder: the layout photo and a generated image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, color in PHOTO_COLORS.items():
        Image.new("RGB", (768, 768), color).save(folder / name)


@pytest.fixture(scope="package")
def browser():
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
