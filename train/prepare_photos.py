"""prepare.py's first stage: which photos, and each photo's faces (box, landmarks, score, ArcFace embedding).

Used by prepare.py's command line and by the Ray detector actors (train/prepare_ray.py); it imports
neither. Each photo's detections are appended to ``faces.partial.jsonl`` as soon as they are computed
(flushed and fsynced); a rerun skips the photos already there, and a half-written last line from an
interrupted run is cut off.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from train.data import load_rgb

logger = logging.getLogger("withanyone.prepare")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
PARTIAL = "faces.partial.jsonl"
# left in every --out folder: a folder holding it is prepare's output, never read as photos
OUTPUT_MARKER = ".withanyone-prepare-output"


def find_photos(root: Path, exclude: Path | None = None) -> list[Path]:
    """Photos under ``root``, leaving out ``exclude`` (the --out folder when it lies inside) and every
    folder prepare wrote (it holds :data:`OUTPUT_MARKER`), so a rerun never reads its own outputs."""
    skip = [exclude.resolve()] if exclude is not None else []
    photos = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if OUTPUT_MARKER in files or here.resolve() in skip:
            if here != root:
                logger.info("not reading %s: it is prepare's output folder", here)
            dirs[:] = []
            if here != root or OUTPUT_MARKER in files:
                continue
        dirs.sort()
        photos.extend(here / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES and (here / f).is_file())
    return sorted(photos)


def read_partial(path: Path) -> dict[str, dict]:
    """Detections already done; a torn last line from a killed run is cut off the file.

    Embeddings are held as float32 arrays (they were float32 before JSON), a quarter of the
    memory of the parsed lists: a few hundred thousand photos fit in a few GB.
    """
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    good_end = 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.info("ignoring an incomplete line in %s (interrupted run)", path.name)
                break
            if not line.endswith(b"\n"):
                break  # a complete object whose newline never reached the disk: redo it
            good_end += len(line)
            if entry.get("retry"):  # too large for the limit then: checked again (from its header) with today's
                continue
            done[entry["image"]] = _compact(entry)
    if good_end < path.stat().st_size:
        with open(path, "r+b") as fh:  # append after the last whole line only
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return done


def _compact(entry: dict) -> dict:
    for face in entry["faces"]:
        face["embedding"] = np.asarray(face["embedding"], dtype=np.float32)
    return entry


def analyse_photo(photo: Path, rel: str, analyzer, min_face: int, max_pixels: int | None = None) -> dict:
    """One photo's detections (box, landmarks, score, embedding per face), or its read error."""
    from withanyone_core.faces import ImageTooLargeError

    entry: dict = {"image": rel, "faces": [], "error": None}
    try:
        # the reader training uses: upright (EXIF orientation), any mode, at most max_pixels
        image = load_rgb(photo, max_pixels)
        entry["height"], entry["width"] = int(image.shape[0]), int(image.shape[1])
        for face in analyzer.analyze(image, image_name=rel):
            w, h = float(face.bbox[2] - face.bbox[0]), float(face.bbox[3] - face.bbox[1])
            if min(w, h) < min_face:
                continue
            entry["faces"].append(
                {
                    "box": [float(v) for v in face.bbox],
                    "landmarks": [[float(x), float(y)] for x, y in face.kps],
                    "score": float(face.score),
                    "embedding": [float(v) for v in face.embedding],
                }
            )
    except (OSError, ValueError) as exc:
        entry["error"] = str(exc)
        entry["retry"] = isinstance(exc, ImageTooLargeError)  # a later run with a higher limit reads it
        logger.warning("skipping %s: %s", rel, exc)
    return entry


def detect_all(
    photos: list[Path],
    images_root: Path,
    out: Path,
    analyzer,
    min_face: int,
    analyse_many=None,
    max_pixels: int | None = None,
) -> dict[str, dict]:
    """Every photo's detections, resumable; ``analyse_many(todo)`` (Ray) yields the entries of
    ``[(photo, rel), ...]`` in any order, else ``analyzer`` runs here, one photo after another."""
    partial = out / PARTIAL
    done = read_partial(partial)
    if done:
        logger.info("resuming: %d of %d photos already analysed", len(done), len(photos))
    todo = [(photo, photo.relative_to(images_root).as_posix()) for photo in photos]
    todo = [(photo, rel) for photo, rel in todo if rel not in done]
    entries = (
        analyse_many(todo)
        if analyse_many is not None
        else (analyse_photo(photo, rel, analyzer, min_face, max_pixels) for photo, rel in todo)
    )
    with open(partial, "a", encoding="utf-8") as fh:
        for number, entry in enumerate(entries, 1):
            rel = entry["image"]
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[rel] = _compact(entry)
            if number % 50 == 0:
                logger.info("analysed %d / %d photos", number, len(todo))
    current = {photo.relative_to(images_root).as_posix() for photo in photos}
    gone = sorted(set(done) - current)
    if gone:
        logger.warning(
            "%d photo(s) analysed by an earlier run are no longer under --images and are left out (first: %s)",
            len(gone),
            gone[0],
        )
    return {rel: done[rel] for rel in sorted(current)}
