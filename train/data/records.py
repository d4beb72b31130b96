"""The JSONL manifest: one record per photo, strictly validated.

Manifest (one JSON object per line, paths relative to the manifest file)::

    {"image": "photos/0001.jpg", "caption": "two friends on a beach", "width": 1024,
     "height": 768, "quality": 0.8,
     "persons": [{"identity": "alice", "box": [x1, y1, x2, y2],
                  "landmarks": [[x, y] x 5], "embedding": [512 floats, raw ArcFace]}]}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 512
# a face box may reach past the photo's border by this share of its own width/height (detectors
# place boxes of faces at the edge slightly outside); further out, the record/sample is bad
BOX_MARGIN = 0.25
# raw antelopev2 embeddings have norms of about 15-35 (normalised ones 1): outside this, the vector is broken
EMBEDDING_NORM_RANGE = (1e-3, 1e3)


def box_problem(box, width: float, height: float) -> tuple[str, str] | None:
    """(reason, text) when ``[x1, y1, x2, y2]`` is not finite, inverted, or outside the ``width x height``
    photo by more than :data:`BOX_MARGIN` of its size; None for a good box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        return "box_not_finite", f"face box {[x1, y1, x2, y2]} is not finite"
    if not (x2 > x1 and y2 > y1):
        return "box_inverted", f"face box {[x1, y1, x2, y2]} is empty or inverted (x2 <= x1 or y2 <= y1)"
    mx, my = BOX_MARGIN * (x2 - x1), BOX_MARGIN * (y2 - y1)
    if x1 < -mx or y1 < -my or x2 > width + mx or y2 > height + my:
        return "box_outside", (
            f"face box {[round(v, 1) for v in (x1, y1, x2, y2)]} lies outside the {width:g}x{height:g} photo"
        )
    return None


def embedding_problem(embedding: np.ndarray) -> tuple[str, str] | None:
    """(reason, text) for a non-finite embedding or one whose norm no ArcFace vector has; None when good."""
    if not np.isfinite(embedding).all():
        return "embedding_not_finite", "an embedding holds NaN or infinite values"
    norm = float(np.linalg.norm(np.asarray(embedding, dtype=np.float64)))
    low, high = EMBEDDING_NORM_RANGE
    if not low <= norm <= high:
        return "embedding_norm", (
            f"embedding norm {norm:.4g} is outside [{low:g}, {high:g}] (raw ArcFace embeddings "
            "have norms of about 15-35)"
        )
    return None


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and line.

    ``reason`` is the short name a run's summary counts it under (see :mod:`train.data.skips`)."""

    def __init__(self, message: str, reason: str = "manifest_line"):
        super().__init__(message)
        self.reason = reason


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
        raise ManifestError(
            f"{where}: {what} must be {'x'.join(map(str, shape))} finite numbers, got shape {array.shape}"
        )
    return array


def _parse_person(raw: dict, where: str, width: int | None = None, height: int | None = None) -> Person:
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
        raise ManifestError(
            f"{where}: box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {box.tolist()}", "box_inverted"
        )
    problem = box_problem(box, width, height) if width is not None else None
    if problem is not None:
        raise ManifestError(f"{where}: {problem[1]}", problem[0])
    landmarks = _finite_floats(raw["landmarks"], (5, 2), "landmarks (5 [x, y] points)", where)
    embedding = _finite_floats(raw["embedding"], (EMBEDDING_DIM,), "embedding", where).astype(np.float32)
    problem = embedding_problem(embedding)
    if problem is not None:
        raise ManifestError(f"{where}: {problem[1]}", problem[0])
    return Person(
        str(identity), tuple(float(v) for v in box), tuple((float(x), float(y)) for x, y in landmarks), embedding
    )


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
    persons = tuple(
        _parse_person(p, f"{where}, person {i + 1}", raw["width"], raw["height"]) for i, p in enumerate(raw["persons"])
    )
    if not persons:
        raise ManifestError(f"{where}: a record needs at least one person")
    names = [p.identity for p in persons]
    if len(set(names)) != len(names):
        raise ManifestError(
            f"{where}: identity listed twice in one image ({names}); "
            "each person of an image must be a different identity"
        )
    return Record(
        raw["image"], str(raw.get("caption", "")), int(raw["width"]), int(raw["height"]), float(quality), persons
    )


class Manifest:
    """All records of a dataset, with image paths resolved against ``root``."""

    def __init__(
        self,
        records: Sequence[Record],
        root: Path,
        name: str = "manifest",
        lines: Sequence[int] | None = None,
        bad: Sequence[tuple[str, str, str]] = (),
    ):
        self.records = list(records)
        self.root = Path(root)
        self.name = name  # the file name warnings use
        self.lines = list(lines) if lines is not None else None  # each record's line number in the file
        self.bad = list(bad)  # (where, reason, message) of the lines skipped by a lenient load

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, record: Record) -> Path:
        return self.root / record.image

    @classmethod
    def load(cls, path: str | os.PathLike, strict: bool = True) -> Manifest:
        """Every record of the file. ``strict``: the first bad line raises :class:`ManifestError`;
        otherwise (the trainer) a bad line is skipped with a warning naming it, and listed in ``bad``."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"manifest not found: {path} (build one with `python train/prepare.py`)")
        records, lines, bad = [], [], []
        with open(path, "rb") as fh:
            for number, data in enumerate(fh, 1):
                where = f"{path.name} line {number}"
                try:
                    line = data.decode("utf-8")
                    if not line.strip():
                        continue
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ManifestError(f"{where}: not valid JSON ({exc.msg})", "json") from exc
                    records.append(parse_record(raw, where))
                    lines.append(number)
                except (ManifestError, UnicodeDecodeError) as exc:
                    if isinstance(exc, UnicodeDecodeError):
                        exc = ManifestError(f"{where}: not UTF-8 text ({exc.reason})", "json")
                    if strict:
                        raise exc
                    logging.getLogger(__name__).warning("skipping a bad manifest line (%s): %s", exc.reason, exc)
                    bad.append((where, exc.reason, str(exc)))
        if not records:
            raise ManifestError(
                f"{path} holds no usable record" + (f" ({len(bad)} bad line(s), first: {bad[0][2]})" if bad else "")
            )
        return cls(records, path.parent, path.name, lines, bad)

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
