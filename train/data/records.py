"""The JSONL manifest: one record per photo, strictly validated.

Manifest (one JSON object per line, paths relative to the manifest file)::

    {"image": "photos/0001.jpg", "caption": "two friends on a beach", "width": 1024,
     "height": 768, "quality": 0.8,
     "persons": [{"identity": "alice", "box": [x1, y1, x2, y2],
                  "landmarks": [[x, y] x 5], "embedding": [512 floats, raw ArcFace]}]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 512


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Person:
    identity: str
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    embedding: np.ndarray = field(compare=False)

    @property
    def min_side(self) -> float:
        """The face box's shorter side in the photo's pixels."""
        x1, y1, x2, y2 = self.box
        return min(x2 - x1, y2 - y1)

    def to_json(self) -> dict:
        return {
            "identity": self.identity,
            "box": [float(v) for v in self.box],
            "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
            "embedding": [float(v) for v in self.embedding],
        }


@dataclass(frozen=True)
class Record:
    image: str
    caption: str
    width: int
    height: int
    quality: float
    persons: tuple[Person, ...]

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
            "persons": [p.to_json() for p in self.persons],
        }


_RECORD_KEYS = {"image", "caption", "width", "height", "quality", "persons"}
_PERSON_KEYS = {"identity", "box", "landmarks", "embedding"}


def _finite_floats(value, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {what} must be numbers, got {value!r:.80}") from exc
    if array.shape != shape or not np.isfinite(array).all():
        raise ManifestError(f"{where}: {what} must be {'x'.join(map(str, shape))} finite numbers, "
                            f"got shape {array.shape}")
    return array


def _parse_person(raw: dict, where: str) -> Person:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: a person must be an object with {sorted(_PERSON_KEYS)}")
    unknown, missing = set(raw) - _PERSON_KEYS, _PERSON_KEYS - set(raw)
    if unknown or missing:
        raise ManifestError(f"{where}: person keys missing {sorted(missing)} / unknown {sorted(unknown)}")
    identity = raw["identity"]
    if not isinstance(identity, (str, int)) or isinstance(identity, bool) or not str(identity).strip():
        raise ManifestError(f"{where}: identity must be a non-empty string id, got {identity!r}")
    box = _finite_floats(raw["box"], (4,), "box [x1, y1, x2, y2]", where)
    if not (box[2] > box[0] and box[3] > box[1]):
        raise ManifestError(f"{where}: box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {box.tolist()}")
    landmarks = _finite_floats(raw["landmarks"], (5, 2), "landmarks (5 [x, y] points)", where)
    embedding = _finite_floats(raw["embedding"], (EMBEDDING_DIM,), "embedding", where).astype(np.float32)
    return Person(str(identity), tuple(float(v) for v in box),
                  tuple((float(x), float(y)) for x, y in landmarks), embedding)


def parse_record(raw: dict, where: str) -> Record:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: each line must be a JSON object")
    unknown, missing = set(raw) - _RECORD_KEYS, {"image", "width", "height", "persons"} - set(raw)
    if unknown or missing:
        raise ManifestError(f"{where}: record keys missing {sorted(missing)} / unknown {sorted(unknown)}")
    if not isinstance(raw["image"], str) or not raw["image"]:
        raise ManifestError(f"{where}: image must be a path relative to the manifest, got {raw['image']!r}")
    if not isinstance(raw.get("caption", ""), str):
        raise ManifestError(f"{where}: caption must be a string, got {raw['caption']!r:.80}")
    size = [raw["width"], raw["height"]]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ManifestError(f"{where}: width and height must be positive integers (pixels), got {size}")
    quality = _finite_floats(raw.get("quality", 1.0), (), "quality", where)
    if not isinstance(raw["persons"], list):
        raise ManifestError(f"{where}: persons must be a list of objects")
    persons = tuple(_parse_person(p, f"{where}, person {i + 1}") for i, p in enumerate(raw["persons"]))
    if not persons:
        raise ManifestError(f"{where}: a record needs at least one person")
    names = [p.identity for p in persons]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: identity listed twice in one image ({names}); "
                            "each person of an image must be a different identity")
    return Record(raw["image"], str(raw.get("caption", "")), int(raw["width"]), int(raw["height"]),
                  float(quality), persons)


class Manifest:
    """All records of a dataset, with image paths resolved against ``root``."""

    def __init__(self, records: Sequence[Record], root: Path):
        self.records = list(records)
        self.root = Path(root)

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, record: Record) -> Path:
        return self.root / record.image

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"manifest not found: {path} (build one with `python train/prepare.py`)")
        records = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from exc
                records.append(parse_record(raw, where))
        if not records:
            raise ManifestError(f"{path} holds no records")
        return cls(records, path.parent)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in self.records:
                fh.write(json.dumps(record.to_json()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
