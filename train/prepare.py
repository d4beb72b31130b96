"""Build a training manifest from a folder of photos.

    python train/prepare.py --images PHOTOS --out DATA --antelopev2 MODELS_ROOT

- Photos: ``*.jpg|jpeg|png|webp|bmp`` anywhere under ``--images``; a caption next to each
  photo as ``<name>.txt`` (missing captions are counted and left empty). Read upright (EXIF
  orientation applied), any colour mode to RGB; a photo above ``--max-image-pixels`` is skipped
  and named. ``--out`` (and any earlier output folder: it holds ``.withanyone-prepare-output``)
  is never read as photos, even when it lies inside ``--images``.
- Identities: photos in per-person subfolders (``PHOTOS/alice/*.jpg``) give their largest
  face that person's identity; every other face is grouped by clustering the normalised
  ArcFace embeddings (cosine >= ``--cluster-threshold``, single linkage), joining a named
  identity when it is close enough to that person's mean embedding. Two faces of one
  photo never become one identity (cannot-link). The similarity search is exact up to
  50,000 unnamed faces and uses a faiss index above when faiss is installed
  (``--cluster-index``; see train/clustering.py).
- Output in ``--out``: ``manifest.jsonl`` (see train/data.py), ``identities.json``
  (identity -> occurrences [record, person] and the chosen reference face: its largest one),
  ``negatives.safetensors`` (the negative pool for the ID-contrastive loss) and
  ``summary.json``. ``--format multiid2m`` adds ``multiid2m/`` in the released MultiID-2M
  layout (``train/re_*.tar``, ``ref/untar/<name>/``, ``ref/cluster_centers/``,
  ``landmarks/``), which ``data.source: multiid2m`` trains on (see train/data/multiid2m/).
- Resumable: each photo's detections are appended to ``faces.partial.jsonl`` as soon as
  they are computed (flushed and fsynced); a rerun skips photos already there, and a
  half-written last line from an interrupted run is cut off. Each shard and each chunk of
  identities' references leaves a marker in ``multiid2m/progress/`` once written; a rerun
  skips those whose inputs are unchanged.
- ``--ray``: the same stages on Ray (train/prepare_ray.py), the same output byte for byte.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:  # python train/prepare.py
    import _script

    _script.run_as_module("prepare")

from train.clustering import EXACT_BELOW, ClusterSearch, assign_identities  # noqa: E402
from train.config import AT_LEAST_1, COSINE, NON_NEGATIVE, Range, number_arg  # noqa: E402
from train.data import IdentityIndex, Manifest, NegativePool, parse_record  # noqa: E402
from train.prepare_photos import IMAGE_SUFFIXES, OUTPUT_MARKER, PARTIAL, detect_all, find_photos  # noqa: E402,F401
from withanyone_core.faces.images import DEFAULT_MAX_PIXELS  # noqa: E402

logger = logging.getLogger("withanyone.prepare")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file, fsync it, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_outputs(
    entries: dict[str, dict],
    images_root: Path,
    out: Path,
    threshold: float,
    search: ClusterSearch | None = None,
    map_blocks=None,
) -> dict:
    labels = assign_identities(entries, threshold, search or ClusterSearch(), map_blocks)
    records, skipped, missing_captions = [], [], 0
    for rel, entry in sorted(entries.items()):
        if entry["error"]:
            skipped.append({"image": rel, "reason": entry["error"]})
            continue
        if not entry["faces"]:
            skipped.append({"image": rel, "reason": "no face found"})
            continue
        caption_path = (images_root / rel).with_suffix(".txt")
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        missing_captions += not caption_path.is_file()
        faces = sorted(enumerate(entry["faces"]), key=lambda f: f[1]["box"][0])  # left to right
        raw = {
            "image": os.path.relpath(images_root / rel, out),
            "caption": caption,
            "width": entry["width"],
            "height": entry["height"],
            "quality": round(float(np.mean([f["score"] for _, f in faces])), 4),
            "persons": [
                {
                    "identity": labels[(rel, i)],
                    "box": f["box"],
                    "landmarks": f["landmarks"],
                    "embedding": f["embedding"],
                }
                for i, f in faces
            ],
        }
        records.append(parse_record(raw, rel))
    if not records:
        raise SystemExit("no photo with a usable face was found; check --images and the antelopev2 models")
    manifest = Manifest(records, out)
    manifest.save(out / "manifest.jsonl")
    index = IdentityIndex(manifest)
    identities = {}
    for name, occurrences in index.occurrences.items():
        best = max(occurrences, key=lambda o: _face_area(manifest, o))
        identities[name] = {"occurrences": occurrences, "reference": list(best)}
    write_atomic(out / "identities.json", json.dumps(identities, indent=1))
    NegativePool.from_manifest(manifest, index).save(out / "negatives.safetensors")
    summary = {
        "photos": len(entries),
        "records": len(records),
        "faces": sum(len(r.persons) for r in records),
        "identities": len(index),
        "missing_captions": missing_captions,
        "skipped": skipped,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _face_area(manifest: Manifest, occurrence: tuple[int, int]) -> float:
    person = manifest.records[occurrence[0]].persons[occurrence[1]]
    x1, y1, x2, y2 = person.box
    return (x2 - x1) * (y2 - y1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of photos (+ .txt captions)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for manifest.jsonl and friends")
    parser.add_argument(
        "--antelopev2",
        type=Path,
        required=True,
        help="insightface models root holding models/antelopev2/ (e.g. ComfyUI/models/insightface)",
    )
    parser.add_argument("--providers", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--det-thresh", type=number_arg(float, Range(gt=0, le=1)), default=0.4)
    parser.add_argument("--det-size", type=number_arg(int, Range(ge=32, multiple_of=32)), default=640)
    parser.add_argument(
        "--min-face", type=number_arg(int, NON_NEGATIVE), default=32, help="ignore faces smaller than this many pixels"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=number_arg(int, NON_NEGATIVE),
        default=DEFAULT_MAX_PIXELS,
        metavar="PIXELS",
        help="photos with more pixels are skipped, named in the log and summary.json (a decompression "
        f"bomb, a huge scan); default {DEFAULT_MAX_PIXELS} (150 megapixels), 0 = no limit",
    )
    parser.add_argument(
        "--cluster-threshold",
        type=number_arg(float, COSINE),
        default=0.5,
        help="cosine similarity that joins two faces into one identity",
    )
    parser.add_argument(
        "--cluster-index",
        choices=["auto", "exact", "faiss"],
        default="auto",
        help="how similar faces are found: exact search, or a faiss IVF index (pip install faiss-cpu); "
        f"auto = exact up to {EXACT_BELOW} unnamed faces, faiss above when installed",
    )
    parser.add_argument(
        "--cluster-nprobe",
        type=number_arg(int, AT_LEAST_1),
        default=ClusterSearch.nprobe,
        help="faiss: index cells searched per face (more = closer to exact, slower)",
    )
    parser.add_argument(
        "--cluster-cells",
        type=number_arg(int, NON_NEGATIVE),
        default=0,
        help="faiss: index cells (0 = about 4 sqrt(faces))",
    )
    parser.add_argument(
        "--format",
        choices=["manifest", "multiid2m"],
        default="manifest",
        help="multiid2m: also write OUT/multiid2m/ in the released MultiID-2M layout (train/re_*.tar, "
        "ref/untar/<name>/, ref/cluster_centers/, landmarks/); the manifest is always written",
    )
    parser.add_argument(
        "--shard-size",
        type=number_arg(int, AT_LEAST_1),
        default=1000,
        help="photos per .tar shard (--format multiid2m)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run detection/embedding as a Ray Data actor pool and write shards as Ray tasks: "
        "local (default) or a ray:// cluster address; same output as without",
    )
    parser.add_argument(
        "--ray-actors",
        type=number_arg(int, NON_NEGATIVE),
        default=0,
        help="detector actors (0 = one per GPU when Ray sees GPUs, else one per 2 CPUs)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    if args.max_image_pixels < 0:
        parser.error(f"--max-image-pixels must be >= 0 (0 = no limit), got {args.max_image_pixels}")
    if args.images.resolve() == args.out.resolve():
        parser.error(
            f"--out {args.out} is the --images folder: give an output folder of its own (e.g. {args.out}/data "
            "is fine, it is never read as photos)"
        )
    from withanyone_core.faces import FaceAnalyzer

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / OUTPUT_MARKER).write_text("written by train/prepare.py: this folder is never read as photos\n")
    photos = find_photos(args.images, exclude=args.out)
    if not photos:
        parser.error(f"no photos ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.images}")
    analyzer_kwargs = {"providers": args.providers, "det_thresh": args.det_thresh, "det_size": args.det_size}
    try:
        search = ClusterSearch(args.cluster_index, nprobe=args.cluster_nprobe, cells=args.cluster_cells)
    except ValueError as exc:
        parser.error(str(exc))
    shard_map = block_map = None
    if args.ray is not None:
        from train import prepare_ray

        prepare_ray.start(args.ray)
        analyzer, analyse_many = (
            None,
            prepare_ray.detector_pool(
                args.antelopev2, analyzer_kwargs, args.min_face, args.ray_actors, args.max_image_pixels
            ),
        )
        shard_map, block_map = prepare_ray.parallel_map, prepare_ray.block_map
    else:
        analyzer, analyse_many = FaceAnalyzer(args.antelopev2, **analyzer_kwargs), None
    entries = detect_all(photos, args.images, args.out, analyzer, args.min_face, analyse_many, args.max_image_pixels)
    summary = build_outputs(entries, args.images, args.out, args.cluster_threshold, search, block_map)
    if args.format == "multiid2m":
        from train.data.multiid2m.write import write_multiid2m

        summary["multiid2m"] = write_multiid2m(
            Manifest.load(args.out / "manifest.jsonl"),
            args.out / "multiid2m",
            per_shard=args.shard_size,
            shard_map=shard_map,
        )
        write_atomic(args.out / "summary.json", json.dumps(summary, indent=1))
        logger.info(
            "MultiID-2M layout: %d shard(s) in %s, references and cluster centres in %s",
            len(summary["multiid2m"]["shards"]),
            args.out / "multiid2m" / "train",
            summary["multiid2m"]["refs"],
        )
    logger.info(
        "done: %d photos, %d usable, %d faces, %d identities, %d skipped, %d without caption",
        summary["photos"],
        summary["records"],
        summary["faces"],
        summary["identities"],
        len(summary["skipped"]),
        summary["missing_captions"],
    )
    return summary


if __name__ == "__main__":
    main()
