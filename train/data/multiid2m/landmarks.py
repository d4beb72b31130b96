"""The GT faces' 5 landmarks of MultiID-2M shards (the release has none): detected once per shard
and cached as JSON beside the trainer's cache, read back per (shard, key)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .format import ShardFormatError, parsed_samples

logger = logging.getLogger(__name__)


def landmark_file(cache_dir: str | os.PathLike, shard: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(shard).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{Path(shard).stem}-{digest}.landmarks.json"


def detect_landmarks(
    shards: Sequence[str], cache_dir: str | os.PathLike, detector, iou_min: float = 0.3, max_pixels: int | None = None
) -> int:
    """Detect the GT faces' 5 landmarks once per shard and cache them (the release has none).

    Each GT box takes the detection that overlaps it most (IoU >= ``iou_min``); a box with
    none gets ``null`` and its face leaves the GT-aligned ID loss. Returns shards detected now.
    """
    from withanyone_core.faces import ImageReadError, decode_image

    from ...losses import box_iou

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    done = 0
    for shard in shards:
        target = landmark_file(cache_dir, shard)
        if target.is_file() and read_landmark_file(target) is not None:
            continue
        table: dict[str, list] = {}
        truncated: list[ShardFormatError] = []

        for key, sample in parsed_samples(
            shard, "landmarks", max_pixels, functools.partial(_note_truncated, truncated)
        ):
            try:
                image = decode_image(sample.image, f"{sample.where}.jpg", max_pixels)
                faces = detector.detect(image)
            except (ImageReadError, OSError, ValueError) as exc:
                logger.warning("landmarks: skipping %s:%s (%s)", shard, key, exc)
                continue
            gt = np.array([p.box for p in sample.persons], dtype=np.float64).reshape(-1, 4)
            found = np.array([f.bbox[:4] for f in faces], dtype=np.float64).reshape(-1, 4)
            rows = [None] * len(gt)
            if len(gt) and len(found):
                iou = box_iou(gt, found)
                for i in range(len(gt)):
                    j = int(np.argmax(iou[i]))
                    if iou[i, j] >= iou_min:
                        rows[i] = [[float(x), float(y)] for x, y in faces[j].kps]
            table[key] = rows
        if truncated:
            fallback = Path(cache_dir) / "partial"
            fallback.mkdir(exist_ok=True)
            target = fallback / target.name  # read by this run, replaced once the shard reads whole
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"shard": os.path.abspath(shard), "landmarks": table}))
        os.replace(tmp, target)
        done += 1
    return done


def _landmark_row(row):
    """A cached row: None, or 5 finite [x, y] points (else None: the face leaves the GT-aligned ID loss)."""
    if row is None:
        return None
    try:
        points = np.asarray(row, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return row if points.shape == (5, 2) and np.isfinite(points).all() else False


def read_landmark_file(path: Path) -> dict[str, list] | None:
    """A shard's cached landmarks, validated; None (with a warning naming it) for a damaged file."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))["landmarks"]
        if not isinstance(table, dict) or not all(isinstance(rows, list) for rows in table.values()):
            raise ValueError("expected {key: [rows]}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("landmark cache %s is unreadable (%s); it is detected again", path, exc)
        return None
    out = {}
    for key, rows in table.items():
        checked = [_landmark_row(r) for r in rows]
        if any(r is False for r in checked):
            logger.warning(
                "landmark cache %s: %s has a row that is not 5 finite [x, y] points; its faces leave "
                "the GT-aligned ID loss",
                path,
                key,
            )
            checked = [None if r is False else r for r in checked]
        out[key] = checked
    return out


def load_landmarks(shards: Sequence[str], cache_dir: str | os.PathLike | None) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    if cache_dir is None:
        return out
    for shard in shards:
        path = landmark_file(cache_dir, shard)
        if not path.is_file():
            path = Path(cache_dir) / "partial" / path.name  # a truncated shard's samples read so far
        table = read_landmark_file(path) if path.is_file() else None
        for key, rows in (table or {}).items():
            out[(shard, key)] = rows
    return out


def _note_truncated(truncated: list, exc: ShardFormatError) -> None:
    if exc.reason == "shard_unreadable":  # what was read is used, not cached (re-read next run)
        truncated.append(exc)
