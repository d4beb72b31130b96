"""Where a run's batches come from: one interface over a manifest, MultiID-2M shards and a mix of both.

A :class:`DataSource` owns, for the phase being trained, its loader (a DataLoader over its dataset or
stream), its resume state (what ``trainer.json`` keeps under ``sampler`` and ``stream``), the negative
pool of the contrastive loss, the item the periodic samples use, and the records whose captions are
known before training. The trainer asks only this interface; :func:`open_data_source` builds the one
``data.source`` names. A new kind of data is a new subclass here, and nothing in ``train/run.py`` changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import DataOptions, WithAnyoneDataset, collate
from .identities import IdentityIndex, NegativePool
from .records import Manifest
from .sampler import BucketBatchSampler, state_after
from .skips import SkipLedger

logger = logging.getLogger("withanyone.train")

# in a manifest + MultiID-2M mix, manifest identity ids are moved here so they never meet the shards' ids
MANIFEST_ID_OFFSET = 1 << 60

# a phase stops when this many batches in a row (at least; a manifest source: at least one epoch) held no
# usable item
EMPTY_BATCH_PATIENCE = 100


@dataclass(frozen=True)
class PhaseLoading:
    """How a phase loads its batches; the same for every source."""

    options: DataOptions
    batch_size: int
    seed: int  # the phase's seed (run seed + phase index)
    rank: int
    world: int
    workers: int  # DataLoader workers (0: load in the training process)

    def loader(self, dataset, **kwargs):
        import sys

        from torch.utils.data import DataLoader

        context = "fork" if self.workers and sys.platform == "linux" else None
        return DataLoader(
            dataset,
            num_workers=self.workers,
            prefetch_factor=2 if self.workers else None,
            multiprocessing_context=context,
            **kwargs,
        )


class DataSource(ABC):
    """One origin of training batches (see the module docstring)."""

    #: the name batches from this source are counted under (``batches_from_<kind>`` in a mix)
    kind: str

    @property
    def manifest(self) -> Manifest | None:
        """The records known before training (their captions and person counts), if any."""
        return None

    @abstractmethod
    def start_phase(self, loading: PhaseLoading, saved: dict | None) -> str:
        """Open the phase's loader, at the position ``saved`` (a checkpoint's state of this phase) when
        resuming; returns what the phase reads, for the log (``"24 records"``)."""

    def for_step(self, step: int) -> DataSource:
        """The source that serves global step ``step``: itself, or one of a mix's parts."""
        return self

    @abstractmethod
    def next_batch(self) -> dict:
        """The next collated batch of this process (it may hold no usable item: the trainer retries)."""

    @property
    def patience(self) -> int:
        """Batches in a row without a usable item after which the phase stops."""
        return EMPTY_BATCH_PATIENCE

    @abstractmethod
    def state(self, phase_done: bool) -> dict:
        """The resume state for ``trainer.json``: the batch after the last one consumed, or the start
        of the next phase when ``phase_done``."""

    @abstractmethod
    def negative_pool(self, accelerator) -> NegativePool:
        """The pool of the ID-contrastive loss's extended negatives."""

    @abstractmethod
    def sample_item(self, options: DataOptions) -> dict | None:
        """The first item that loads whole: the identities and layout of every periodic sample."""

    @abstractmethod
    def stop(self) -> None:
        """Drop the loader (its worker processes end)."""


class ManifestSource(DataSource):
    """A JSONL manifest of photos with persons, boxes and embeddings (``train/prepare.py`` writes it)."""

    kind = "manifest"

    def __init__(self, path: str, skips: SkipLedger, identity_offset: int = 0):
        self._manifest = Manifest.load(path, strict=False)
        skips.add(self._manifest.bad)
        skips.seen(len(self._manifest.bad))  # its records count as read when their batches are
        self.index = IdentityIndex(self._manifest)
        self.identity_offset = identity_offset
        self.sampler: BucketBatchSampler | None = None
        self.loader = self.batches = None
        self.last_key = None

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def start_phase(self, loading: PhaseLoading, saved: dict | None) -> str:
        dataset = WithAnyoneDataset(self._manifest, loading.options, seed=loading.seed, index=self.index)
        self.sampler = BucketBatchSampler(
            dataset, loading.batch_size, seed=loading.seed, num_replicas=loading.world, rank=loading.rank
        )
        if saved is not None:
            self.sampler.load_state_dict(saved["sampler"])
        # workers only load items: every random choice comes from the item's key, so an item is
        # the same with or without workers, and the saved position is that of the last batch consumed
        self.loader = loading.loader(dataset, batch_sampler=self.sampler, collate_fn=collate)
        self.batches = iter(self.loader)
        self.last_key = None
        return f"{len(dataset)} records"

    def next_batch(self) -> dict:
        batch = next(self.batches)
        if batch["keys"]:
            self.last_key = batch["keys"][-1]
        if self.identity_offset and "identity_ids" in batch:
            batch["identity_ids"] = batch["identity_ids"] + self.identity_offset
        return batch

    @property
    def patience(self) -> int:
        return max(EMPTY_BATCH_PATIENCE, len(self.sampler))  # a whole epoch without one usable item

    def state(self, phase_done: bool) -> dict:
        # the batch after the last one consumed (a prefetching DataLoader has read further)
        if phase_done or self.sampler is None:
            position = {"epoch": 0, "position": 0}
        else:
            position = state_after(self.last_key) if self.last_key is not None else self.sampler.state_dict()
        return {"sampler": position, "stream": None}

    def negative_pool(self, accelerator) -> NegativePool:
        pool = NegativePool.from_manifest(self._manifest, self.index)
        return NegativePool(pool.embeddings, pool.identity_ids + self.identity_offset)

    def sample_item(self, options: DataOptions) -> dict | None:
        from train.sampling import pick_sample_item

        return pick_sample_item(options, self._manifest, self.index)

    def stop(self) -> None:
        self.loader = self.batches = None


