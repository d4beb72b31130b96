"""Generate MultiID-Bench outputs with the pack through a running ComfyUI, ready for bench_eval.

    python -m tools.bench_run BENCH --out RESULTS --server http://127.0.0.1:8188
    python -m withanyone_core.bench_eval RESULTS --insightface ComfyUI/models/insightface

BENCH holds one folder per sample: ``ori.jpg`` (the ground truth), ``ref_1.jpg`` ..
(or the authors' ``ref_0.jpg`` ..) and ``meta.json`` with ``prompt`` and ``bboxes`` (the
ground-truth face boxes ``[x1, y1, x2, y2]`` in ``ori.jpg`` pixels, in person order; without
them, ``--insightface ROOT`` finds the faces in ``ori.jpg`` and matches them to the references).
BENCH may also be an index the authors' ``MultiID-Bench/hf2bench.py`` writes from the Hugging
Face dataset (``p1.json``, ``p2.json``, ``p3.json``) with ``--data-root`` its image folder
(``p1/untar`` ..), as their ``infer_withanyone.py`` takes it.

For each sample the shipped workflow (``WithAnyone - one person.json`` for one person,
``WithAnyone - four people, typed boxes.json`` for more) is converted to ComfyUI's API format
against the server's own ``/object_info``, and its inputs are set by node type: the reference
photos (uploaded), the prompt, a text layout of the ground-truth boxes, the seed. The image
is written to ``RESULTS/<sample>/out.jpg`` beside copies of ``ori.jpg``, the references and
``meta.json``. Samples whose ``out.jpg`` exists are skipped (``--overwrite`` redoes them).

Output size: the authors' batch script renders 512 x 512 from a square crop of the ground
truth that keeps every face (at a random offset); here the crop is the square centred on the
faces (deterministic), and the boxes are mapped through it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from tools.common.comfy_server import ComfyServer, PromptRejected, execution_error
from tools.common.get_comfyui import ROOT
from tools.common.workflows import check_api, ui_to_api

logger = logging.getLogger("withanyone.bench_run")

WORKFLOWS = {
    1: ROOT / "example_workflows" / "WithAnyone - one person.json",
    4: ROOT / "example_workflows" / "WithAnyone - four people, typed boxes.json",
}
UPLOAD_FOLDER = "withanyone_bench"


# --------------------------------------------------------------------------- boxes
def square_crop(width: int, height: int, boxes: list[list[float]]) -> tuple[float, float, float]:
    """(x0, y0, side) of the square of side min(width, height) centred on the faces, inside the image."""
    side = min(width, height)
    cx = (min(b[0] for b in boxes) + max(b[2] for b in boxes)) / 2
    cy = (min(b[1] for b in boxes) + max(b[3] for b in boxes)) / 2
    x0 = min(max(cx - side / 2, 0), width - side)
    y0 = min(max(cy - side / 2, 0), height - side)
    return x0, y0, side


def output_boxes(width: int, height: int, boxes: list[list[float]], size: int) -> list[list[int]]:
    """The ground-truth boxes in the pixels of the ``size`` x ``size`` output."""
    x0, y0, side = square_crop(width, height, boxes)
    scale = size / side
    out = []
    for x1, y1, x2, y2 in boxes:
        clipped = [
            min(max((x1 - x0) * scale, 0), size),
            min(max((y1 - y0) * scale, 0), size),
            min(max((x2 - x0) * scale, 0), size),
            min(max((y2 - y0) * scale, 0), size),
        ]
        if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
            raise ValueError(f"face box {[x1, y1, x2, y2]} falls outside the square crop of the ground truth")
        out.append([round(v) for v in clipped])
    return out


def ground_truth_boxes(sample, face_model=None) -> list[list[float]]:
    boxes = sample.meta.get("bboxes")
    if isinstance(boxes, str):
        boxes = json.loads(boxes)
    if boxes:
        if len(boxes) != sample.persons:
            raise ValueError(f"{sample.name}: meta.json has {len(boxes)} boxes for {sample.persons} reference photos")
        return [[float(v) for v in b[:4]] for b in boxes]
    if face_model is None:
        raise ValueError(
            f"{sample.name}: meta.json has no 'bboxes'; add them or pass --insightface ROOT to take "
            "them from the faces of ori.jpg"
        )
    return _detected_boxes(sample, face_model)


def _detected_boxes(sample, face_model) -> list[list[float]]:
    """The ground truth's faces assigned to the references by ArcFace similarity (Hungarian)."""
    import numpy as np

    from withanyone_core.faces import load_image
    from withanyone_core.metrics import match_faces

    truth = load_image(sample.ground_truth)
    faces = face_model.analyzer.detect(truth)
    face_model.analyzer.embed(truth, faces)
    refs = [face_model.reference(load_image(p)) for p in sample.refs]
    if any(r is None for r in refs) or len(faces) < sample.persons:
        raise ValueError(
            f"{sample.name}: {len(faces)} face(s) in ori.jpg for {sample.persons} references "
            "(or a reference without a face); give meta.json 'bboxes'"
        )
    pairs = dict(match_faces(np.array([f.embedding for f in faces]), np.stack(refs)))
    return [[float(v) for v in faces[pairs[k]].bbox] for k in range(sample.persons)]


