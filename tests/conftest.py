import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("PIL").setLevel(logging.INFO)

# The ComfyUI-facing test modules: `make test` runs them on every ComfyUI in tools/common/get_comfyui.py (one
# process per ComfyUI: its modules are process-global once imported), and their test ids name the ComfyUI
# version the process runs ("[comfyui-0.3.75]", "[case-comfyui-0.30.0]").
COMFY_FACING = (
    "test_e2e_golden",
    "test_kontext_golden",
    "test_comfy_host",
    "test_comfy_patch",
    "test_nodes",
    "test_comfy_server",
    "test_workflow_runs",
    "test_web",
)


@pytest.fixture(scope="session", autouse=True)
def comfyui(request):
    """The ComfyUI version a ComfyUI-facing test runs on (None elsewhere): pytest_generate_tests puts it in the id."""
    return getattr(request, "param", None)


def _running_comfyui_version() -> str:
    from support.comfy_env import comfyui_dir
    from tools.common.get_comfyui import tree_version

    return tree_version(comfyui_dir())


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rpartition(".")[2] in COMFY_FACING:
        version = _running_comfyui_version()
        metafunc.parametrize("comfyui", [version], ids=[f"comfyui-{version}"], scope="session")


def pytest_sessionfinish(session, exitstatus):
    """Release the models ComfyUI still holds while its modules are alive: a ModelPatcher collected at interpreter
    exit runs detach() against torn-down modules and prints an ON_DETACH traceback."""
    if "comfy.model_management" in sys.modules:
        from support.comfy_env import release_comfy_models

        release_comfy_models()


@pytest.fixture(scope="session")
def tiny_comfy_models(tmp_path_factory):
    """tools/demo.py's random-weight model set (4.5 GB), built once per test run.

    Returns a function that makes a fresh ComfyUI base folder: ``models/<kind>/`` are its own
    folders holding links to the shared files, so what a test saves there (e.g. Save
    Identity into models/withanyone/identities) stays in its base; ``input`` holds a copy
    of the demo's photo."""
    import shutil

    from tools.demo import build_tiny_models

    shared = tmp_path_factory.mktemp("tiny-comfy-models")
    build_tiny_models(shared)

    def new_base(base: Path) -> Path:
        (base / "models").mkdir(parents=True)
        for kind in (shared / "models").iterdir():
            if kind.is_dir():
                (base / "models" / kind.name).mkdir(parents=True)
                for entry in kind.iterdir():
                    (base / "models" / kind.name / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
            else:  # the set's version marker
                shutil.copy(kind, base / "models" / kind.name)
        shutil.copytree(shared / "input", base / "input")
        return base

    return new_base


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """What one test leaves in the process does not reach the next.

    - Its garbage is collected here: a later test that forks (DataLoader workers) would otherwise hand the
      children unreachable onnxruntime sessions, and a child that collects one blocks forever in its
      destructor (its thread pool lives only in the parent).
    - accelerate's process-wide state is reset: it keeps the first trainer's mixed precision, and a later
      in-process run asking for another one is refused."""
    yield
    import gc

    gc.collect()
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
