"""The MultiID-2M stream: an ``IterableDataset`` yielding collated batches of one bucket and person count,
sharded over (rank, DataLoader worker) slots, resumable bit-identically (see the package's docstring)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..dataset import DataOptions, collate, cosine, training_caption
from ..images import crop_to_bucket, faces_inside, square_crop
from ..records import box_problem
from .format import (
    ShardFormatError,
    StreamPerson,
    StreamSample,
    UnsafePickleError,
    iter_tar_samples,
    parse_sample,
)
from .identities import IdentityNumbers
from .references import ReferenceFolder, ReferenceTars

logger = logging.getLogger(__name__)


# the authors keep samples with 1..5 faces (negativeloader_full.process_item)
MAX_PERSONS = 5


def _count_reasons(bad) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, reason, _ in bad:
        out[reason] = out.get(reason, 0) + 1
    return out


class MultiID2MStream(torch.utils.data.IterableDataset):
    """Collated batches from MultiID-2M shards, infinite (epoch after epoch), resumable.

    ``skip_batches``: batches this rank already consumed; with DataLoader workers, batch
    ``k`` of a rank comes from the logical worker ``k % num_workers`` (the DataLoader's
    round-robin over infinite workers), so each worker skips its own share. A resume needs the same number
    of ranks and workers (the trainer checks it).
    """

    def __init__(
        self,
        shards: Sequence[str],
        options: DataOptions,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        refs: ReferenceFolder | ReferenceTars | None = None,
        numbers: IdentityNumbers | None = None,
        landmarks: dict | None = None,
        skip_batches: int = 0,
    ):
        super().__init__()
        self.shards = list(shards)
        self.options, self.batch_size, self.seed = options, batch_size, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.refs, self.numbers = refs, numbers or IdentityNumbers([])
        self.landmarks = landmarks or {}
        self.skip_batches = skip_batches

    # ---- order
    def _slot(self) -> tuple[int, int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[str, str, dict]]:
        """(shard, key, members) of one epoch of one slot, shuffled by shard order and the buffer."""
        order = list(self.shards)
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        if len(order) >= slots:
            mine, every = order[slot::slots], None
        else:
            mine, every = order, slots
        rng = random.Random(f"{self.seed}:buffer:{epoch}:{slot}")
        buffer: list = []
        counter = 0
        for shard in mine:
            samples = iter_tar_samples(shard)
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    break
                except ShardFormatError as exc:  # truncated/unreadable: the rest of this shard is skipped
                    yield shard, None, exc
                    break
                counter += 1
                if every is not None and (counter - 1) % every != slot:
                    continue
                item = (shard, key, members)
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                pick = rng.randrange(len(buffer))
                buffer[pick], item = item, buffer[pick]
                yield item
        rng.shuffle(buffer)
        yield from buffer

    def _bucket(self, sample: StreamSample) -> int:
        aspect = math.log(sample.width / sample.height)
        buckets = self.options.buckets
        return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - aspect))

    def _usable(self, sample: StreamSample) -> str | None:
        opts = self.options
        if not 1 <= len(sample.persons) <= MAX_PERSONS:
            return "face_count"
        if opts.min_quality is not None and sample.quality < opts.min_quality:
            return "quality"
        if min(min(p.box[2] - p.box[0], p.box[3] - p.box[1]) for p in sample.persons) < opts.min_face_size:
            return "small_face"
        return None

    def grouped(
        self, epoch: int, slot: int, slots: int, pending: dict | None = None, counts: dict | None = None
    ) -> Iterator[list[StreamSample]]:
        """Lists of ``batch_size`` samples of one bucket and person count, in stream order.

        ``pending`` (kept by the caller across epochs) holds the incomplete groups, so a slot
        whose share has one sample of a group per epoch still fills its batches.
        """
        pending = {} if pending is None else pending
        counts = {} if counts is None else counts
        for shard, key, members in self.raw_samples(epoch, slot, slots):
            if key is None:  # the shard could not be read on
                logger.warning("skipping the rest of shard %s: %s", shard, members)
                counts.setdefault("bad", []).append((shard, members.reason, str(members)))
                continue
            counts["read"] = counts.get("read", 0) + 1
            try:
                sample = parse_sample(shard, key, members, self.options.max_image_pixels)
            except UnsafePickleError:
                raise
            except ShardFormatError as exc:
                logger.warning("skipping a bad sample (%s): %s", exc.reason, exc)
                counts.setdefault("bad", []).append((f"{shard}:{key}", exc.reason, str(exc)))
                continue
            if self._usable(sample) is not None:
                continue
            if counts is not None:
                counts["usable"] = counts.get("usable", 0) + 1
            group = (self._bucket(sample), len(sample.persons))
            pending.setdefault(group, []).append(sample)
            if len(pending[group]) == self.batch_size:
                yield pending.pop(group)

    def __iter__(self) -> Iterator[dict]:
        slot, slots, workers = self._slot()
        # a resumed DataLoader starts its round-robin at worker 0 while the next batch is number
        # skip_batches: physical worker w carries on the stream of logical worker (w + skip) % W
        worker = (slot - self.rank * workers + self.skip_batches) % workers
        slot = self.rank * workers + worker
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers)
        epoch, produced, pending = 0, 0, {}
        counts: dict = {}  # bad samples and samples read are carried to the next batch, across epochs too
        while True:
            counts["usable"] = 0
            for group in self.grouped(epoch, slot, slots, pending, counts):
                bad, read = counts.pop("bad", []), counts.pop("read", 0)
                if produced < to_skip:  # consumed before the resume: its skips were counted then
                    produced += 1
                    continue
                produced += 1
                batch = collate([self.safe_item(sample, epoch) for sample in group])
                batch["bad"] = bad + batch["bad"]
                batch["read"] = read
                yield batch
            if not counts.get("usable"):
                bad = counts.get("bad", [])
                reasons = ", ".join(f"{r} {n}" for r, n in sorted(_count_reasons(bad).items()))
                raise RuntimeError(
                    f"slot {slot} of {slots} (rank x DataLoader worker) got no usable sample from "
                    f"{len(self.shards)} shard(s) in epoch {epoch}"
                    + (f" ({len(bad)} bad: {reasons}; first: {bad[0][2]})" if bad else "")
                    + ": give more shards/samples, fewer data.num_workers, or lower the phase's "
                    "min_face_size / min_quality"
                )
            epoch += 1

    # ---- items
    def _reference(self, person: StreamPerson, rng: random.Random):
        """(embedding, image, box) of a reference photo by the authors' rule, or (None, reason)."""
        opts = self.options
        files = self.refs.files(person.name) if self.refs and person.name else []
        if not files:
            return None, "paired_no_reference_photo"
        best, best_score = None, -2.0
        for path in rng.sample(files, min(opts.paired_candidates, len(files))):
            try:
                embedding, box = self.refs.read(path)
            except UnsafePickleError:
                raise
            except (ShardFormatError, OSError, ValueError):
                continue
            if box is None or min(box[2] - box[0], box[3] - box[1]) < opts.min_face_size:
                continue
            if np.array_equal(embedding, person.embedding):  # the training face itself (prepare lists every photo)
                continue
            score = cosine(embedding, person.embedding)
            if score > best_score:
                best, best_score = (path, embedding, box), score
            if score > opts.paired_accept_similarity:
                break
        if best is None or best_score < opts.paired_min_similarity:
            return None, "paired_no_similar_reference"
        path, embedding, box = best
        image = None
        if opts.siglip_crops:
            try:
                image = self.refs.image(path, opts.max_image_pixels)
            except (OSError, ValueError) as exc:
                logger.warning("paired reference %s unreadable (%s)", path, exc)
                return None, "paired_reference_unreadable"
            problem = box_problem(box, image.shape[1], image.shape[0])
            if problem is not None:
                logger.warning("paired reference %s: %s", path, problem[1])
                return None, "paired_reference_unreadable"
        return (embedding, image, box), None

    def safe_item(self, sample: StreamSample, epoch: int) -> dict:
        """:meth:`item`, with any failure turned into a skipped item naming shard and member (and logged)."""
        try:
            return self.item(sample, epoch)
        except UnsafePickleError:
            raise
        except ShardFormatError as exc:
            logger.warning("skipping a bad sample (%s): %s", exc.reason, exc)
            return {"skipped": sample.where, "skip_reason": exc.reason, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one sample must never stop the run; named and counted instead
            message = f"{sample.where}: {type(exc).__name__}: {exc}"
            logger.warning("skipping a sample that failed to load (item_error): %s", message)
            return {"skipped": sample.where, "skip_reason": "item_error", "error": message}

    def item(self, sample: StreamSample, epoch: int) -> dict:
        from withanyone_core.faces import (
            ImageReadError,
            ImageTooLargeError,
            decode_image,
        )

        opts = self.options
        rng = random.Random(f"{self.seed}:{epoch}:{sample.where}")
        try:
            image = decode_image(sample.image, f"{sample.where}.jpg", opts.max_image_pixels)
        except ImageReadError as exc:
            reason = "image_too_large" if isinstance(exc, ImageTooLargeError) else "image_unreadable"
            logger.warning("skipping unreadable image %s (%s)", sample.where, exc)
            return {"skipped": sample.where, "skip_reason": reason, "error": str(exc)}
        if image.shape[1] != sample.width or image.shape[0] != sample.height:
            raise ShardFormatError(
                f"{sample.where}.jpg: decoded {image.shape[1]}x{image.shape[0]}, but its header "
                f"says {sample.width}x{sample.height}",
                "image_unreadable",
            )
        width, height = opts.buckets[self._bucket(sample)]
        photo_boxes = np.array([p.box for p in sample.persons], dtype=np.float64)
        pixels, scale, x0, y0 = crop_to_bucket(image, width, height, photo_boxes, opts.crop, rng)
        boxes = torch.tensor(photo_boxes, dtype=torch.float32) * scale - torch.tensor([x0, y0, x0, y0])
        rows = self.landmarks.get((sample.shard, sample.key)) or [None] * len(sample.persons)
        if len(rows) != len(sample.persons):  # a stale cache from other shards of the same name
            logger.warning(
                "%s: %d cached landmark rows for %d faces; its faces leave the GT-aligned ID loss",
                sample.where,
                len(rows),
                len(sample.persons),
            )
            rows = [None] * len(sample.persons)
        has_landmarks = torch.tensor([r is not None for r in rows])
        landmarks = torch.tensor([r if r is not None else [[0.0, 0.0]] * 5 for r in rows], dtype=torch.float32)
        landmarks = landmarks * scale - torch.tensor([x0, y0])
        events: list[str] = []
        ref_embeddings, crops, paired = [], [], []
        for person in sample.persons:
            ref = (person.embedding, image, person.box)
            is_paired = False
            # without a ref/ folder the reference is the training photo itself (the authors' self-reference)
            if self.refs is not None and rng.random() < opts.paired_ratio:
                found, reason = self._reference(person, rng)
                if found is not None:
                    ref, is_paired = found, True
                else:
                    events.append(reason)
                    if opts.paired_fallback == "skip":
                        return {"dropped": sample.where, "reason": reason, "events": events}
            events.append("paired" if is_paired else "unpaired")
            paired.append(is_paired)
            ref_embeddings.append(torch.from_numpy(np.asarray(ref[0], dtype=np.float32)))
            if opts.siglip_crops:
                crops.append(square_crop(ref[1], ref[2]))
        n = len(sample.persons)
        caption = training_caption(opts, rng, sample.caption, n)
        id_valid = faces_inside(boxes, landmarks, width, height) & has_landmarks
        if not bool(has_landmarks.all()):
            events.append("no_gt_landmarks")
        item = {
            "pixels": torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0,
            "caption": caption,
            "num_persons": n,
            "boxes": boxes,
            "landmarks": landmarks,
            "id_valid": id_valid,
            "gt_embeddings": torch.from_numpy(np.stack([p.embedding for p in sample.persons]).astype(np.float32)),
            "ref_embeddings": torch.stack(ref_embeddings),
            "identity_ids": torch.tensor([self.numbers.of(p.name, sample, i) for i, p in enumerate(sample.persons)]),
            "paired": torch.tensor(paired),
            "record_index": -1,
            "key": sample.where,
            "events": events,
        }
        if opts.siglip_crops:
            item["ref_siglip_crops"] = torch.from_numpy(np.stack(crops))
        return item
