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


@pytest.fixture(scope="session")
def tiny_comfy_models(tmp_path_factory):
    """tools/demo.py's random-weight model set (4.5 GB), built once per test run.

    Returns a function that makes a fresh ComfyUI base folder: ``models/<kind>/`` are its own
    folders holding links to the shared files, so what a test saves there (e.g. Save
    Identity into models/withanyone/identities) stays in its base; ``input`` holds a copy
    of the demo's photo."""
    import shutil

    from demo import build_tiny_models

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
def _collect_garbage_after_each_test():
    """Each test's garbage is collected in the process that made it. A later test that forks (DataLoader
    workers) would otherwise hand the children unreachable onnxruntime sessions, and a child that collects
    one blocks forever in its destructor (its thread pool lives only in the parent)."""
    yield
    import gc

    gc.collect()