# --------------------------------------------------------------------------- the graph
def _of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def _one(prompt: dict, class_types: tuple[str, ...], what: str) -> str:
    found = [nid for t in class_types for nid in _of(prompt, t)]
    if len(found) != 1:
        raise ValueError(f"the workflow needs exactly one {what} ({' or '.join(class_types)}), found {len(found)}")
    return found[0]


def _upstream(prompt: dict, node_id: str, name: str, class_type: str) -> str:
    """Follow input ``name`` (then each node's first linked input) up to a node of ``class_type``."""
    link = prompt[node_id]["inputs"].get(name)
    seen = set()
    while isinstance(link, list) and link[0] not in seen:
        seen.add(link[0])
        node = prompt[link[0]]
        if node["class_type"] == class_type:
            return link[0]
        link = next((v for v in node["inputs"].values() if isinstance(v, list)), None)
    raise ValueError(f"node {node_id} ({prompt[node_id]['class_type']}).{name} does not lead to a {class_type}")


def _prune(prompt: dict) -> dict:
    """Drop preview nodes and every node no output (SaveImage) depends on."""
    keep, todo = set(), _of(prompt, "SaveImage")
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        todo += [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
    return {nid: node for nid, node in prompt.items() if nid in keep}


def workflow_versions(path: Path, object_info: dict):
    """(label, UI workflow): the file itself, then, for a shipped workflow, the same graph rebuilt from
    its spec in dev/build_workflows.py against the server's nodes (for a file older than the nodes)."""
    yield path.name, json.loads(Path(path).read_text())
    from tools.common.workflow_specs import BUILDERS

    if path.stem in BUILDERS and path.resolve().parent == (ROOT / "example_workflows"):
        label = f"{path.name} rebuilt from dev/build_workflows.py"
        try:
            yield label, BUILDERS[path.stem](object_info)
        except (KeyError, ValueError) as exc:  # the spec is older than the nodes too
            yield label, {"error": str(exc)}


def build_prompt(
    workflow: dict,
    object_info: dict,
    *,
    prompt_text: str,
    ref_images: list[str],
    boxes: list[list[int]],
    size: int,
    seed: int,
    prefix: str,
    settings: dict,
) -> dict:
    """The API prompt of ``workflow`` for one sample, with inputs set by node type (not by node id)."""
    prompt = ui_to_api(workflow, object_info)
    encode = _one(prompt, ("WithAnyoneIdentityEncode",), "identity encoder")
    slots = [f"person_{k}" for k in range(1, 5) if isinstance(prompt[encode]["inputs"].get(f"person_{k}"), list)]
    if len(slots) < len(ref_images):
        raise ValueError(f"the workflow encodes {len(slots)} person(s), the sample has {len(ref_images)}")
    for k, slot in enumerate(slots):
        if k >= len(ref_images):
            del prompt[encode]["inputs"][slot]
            continue
        loader = _upstream(prompt, encode, slot, "LoadImage")
        prompt[loader]["inputs"]["image"] = ref_images[k]
        extract = prompt[encode]["inputs"][slot][0]
        if settings.get("min_face_size") is not None and prompt[extract]["class_type"] == "WithAnyoneFaceExtract":
            prompt[extract]["inputs"]["min_face_size"] = settings["min_face_size"]
    layout = prompt[_one(prompt, ("WithAnyoneLayout",), "layout")]["inputs"]
    layout.update(
        width=size,
        height=size,
        source="text",
        people=len(boxes),
        boxes="\n".join(",".join(str(v) for v in b) for b in boxes),
    )
    sampler_id = _one(prompt, ("WithAnyoneSampler", "KSampler"), "sampler")
    sampler = prompt[sampler_id]["inputs"]
    sampler["seed"] = seed
    if settings.get("steps"):
        sampler["steps"] = settings["steps"]
    if settings.get("siglip_share") is not None:  # on the sampler or on Apply WithAnyone, whichever the graph has
        for nid in _of(prompt, "WithAnyoneSampler") + _of(prompt, "WithAnyoneApply"):
            if "siglip_share" in prompt[nid]["inputs"]:
                prompt[nid]["inputs"]["siglip_share"] = settings["siglip_share"]
    if "batch_size" in sampler:
        sampler["batch_size"] = 1
    prompt[_upstream(prompt, sampler_id, "positive", "CLIPTextEncode")]["inputs"]["text"] = prompt_text
    for latent in _of(prompt, "EmptySD3LatentImage") + _of(prompt, "EmptyLatentImage"):
        prompt[latent]["inputs"].update(width=size, height=size, batch_size=1)
    prompt = _prune(prompt)
    save = _one(prompt, ("SaveImage",), "SaveImage")
    prompt[save]["inputs"]["filename_prefix"] = prefix
    _set_models(prompt, settings)
    return prompt


def _set_models(prompt: dict, settings: dict) -> None:
    names = {
        ("UNETLoader", "unet_name"): settings.get("unet"),
        ("VAELoader", "vae_name"): settings.get("vae"),
        ("WithAnyoneAdapterLoader", "adapter_name"): settings.get("adapter"),
        ("WithAnyoneSiglipLoader", "siglip_name"): settings.get("siglip"),
        ("DualCLIPLoader", "clip_name1"): settings.get("clip_l"),
        ("DualCLIPLoader", "clip_name2"): settings.get("t5"),
    }
    for (class_type, field), value in names.items():
        for nid in _of(prompt, class_type):
            if value:
                prompt[nid]["inputs"][field] = value
    if settings.get("clip_l_only"):  # one CLIP-L text encoder instead of CLIP-L + T5-XXL (smoke runs)
        for nid in _of(prompt, "DualCLIPLoader"):
            prompt[nid] = {
                "class_type": "CLIPLoader",
                "inputs": {"clip_name": settings["clip_l_only"], "type": "stable_diffusion", "device": "default"},
            }


# --------------------------------------------------------------------------- the run
def run_sample(server: ComfyServer, object_info: dict, sample, out_dir: Path, args, face_model=None) -> Path:
    from PIL import Image

    from withanyone_core.faces import load_image

    if "error" in sample.meta:
        raise ValueError(sample.meta["error"])
    if sample.ground_truth is None or not sample.refs:
        raise ValueError(f"{sample.name}: needs ori.jpg and ref_1.jpg (or ref_0.jpg)")
    if sample.persons > 4:
        raise ValueError(f"{sample.name}: {sample.persons} references; the pack takes 1-4 people")
    truth = load_image(sample.ground_truth)
    boxes = output_boxes(truth.shape[1], truth.shape[0], ground_truth_boxes(sample, face_model), args.size)
    # top level of input/: LoadImage lists those files (a subfolder would validate on the server but not in its list)
    refs = [server.upload_image(p, f"{UPLOAD_FOLDER}_{sample.name}_{p.name}") for p in sample.refs]
    workflow_path = Path(args.workflow or WORKFLOWS[1 if sample.persons == 1 else 4])
    object_info = {**object_info, "LoadImage": server.get_json("/object_info/LoadImage")["LoadImage"]}
    attempts = []
    for label, workflow in workflow_versions(workflow_path, object_info):
        try:
            if "error" in workflow:
                raise ValueError(workflow["error"])
            prompt = build_prompt(
                workflow,
                object_info,
                prompt_text=sample.prompt,
                ref_images=refs,
                boxes=boxes,
                size=args.size,
                seed=args.seed,
                prefix=f"{UPLOAD_FOLDER}/{sample.name}",
                settings=vars(args),
            )
            problems = check_api(prompt, object_info)
        except (ValueError, KeyError) as exc:
            problems = [str(exc)]
        if not problems:
            if attempts:
                logger.warning(
                    "%s does not match the installed nodes (%s); used %s", workflow_path.name, attempts[0][1][0], label
                )
            break
        attempts.append((label, problems))
    else:
        raise SystemExit(
            "the graph would be rejected (model file names? see --unet/--vae/--adapter/...):\n"
            + "\n".join(f"  {label}:\n    " + "\n    ".join(problems) for label, problems in attempts)
        )
    try:
        entry = server.run(prompt, timeout=args.timeout)
    except PromptRejected as err:
        raise SystemExit(f"ComfyUI rejected the graph for {sample.name}:\n{err}") from None
    error = execution_error(entry)
    if error:
        raise RuntimeError(f"{sample.name}: {error}")
    images = [
        img for out in entry.get("outputs", {}).values() for img in out.get("images", []) if img.get("type") == "output"
    ]
    if not images:
        raise RuntimeError(f"{sample.name}: the graph ran but saved no image")
    target = out_dir / sample.name
    target.mkdir(parents=True, exist_ok=True)
    # the evaluation's layout, whatever the input named them (an hf2bench index: 0001.jpg, 0001_1.jpg, ..)
    shutil.copy(sample.ground_truth, target / f"ori{sample.ground_truth.suffix}")
    for k, path in enumerate(sample.refs, 1):
        shutil.copy(path, target / f"ref_{k}{path.suffix}")
    meta = {
        **sample.meta,
        "prompt": sample.prompt,
        "bench_run": {"seed": args.seed, "size": args.size, "boxes": boxes, "workflow": workflow_path.name},
    }
    (target / "meta.json").write_text(json.dumps(meta, indent=1))
    import io

    image = Image.open(io.BytesIO(server.download_image(images[0]))).convert("RGB")
    partial = target / "out.partial.jpg"
    image.save(partial, quality=args.jpeg_quality)  # PIL's default 75, as the authors' out.jpg
    partial.replace(target / "out.jpg")  # out.jpg appears complete or not at all (resume)
    return target / "out.jpg"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "bench",
        type=Path,
        help="MultiID-Bench folder (one folder per sample), or an hf2bench index (p1.json / p2.json / p3.json)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        help="with an index: the folder its paths are relative to (default: the index's folder)",
    )
    p.add_argument("--out", type=Path, required=True, help="results folder (one folder per sample)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="URL of a running ComfyUI with the pack")
    p.add_argument("--workflow", type=Path, help="a workflow of the same shape to use instead of the shipped ones")
    p.add_argument("--seed", type=int, default=1234, help="one seed for every sample (the authors' default)")
    p.add_argument("--size", type=int, default=512, help="output side (the authors' batch script: 512)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflow's)")
    p.add_argument(
        "--siglip-share", type=float, help="the authors' similarity slider, 0 = ArcFace only (default: the workflow's)"
    )
    p.add_argument("--limit", type=int, help="only the first N samples (sorted by name)")
    p.add_argument("--overwrite", action="store_true", help="generate again where out.jpg exists")
    p.add_argument("--jpeg-quality", type=int, default=75)
    p.add_argument("--insightface", type=Path, help="insightface root: find GT boxes when meta.json has none")
    for name, what in (
        ("unet", "FLUX.1-dev"),
        ("vae", "VAE"),
        ("adapter", "WithAnyone adapter"),
        ("siglip", "SigLIP folder"),
        ("clip-l", "CLIP-L"),
        ("t5", "T5-XXL"),
    ):
        p.add_argument(f"--{name}", help=f"{what} file name on the server (default: the workflow's)")
    p.add_argument("--clip-l-only", help="a CLIP-L file to use alone instead of CLIP-L + T5-XXL (smoke runs)")
    p.add_argument("--min-face-size", type=int, help="Face Extract's minimum face size (default: the workflow's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per image")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    from withanyone_core.bench.samples import list_samples, samples_from_index

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 256 <= args.size <= 4096 or args.size % 16:
        parser.error("--size must be a multiple of 16 between 256 and 4096 (the layout node's range)")
    if args.bench.is_file():
        samples = samples_from_index(args.bench, args.data_root)[: args.limit]
    else:
        samples = list_samples(args.bench)[: args.limit]
    face_model = None
    if args.insightface:
        from withanyone_core.bench.faces import InsightFaceModel

        face_model = InsightFaceModel(args.insightface, "antelopev2")
    server = ComfyServer.connect(args.server)
    try:
        object_info = server.get_json("/object_info")
    except OSError as exc:
        raise SystemExit(f"no ComfyUI answers at {args.server} ({exc}); start it with the pack installed") from None
    if "WithAnyoneSampler" not in object_info:
        raise SystemExit(f"the ComfyUI at {args.server} does not have the WithAnyone nodes; install the pack")
    try:
        from tqdm import tqdm
    except ImportError:

        def tqdm(it, **_):
            return it

    done, failed = [], {}
    for sample in tqdm(samples, desc="generating", unit="sample"):
        if (args.out / sample.name / "out.jpg").is_file() and not args.overwrite:
            done.append(args.out / sample.name / "out.jpg")
            continue
        try:
            done.append(run_sample(server, object_info, sample, args.out, args, face_model))
        except (ValueError, RuntimeError) as exc:
            failed[sample.name] = str(exc)
            logger.warning("%s", exc)
    logger.info(
        "%d of %d samples have out.jpg in %s%s",
        len(done),
        len(samples),
        args.out,
        f"; failed: {json.dumps(failed, indent=1)}" if failed else "",
    )
    return done


if __name__ == "__main__":
    main()
