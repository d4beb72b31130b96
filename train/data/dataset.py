"""The training dataset: what one phase asks of the data, and the items it gets.

Items (dicts): ``pixels`` float [3,H,W] in [0,1]; ``caption``; ``num_persons``;
``boxes`` [n,4] and ``landmarks`` [n,5,2] in the pixels of the resized/cropped image;
``id_valid`` [n] bool (the face is whole in the crop: only those enter the ID losses);
``gt_embeddings`` [n,512]; ``ref_embeddings`` [n,512]; ``ref_siglip_crops`` uint8
[n,512,512,3] (when SigLIP is used); ``identity_ids`` [n] int64; ``paired`` [n] bool;
``record_index``; ``key`` (the :class:`~train.data.sampler.ItemKey`); ``events``.
An item that cannot be used is ``{"skipped": path}`` (unreadable image) or
``{"dropped": path, "reason": ...}`` (a phase rule, e.g. no good paired reference).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from .identities import IdentityIndex
from .images import CROP_RULES, crop_to_bucket, faces_inside, load_rgb, square_crop
from .records import Manifest, Record
from .sampler import ItemKey

logger = logging.getLogger(__name__)

PAIRED_FALLBACKS = ("skip", "self")


@dataclass(frozen=True)
class DataOptions:
    """What one training phase asks of the data.

    Every field but ``buckets`` and ``siglip_crops`` is a :class:`train.config.PhaseConfig`
    key of the same name and default (:meth:`from_phase`); the rules are checked here, once.
    """

    prompt_mode: str = "caption"  # "caption" or "fixed"
    fixed_prompt: str = "{n} people"
    text_dropout: float = 0.0
    paired_ratio: float = 0.0
    min_quality: float | None = None
    min_face_size: float = 100.0  # records with a smaller face (photo pixels) are left out
    crop: str = "keep_faces"  # keep_faces | center
    paired_candidates: int = 20  # other photos of the person tried for a paired reference
    paired_min_similarity: float = 0.6  # best candidate must reach this cosine to the GT face
    paired_accept_similarity: float = 0.8  # stop searching at the first candidate above this
    paired_fallback: str = "skip"  # skip the item | use the photo itself, when no candidate qualifies
    buckets: tuple[tuple[int, int], ...] = ((512, 512),)
    siglip_crops: bool = True
    max_image_pixels: int | None = None  # photos above are skipped (None: the reader's default, 0: no limit)

    def __post_init__(self):
        if self.prompt_mode not in ("caption", "fixed"):
            raise ValueError(f"prompt_mode must be 'caption' or 'fixed', got {self.prompt_mode!r}")
        for name in ("text_dropout", "paired_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("paired_min_similarity", "paired_accept_similarity"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {getattr(self, name)}")
        if self.crop not in CROP_RULES:
            raise ValueError(f"crop must be one of {list(CROP_RULES)}, got {self.crop!r}")
        if self.paired_fallback not in PAIRED_FALLBACKS:
            raise ValueError(f"paired_fallback must be one of {list(PAIRED_FALLBACKS)}, got {self.paired_fallback!r}")
        if self.paired_candidates < 1:
            raise ValueError(f"paired_candidates must be at least 1, got {self.paired_candidates}")
        if self.min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0 pixels, got {self.min_face_size}")
        if not self.buckets:
            raise ValueError("buckets: give at least one [width, height]")
        for w, h in self.buckets:
            if w % 16 or h % 16:
                raise ValueError(f"bucket {w}x{h} is not a multiple of 16 (the patch size of FLUX latents)")

    @classmethod
    def phase_fields(cls) -> list[str]:
        return [
            f.name for f in dataclasses.fields(cls) if f.name not in ("buckets", "siglip_crops", "max_image_pixels")
        ]

    @classmethod
    def from_phase(cls, phase, buckets, siglip_crops: bool = True, max_image_pixels: int | None = None) -> DataOptions:
        return cls(
            **{name: getattr(phase, name) for name in cls.phase_fields()},
            buckets=tuple((int(w), int(h)) for w, h in buckets),
            siglip_crops=siglip_crops,
            max_image_pixels=max_image_pixels,
        )


_NUMBER_WORDS = {1: "one person", 2: "two people", 3: "three people", 4: "four people"}


def fixed_prompt(template: str, n: int) -> str:
    """``"{n} people"`` -> "two people"; ``{count}`` gives the digit."""
    words = _NUMBER_WORDS.get(n, f"{n} people")
    return template.replace("{n} people", words).replace("{n}", str(n)).replace("{count}", str(n))


def training_caption(options: DataOptions, rng: random.Random, caption: str, persons: int) -> str:
    """The caption an item trains with: dropped (``text_dropout``), the fixed prompt, or its own.
    One ``rng`` draw either way, so both datasets' later random choices stay where they were."""
    if rng.random() < options.text_dropout:
        return ""
    if options.prompt_mode == "fixed":
        return fixed_prompt(options.fixed_prompt, persons)
    return caption


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