class MultiID2MSource(DataSource):
    """MultiID-2M webdataset shards as released, read in place, with their references, cluster
    centres and the GT landmarks (detected once and cached: the release has none)."""

    kind = "multiid2m"

    def __init__(self, config, accelerator, skips: SkipLedger, output_dir: Path):
        from train.data.multiid2m.format import expand_shards
        from train.data.multiid2m.identities import IdentityNumbers, read_cluster_centres
        from train.data.multiid2m.landmarks import detect_landmarks, load_landmarks
        from train.data.multiid2m.references import open_references
        from train.processes import main_process_first

        section = config.data.multiid2m
        self.section, self.config = section, config
        self.shards = expand_shards(section.shards)
        self.cache = section.landmarks or str(output_dir / "landmarks")
        self.refs = None
        if section.refs:
            # a folder, or the released tars read in place: the main process indexes them once (cached in
            # <cache>/ref-index/), the other ranks then read that index instead of scanning every tar too
            self.refs = main_process_first(
                accelerator, lambda: open_references(section.refs, self.cache), "indexing the references"
            )
            if not accelerator.is_main_process:
                self.refs = open_references(section.refs, self.cache)
            if accelerator.is_main_process and getattr(self.refs, "scanned", 0):
                logger.info("indexed %d reference tar(s) into %s", self.refs.scanned, Path(self.cache) / "ref-index")
        bad_centres: list = []
        self.centres = read_cluster_centres(section.cluster_centers, bad_centres) if section.cluster_centers else {}
        skips.add(bad_centres, samples=False)
        self.numbers = IdentityNumbers(sorted(set(self.refs.names() if self.refs else []) | set(self.centres)))
        if any(p.gt_aligned and p.uses_id_losses for p in config.phases):
            # the release has no landmarks: the GT-aligned ID loss needs them, detected once and cached
            def detect() -> int:
                from withanyone_core.faces import FaceAnalyzer

                return detect_landmarks(
                    self.shards,
                    self.cache,
                    FaceAnalyzer(config.models.antelopev2, providers="auto"),
                    max_pixels=config.data.max_image_pixels,
                )

            detected = main_process_first(accelerator, detect, "detecting the GT landmarks")
            if detected:
                logger.info("detected GT landmarks of %d shard(s) into %s", detected, self.cache)
        logger.info(
            "MultiID-2M: %d shard(s), %s, %d identities with cluster centres",
            len(self.shards),
            f"references from {self.refs.description}"
            if self.refs
            else "references are the training photos themselves",
            len(self.centres),
        )
        self.landmarks = load_landmarks(self.shards, self.cache)
        self.loader = self.batches = None
        self.consumed = 0  # batches this process took from the phase's stream
        self.layout = {"workers": config.data.num_workers, "world": accelerator.num_processes}

    def start_phase(self, loading: PhaseLoading, saved: dict | None) -> str:
        from train.data.multiid2m.stream import MultiID2MStream

        saved_stream = saved.get("stream") if saved is not None else None
        layout = {"workers": loading.workers, "world": loading.world}
        if saved_stream is not None and {k: saved_stream[k] for k in layout} != layout:
            raise RuntimeError(
                f"the checkpoint's MultiID-2M stream position was saved with {saved_stream['world']} process(es) "
                f"x {saved_stream['workers']} DataLoader worker(s); resume with the same (now {loading.world} x "
                f"{loading.workers}: set data.num_workers / the process count back) or start a new output_dir"
            )
        self.layout = layout
        self.consumed = int(saved_stream["batches"]) if saved_stream is not None else 0
        stream = MultiID2MStream(
            self.shards,
            loading.options,
            loading.batch_size,
            seed=loading.seed,
            rank=loading.rank,
            world_size=loading.world,
            shuffle_buffer=self.section.shuffle_buffer,
            refs=self.refs,
            numbers=self.numbers,
            landmarks=self.landmarks,
            skip_batches=self.consumed,
        )
        self.loader = loading.loader(stream, batch_size=None)
        self.batches = iter(self.loader)
        return f"{len(self.shards)} MultiID-2M shards"

    def next_batch(self) -> dict:
        batch = next(self.batches)
        self.consumed += 1
        return batch

    def state(self, phase_done: bool) -> dict:
        return {
            "sampler": {"epoch": 0, "position": 0},
            "stream": {"batches": 0 if phase_done else self.consumed, **self.layout},
        }

    def negative_pool(self, accelerator) -> NegativePool:
        from train.data.multiid2m.identities import negative_pool_tensors
        from train.processes import main_process_first

        # built once (the authors cache theirs as ref_dict.pth), keyed by what it is built from
        # (reference tars by path, size and mtime, so a changed tar builds a new pool; a folder by its path)
        digest = hashlib.sha1(
            json.dumps(
                [self.refs.fingerprint() if self.refs else None, self.section.cluster_centers, self.shards]
            ).encode("utf-8")
        )
        for name, centre in sorted(self.centres.items()):  # changed centres build a new pool
            digest.update(name.encode("utf-8") + np.ascontiguousarray(centre, dtype=np.float32).tobytes())
        cached = Path(self.cache) / f"negatives-{digest.hexdigest()[:12]}.safetensors"

        def build_pool() -> None:
            if not cached.is_file():
                cached.parent.mkdir(parents=True, exist_ok=True)
                NegativePool(*negative_pool_tensors(self.refs, self.centres, self.numbers, self.shards)).save(cached)
                logger.info("negative pool written to %s", cached)

        main_process_first(accelerator, build_pool, "building the negative pool")
        return NegativePool.load(cached)

    def sample_item(self, options: DataOptions) -> dict | None:
        from train.sampling import pick_sample_item

        return pick_sample_item(options, shards=self.shards, numbers=self.numbers, landmarks=self.landmarks)

    def stop(self) -> None:
        self.loader = self.batches = None


