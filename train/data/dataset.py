"""Training data: the JSONL manifest, identity index, negative pool, paired dataset, buckets.

Manifest (one JSON object per line, paths relative to the manifest file)::

    {"image": "photos/0001.jpg", "caption": "two friends on a beach", "width": 1024,
     "height": 768, "quality": 0.8,
     "persons": [{"identity": "alice", "box": [x1, y1, x2, y2],
                  "landmarks": [[x, y] x 5], "embedding": [512 floats, raw ArcFace]}]}

Dataset items (dicts): ``pixels`` float [3,H,W] in [0,1]; ``caption``; ``num_persons``;
``boxes`` [n,4] and ``landmarks`` [n,5,2] in the pixels of the resized/cropped image;
``gt_embeddings`` [n,512]; ``ref_embeddings`` [n,512]; ``ref_siglip_crops`` uint8
[n,512,512,3]; ``identity_ids`` [n] int64; ``paired`` [n] bool; ``record_index``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
SIGLIP_CROP = 512


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and line."""


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Person:
    identity: str
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    embedding: np.ndarray = field(compare=False)

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


class IdentityIndex:
    """identity -> every (record, person) where it appears; identities numbered 0..K-1."""

    def __init__(self, manifest: Manifest):
        self.names: list[str] = sorted({p.identity for r in manifest.records for p in r.persons})
        self.ids = {name: i for i, name in enumerate(self.names)}
        self.occurrences: dict[str, list[tuple[int, int]]] = {name: [] for name in self.names}
        for r_idx, record in enumerate(manifest.records):
            for p_idx, person in enumerate(record.persons):
                self.occurrences[person.identity].append((r_idx, p_idx))

    def __len__(self) -> int:
        return len(self.names)

    def other_records(self, identity: str, record_index: int) -> list[tuple[int, int]]:
        return [occ for occ in self.occurrences[identity] if occ[0] != record_index]