class WithAnyoneDataset:
    """Map-style dataset over the records a phase uses; randomness is fixed by (seed, epoch, position)."""

    def __init__(self, manifest: Manifest, options: DataOptions, seed: int = 0, index: IdentityIndex | None = None):
        self.manifest = manifest
        self.options = options
        self.seed = seed
        self.epoch = 0
        self.index = index or IdentityIndex(manifest)
        self.record_indices = [
            i
            for i, r in enumerate(manifest.records)
            if (options.min_quality is None or r.quality >= options.min_quality)
            and min(p.min_side for p in r.persons) >= options.min_face_size
        ]
        if not self.record_indices:
            raise ValueError(
                f"no record has quality >= {options.min_quality} and every face at least "
                f"{options.min_face_size:g} px: lower the phase's min_quality or min_face_size"
            )
        self.bucket_of = [self._bucket(manifest.records[i]) for i in self.record_indices]
        # batches hold one image size and one person count, so every tensor stacks
        self.group_of = [
            (self.bucket_of[k], len(manifest.records[i].persons)) for k, i in enumerate(self.record_indices)
        ]
        self.stats = {
            "paired": 0,
            "paired_fallback_single_record": 0,
            "paired_reference_unreadable": 0,
            "paired_no_similar_reference": 0,
            "unpaired": 0,
        }

    def __len__(self) -> int:
        return len(self.record_indices)

    def _bucket(self, record: Record) -> int:
        aspect = math.log(record.width / record.height)
        return min(
            range(len(self.options.buckets)),
            key=lambda b: abs(math.log(self.options.buckets[b][0] / self.options.buckets[b][1]) - aspect),
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, epoch: int, position: int) -> random.Random:
        # a string seed is hashed with SHA-512: the same in every process and Python run
        return random.Random(f"{self.seed}:{epoch}:{position}")

    def _paired_reference(self, person, r_idx: int, rng: random.Random):
        """(record, person) of another photo of ``person`` by the authors' rule, or None with the reason."""
        opts = self.options
        others = [
            (o_rec, o_p)
            for o_rec, o_p in self.index.other_records(person.identity, r_idx)
            if self.manifest.records[o_rec].persons[o_p].min_side >= opts.min_face_size
        ]
        if not others:
            return None, "paired_fallback_single_record"
        best, best_score = None, -2.0
        for o_rec, o_p in rng.sample(others, min(opts.paired_candidates, len(others))):
            score = cosine(self.manifest.records[o_rec].persons[o_p].embedding, person.embedding)
            if score > best_score:
                best, best_score = (o_rec, o_p), score
            if score > opts.paired_accept_similarity:
                break
        if best_score < opts.paired_min_similarity:
            return None, "paired_no_similar_reference"
        return best, None

    def where(self, position: int) -> str:
        """The manifest line and photo of the item at ``position`` (what a warning names)."""
        r_idx = self.record_indices[position]
        line = self.manifest.lines[r_idx] if self.manifest.lines else r_idx + 1
        return f"{self.manifest.name} line {line} ({self.manifest.records[r_idx].image})"

    def __getitem__(self, key: int | ItemKey) -> dict:
        """The item at ``key``; a record that fails to load is skipped (``skipped``, ``skip_reason``,
        ``error`` naming the manifest line and photo), never raised: one bad record never stops a run."""
        if not isinstance(key, ItemKey):
            key = ItemKey(self.epoch, -1, int(key))
        try:
            return self._item(key)
        except Exception as exc:  # noqa: BLE001 - named, logged and counted by the trainer instead
            where = self.where(key.position)
            message = f"{where}: {type(exc).__name__}: {exc}"
            logger.warning("skipping a record that failed to load (item_error): %s", message)
            return {
                "skipped": str(self.manifest.image_path(self.manifest.records[self.record_indices[key.position]])),
                "skip_reason": "item_error",
                "error": message,
                "key": key,
                "where": where,
            }

    def _item(self, key: ItemKey) -> dict:
        from withanyone_core.faces import ImageTooLargeError

        opts = self.options
        r_idx = self.record_indices[key.position]
        record = self.manifest.records[r_idx]
        rng = self._rng(key.epoch, key.position)
        path = self.manifest.image_path(record)
        try:
            image = load_rgb(path, opts.max_image_pixels)
        except (OSError, ValueError) as exc:
            reason = "image_too_large" if isinstance(exc, ImageTooLargeError) else "image_unreadable"
            logger.warning("skipping unreadable image %s (%s)", path, exc)
            return {
                "skipped": str(path),
                "key": key,
                "skip_reason": reason,
                "where": self.where(key.position),
                "error": f"{self.where(key.position)}: {exc}",
            }
        if (image.shape[1], image.shape[0]) != (record.width, record.height):
            message = (
                f"{self.where(key.position)}: the photo is {image.shape[1]}x{image.shape[0]} (upright), the "
                f"manifest says {record.width}x{record.height}; its boxes would be misplaced. Prepare it again "
                "(python train/prepare.py): photos changed, or were prepared before EXIF orientation was applied"
            )
            logger.warning("skipping %s", message)
            return {
                "skipped": str(path),
                "key": key,
                "skip_reason": "image_size_mismatch",
                "error": message,
                "where": self.where(key.position),
            }
        width, height = opts.buckets[self.bucket_of[key.position]]
        photo_boxes = np.array([p.box for p in record.persons], dtype=np.float64)
        pixels, scale, x0, y0 = crop_to_bucket(image, width, height, photo_boxes, opts.crop, rng)
        boxes = torch.tensor([p.box for p in record.persons], dtype=torch.float32) * scale
        boxes -= torch.tensor([x0, y0, x0, y0])
        landmarks = torch.tensor([p.landmarks for p in record.persons], dtype=torch.float32) * scale
        landmarks -= torch.tensor([x0, y0])

        events: list[str] = []
        ref_embeddings, crops, paired = [], [], []
        for person in record.persons:
            ref_person, ref_image = person, image
            if rng.random() < opts.paired_ratio:
                found, reason = self._paired_reference(person, r_idx, rng)
                if found is not None:
                    other = self.manifest.records[found[0]]
                    try:
                        ref_image = (
                            load_rgb(self.manifest.image_path(other), opts.max_image_pixels)
                            if opts.siglip_crops
                            else None
                        )
                        ref_person = other.persons[found[1]]
                    except (OSError, ValueError) as exc:
                        reason = "paired_reference_unreadable"
                        logger.warning("paired reference %s unreadable (%s)", self.manifest.image_path(other), exc)
                if reason is not None:
                    self.stats[reason] += 1
                    events.append(reason)
                    if opts.paired_fallback == "skip":
                        return {"dropped": str(path), "reason": reason, "key": key, "events": events}
                    ref_person, ref_image = person, image
            is_paired = ref_person is not person
            self.stats["paired" if is_paired else "unpaired"] += 1
            events.append("paired" if is_paired else "unpaired")
            paired.append(is_paired)
            ref_embeddings.append(torch.from_numpy(ref_person.embedding))
            if opts.siglip_crops:
                crops.append(square_crop(ref_image, ref_person.box))

        n = len(record.persons)
        caption = training_caption(opts, rng, record.caption, n)
        id_valid = faces_inside(boxes, landmarks, width, height)
        if not bool(id_valid.all()):
            events.append("face_cut_by_crop")
        item = {
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0,
            "caption": caption,
            "num_persons": n,
            "boxes": boxes,
            "landmarks": landmarks,
            "id_valid": id_valid,
            "gt_embeddings": torch.from_numpy(np.stack([p.embedding for p in record.persons])),
            "ref_embeddings": torch.stack(ref_embeddings),
            "identity_ids": torch.tensor([self.index.ids[p.identity] for p in record.persons]),
            "paired": torch.tensor(paired),
            "record_index": r_idx,
            "key": key,
            "events": events,
        }
        if opts.siglip_crops:
            item["ref_siglip_crops"] = torch.from_numpy(np.stack(crops))
        return item


