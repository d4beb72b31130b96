"""The resumable batch sampler: batches of one bucket and person count, sharded over ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class ItemKey(NamedTuple):
    """What fixes one item completely: its epoch, its batch's position in the epoch, its dataset position.

    The dataset draws every random choice from the key, so an item is the same in the
    training process and in any DataLoader worker, and a resumed run repeats it exactly.
    """

    epoch: int
    batch: int
    position: int


def state_after(key: ItemKey) -> dict:
    """The sampler state that continues right after the batch holding ``key``."""
    return {"epoch": int(key.epoch), "position": int(key.batch) + 1}


class BucketBatchSampler:
    """Batches of one bucket and person count each, shuffled deterministically from (seed, epoch).

    Yields lists of :class:`ItemKey`. Its position is saved/restored (``state_dict``) so a
    resumed run continues with the exact next batch; when a DataLoader prefetches, save
    :func:`state_after` of the last batch *consumed* instead. With ``num_replicas > 1``
    each rank takes every n-th batch.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
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
            batches += [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size] or batches
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
        usable = len(batches) - len(batches) % self.num_replicas if len(batches) >= self.num_replicas else len(batches)
        return batches[:usable][self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[list[ItemKey]]:
        while True:
            batches = self._batches(self.epoch)
            while self.position < len(batches):
                batch = [ItemKey(self.epoch, self.position, pos) for pos in batches[self.position]]
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