# ----------------------------------------------------------------------- negative pool
class NegativePool:
    """Extended negatives for the ID-contrastive loss: embeddings with their identity ids."""

    def __init__(self, embeddings: torch.Tensor, identity_ids: torch.Tensor):
        if embeddings.ndim != 2 or embeddings.shape[0] != identity_ids.shape[0]:
            raise ValueError("negative pool needs embeddings [P, D] and identity ids [P]")
        self.embeddings = embeddings.float()
        self.identity_ids = identity_ids.long()

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def from_manifest(cls, manifest: Manifest, index: IdentityIndex) -> "NegativePool":
        embs, ids = [], []
        for record in manifest.records:
            for person in record.persons:
                embs.append(torch.from_numpy(person.embedding))
                ids.append(index.ids[person.identity])
        return cls(torch.stack(embs), torch.tensor(ids))

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeddings": self.embeddings.contiguous(), "identity_ids": self.identity_ids}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NegativePool":
        from withanyone_core.checkpoints import load_safetensors

        tensors = load_safetensors(path)
        missing = {"embeddings", "identity_ids"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a negative pool (missing {sorted(missing)}); "
                             "rebuild it with `python train/prepare.py`")
        return cls(tensors["embeddings"], tensors["identity_ids"])

    def sample(self, k: int, exclude_identities: Sequence[int] | torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` embeddings of identities not in ``exclude_identities`` (without replacement when possible)."""
        exclude = torch.as_tensor(list(exclude_identities) if not torch.is_tensor(exclude_identities)
                                  else exclude_identities, dtype=torch.long)
        allowed = ~torch.isin(self.identity_ids, exclude)
        candidates = allowed.nonzero().flatten()
        if candidates.numel() == 0:
            raise ValueError("the negative pool has no identity outside the batch: add more identities to the dataset")
        if candidates.numel() >= k:
            pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:k]]
        else:
            pick = candidates[torch.randint(candidates.numel(), (k,), generator=generator)]
        return self.embeddings[pick]


# --------------------------------------------------------------------------- images
def load_rgb(path: Path) -> np.ndarray:
    """RGB uint8 image; raises OSError for missing or unreadable files."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
            return np.stack([arr] * 3, axis=-1)
        return np.asarray(img.convert("RGB"))


def square_crop(image: np.ndarray, box: Sequence[float], size: int = SIGLIP_CROP) -> np.ndarray:
    """The reference's SigLIP crop: box squared about its centre, clipped, resized to ``size``."""
    from withanyone_core.faces import siglip_crop

    return siglip_crop(image, np.asarray(box, dtype=np.float32), size=size)


def fit_to_bucket(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, float, float, float]:
    """Resize to cover ``width x height`` and centre-crop; returns image, scale, x offset, y offset."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    x0, y0 = (new_w - width) // 2, (new_h - height) // 2
    return np.array(resized[y0:y0 + height, x0:x0 + width]), scale, float(x0), float(y0)


# -------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class DataOptions:
    """What one training phase asks of the data."""

    prompt_mode: str = "caption"  # "caption" or "fixed"
    fixed_prompt: str = "{n} people"
    text_dropout: float = 0.0
    paired_ratio: float = 0.0
    min_quality: float | None = None
    buckets: tuple[tuple[int, int], ...] = ((512, 512),)

    def __post_init__(self):
        if self.prompt_mode not in ("caption", "fixed"):
            raise ValueError(f"prompt_mode must be 'caption' or 'fixed', got {self.prompt_mode!r}")
        for name in ("text_dropout", "paired_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for w, h in self.buckets:
            if w % 16 or h % 16:
                raise ValueError(f"bucket {w}x{h}: sizes must be multiples of 16")


_NUMBER_WORDS = {1: "one person", 2: "two people", 3: "three people", 4: "four people"}


def fixed_prompt(template: str, n: int) -> str:
    """``"{n} people"`` -> "two people"; ``{count}`` gives the digit."""
    words = _NUMBER_WORDS.get(n, f"{n} people")
    return template.replace("{n} people", words).replace("{n}", str(n)).replace("{count}", str(n))


class WithAnyoneDataset:
    """Map-style dataset over the records a phase uses; randomness is fixed by (seed, epoch, index)."""

    def __init__(self, manifest: Manifest, options: DataOptions, seed: int = 0,
                 index: IdentityIndex | None = None):
        self.manifest = manifest
        self.options = options
        self.seed = seed
        self.epoch = 0
        self.index = index or IdentityIndex(manifest)
        self.record_indices = [
            i for i, r in enumerate(manifest.records)
            if options.min_quality is None or r.quality >= options.min_quality
        ]
        if not self.record_indices:
            raise ValueError(f"no record has quality >= {options.min_quality}: lower the phase's min_quality")
        self.bucket_of = [self._bucket(manifest.records[i]) for i in self.record_indices]
        # batches hold one image size and one person count, so every tensor stacks
        self.group_of = [(self.bucket_of[k], len(manifest.records[i].persons))
                         for k, i in enumerate(self.record_indices)]
        self.stats = {"paired": 0, "paired_fallback_single_record": 0, "paired_reference_unreadable": 0,
                      "unpaired": 0}

    def __len__(self) -> int:
        return len(self.record_indices)

    def _bucket(self, record: Record) -> int:
        aspect = math.log(record.width / record.height)
        return min(range(len(self.options.buckets)),
                   key=lambda b: abs(math.log(self.options.buckets[b][0] / self.options.buckets[b][1]) - aspect))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, position: int) -> random.Random:
        # a string seed is hashed with SHA-512: the same in every process and Python run
        return random.Random(f"{self.seed}:{self.epoch}:{position}")

    def __getitem__(self, position: int) -> dict:
        r_idx = self.record_indices[position]
        record = self.manifest.records[r_idx]
        rng = self._rng(position)
        path = self.manifest.image_path(record)
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable image %s (%s)", path, exc)
            return {"skipped": str(path)}
        width, height = self.options.buckets[self.bucket_of[position]]
        pixels, scale, x0, y0 = fit_to_bucket(image, width, height)
        boxes = torch.tensor([p.box for p in record.persons], dtype=torch.float32) * scale
        boxes -= torch.tensor([x0, y0, x0, y0])
        landmarks = torch.tensor([p.landmarks for p in record.persons], dtype=torch.float32) * scale
        landmarks -= torch.tensor([x0, y0])

        ref_embeddings, crops, paired = [], [], []
        for person in record.persons:
            ref_person, ref_image = person, image
            if rng.random() < self.options.paired_ratio:
                others = self.index.other_records(person.identity, r_idx)
                if others:
                    o_rec, o_person = others[rng.randrange(len(others))]
                    other = self.manifest.records[o_rec]
                    try:
                        ref_image = load_rgb(self.manifest.image_path(other))
                        ref_person = other.persons[o_person]
                    except (OSError, ValueError) as exc:
                        self.stats["paired_reference_unreadable"] += 1
                        logger.warning("paired reference %s unreadable (%s); this person takes its reference "
                                       "from the training image itself", self.manifest.image_path(other), exc)
                else:
                    self.stats["paired_fallback_single_record"] += 1
            is_paired = ref_person is not person
            self.stats["paired" if is_paired else "unpaired"] += 1
            paired.append(is_paired)
            ref_embeddings.append(torch.from_numpy(ref_person.embedding))
            crops.append(square_crop(ref_image, ref_person.box))

        n = len(record.persons)
        if rng.random() < self.options.text_dropout:
            caption = ""
        elif self.options.prompt_mode == "fixed":
            caption = fixed_prompt(self.options.fixed_prompt, n)
        else:
            caption = record.caption
        return {
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0,
            "caption": caption,
            "num_persons": n,
            "boxes": boxes,
            "landmarks": landmarks,
            "gt_embeddings": torch.from_numpy(np.stack([p.embedding for p in record.persons])),
            "ref_embeddings": torch.stack(ref_embeddings),
            "ref_siglip_crops": torch.from_numpy(np.stack(crops)),
            "identity_ids": torch.tensor([self.index.ids[p.identity] for p in record.persons]),
            "paired": torch.tensor(paired),
            "record_index": r_idx,
        }


class BucketBatchSampler:
    """Batches of one bucket and person count each, shuffled deterministically from (seed, epoch).

    Its position is saved/restored (``state_dict``) so a resumed run continues with the
    exact next batch. With ``num_replicas > 1`` each rank takes every n-th batch.
    """

    def __init__(self, dataset: WithAnyoneDataset, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0

    def _batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        by_group: dict[tuple[int, int], list[int]] = {}
        for pos in order:
            by_group.setdefault(self.dataset.group_of[pos], []).append(pos)
        batches = []
        for group in sorted(by_group):
            items = by_group[group]
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
        usable = len(batches) - len(batches) % self.num_replicas if len(batches) >= self.num_replicas else len(batches)
        return batches[:usable][self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self._batches(self.epoch)
            self.dataset.set_epoch(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items; unreadable images are dropped and reported in ``skipped``."""
    skipped = [item["skipped"] for item in items if "skipped" in item]
    items = [item for item in items if "skipped" not in item]
    batch: dict = {"skipped": skipped, "size": len(items)}
    if not items:
        return batch
    batch["pixels"] = torch.stack([i["pixels"] for i in items])
    batch["caption"] = [i["caption"] for i in items]
    batch["record_index"] = torch.tensor([i["record_index"] for i in items])
    counts = {i["num_persons"] for i in items}
    if len(counts) != 1:
        raise ValueError(f"a batch mixes images with {sorted(counts)} persons; use BucketBatchSampler")
    batch["num_persons"] = counts.pop()
    for key in ("boxes", "landmarks", "gt_embeddings", "ref_embeddings", "ref_siglip_crops", "identity_ids", "paired"):
        batch[key] = torch.stack([i[key] for i in items])
    return batch


class TextEmbeddingCache:
    """Optional cache of text-encoder outputs, one safetensors file per caption hash."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, caption: str) -> Path:
        return self.folder / (hashlib.sha1(caption.encode("utf-8")).hexdigest() + ".safetensors")

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        path = self._path(caption)
        if not path.is_file():
            return None
        from withanyone_core.checkpoints import load_safetensors

        return load_safetensors(path)

    def put(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(caption)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