_STACKED = (
    "boxes",
    "landmarks",
    "id_valid",
    "gt_embeddings",
    "ref_embeddings",
    "ref_siglip_crops",
    "identity_ids",
    "paired",
)


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items; unusable ones are left out and reported.

    ``skipped``: paths of unreadable images; ``dropped``: (path, reason) of items a phase
    rule left out; ``keys``: every item's :class:`ItemKey` (the sampler position).
    """
    batch: dict = {
        "skipped": [item["skipped"] for item in items if "skipped" in item],
        # (where, reason, message) of the skipped items: what the trainer counts against data.max_bad_fraction
        "bad": [
            (
                item.get("where", item["skipped"]),
                item.get("skip_reason", "image_unreadable"),
                item.get("error", item["skipped"]),
            )
            for item in items
            if "skipped" in item
        ],
        "dropped": [(item["dropped"], item["reason"]) for item in items if "dropped" in item],
        "keys": [item["key"] for item in items if "key" in item],
        "events": [e for item in items for e in item.get("events", ())],
    }
    items = [item for item in items if "skipped" not in item and "dropped" not in item]
    batch["size"] = len(items)
    if not items:
        return batch
    batch["pixels"] = torch.stack([i["pixels"] for i in items])
    batch["caption"] = [i["caption"] for i in items]
    batch["record_index"] = torch.tensor([i["record_index"] for i in items])
    counts = {i["num_persons"] for i in items}
    if len(counts) != 1:
        raise ValueError(f"a batch mixes images with {sorted(counts)} persons; use BucketBatchSampler")
    batch["num_persons"] = counts.pop()
    for key in _STACKED:
        if key in items[0]:
            batch[key] = torch.stack([i[key] for i in items])
    return batch