class MixedSource(DataSource):
    """A manifest and MultiID-2M shards, each step drawn from one of them by ``data.mix`` weights.

    The draw depends on (seed, step) only: the same on every process and after a resume. The manifest's
    identity ids are moved by :data:`MANIFEST_ID_OFFSET` so they never meet the shards' ids."""

    kind = "mix"

    def __init__(self, manifest: ManifestSource, stream: MultiID2MSource, weights: tuple[float, float], seed: int):
        self.manifest_part, self.stream_part = manifest, stream
        self.weights, self.seed = weights, seed

    @property
    def manifest(self) -> Manifest:
        return self.manifest_part.manifest

    def start_phase(self, loading: PhaseLoading, saved: dict | None) -> str:
        return " + ".join(part.start_phase(loading, saved) for part in (self.manifest_part, self.stream_part))

    def for_step(self, step: int) -> DataSource:
        w_manifest, w_stream = self.weights
        draw = random.Random(f"{self.seed}:mix:{step}").random()
        return self.manifest_part if draw * (w_manifest + w_stream) < w_manifest else self.stream_part

    def next_batch(self) -> dict:
        raise RuntimeError("a mix serves each step from one of its parts: ask for_step(step) first")

    def state(self, phase_done: bool) -> dict:
        return {**self.manifest_part.state(phase_done), "stream": self.stream_part.state(phase_done)["stream"]}

    def negative_pool(self, accelerator) -> NegativePool:
        stream, manifest = self.stream_part.negative_pool(accelerator), self.manifest_part.negative_pool(accelerator)
        return NegativePool(
            torch.cat([stream.embeddings, manifest.embeddings]), torch.cat([stream.identity_ids, manifest.identity_ids])
        )

    def sample_item(self, options: DataOptions) -> dict | None:
        return self.manifest_part.sample_item(options)

    def stop(self) -> None:
        self.manifest_part.stop()
        self.stream_part.stop()


def open_data_source(config, accelerator, skips: SkipLedger, output_dir: Path) -> DataSource:
    """The source ``data.source`` names: ``manifest``, ``multiid2m`` or ``mix``."""
    source = config.data.source
    if source == "manifest":
        return ManifestSource(config.data.manifest, skips)
    if source == "multiid2m":
        return MultiID2MSource(config, accelerator, skips, output_dir)
    if source == "mix":
        return MixedSource(
            ManifestSource(config.data.manifest, skips, identity_offset=MANIFEST_ID_OFFSET),
            MultiID2MSource(config, accelerator, skips, output_dir),
            tuple(config.data.mix),
            config.seed,
        )
    raise ValueError(f"unknown data.source {source!r}: use manifest, multiid2m or mix")
