"""Write the example workflows in ``example_workflows/`` from their specs (``tools/common/workflow_specs.py``).

    python -m dev.build_workflows          # starts a ComfyUI with the pack for /object_info

Built on another ComfyUI, a file that differs only in unlinked outputs of output nodes
(``workflows.version_neutral``) is kept as it is.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tools.common.comfy_server import ComfyServer
from tools.common.workflow_specs import WORKFLOWS_DIR, build_all, dumps, thumbnail
from tools.common.workflows import thumbnail_jpeg, version_neutral


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = server.get_json("/object_info")
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    built = build_all(info)
    for stale in sorted(WORKFLOWS_DIR.glob("*.json")) + sorted(WORKFLOWS_DIR.glob("*.jpg")):
        if stale.stem not in built:
            stale.unlink()
            logging.info("removed %s (no spec of that name)", stale.name)
    for name, workflow in built.items():
        path = WORKFLOWS_DIR / f"{name}.json"
        if path.is_file() and version_neutral(json.loads(path.read_text(encoding="utf-8")), info) == version_neutral(
            workflow, info
        ):
            workflow = json.loads(path.read_text(encoding="utf-8"))  # only sockets this ComfyUI adds differ: kept
        path.write_text(dumps(workflow), encoding="utf-8")
        (WORKFLOWS_DIR / f"{name}.jpg").write_bytes(thumbnail_jpeg(thumbnail(name, workflow)))
        logging.info("wrote example_workflows/%s.json and .jpg", name)


if __name__ == "__main__":
    main()
