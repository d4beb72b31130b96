"""Identities of a manifest and the negative pool of the ID-contrastive loss."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .records import EMBEDDING_NORM_RANGE, Manifest


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


class NegativePool:
    """Extended negatives for the ID-contrastive loss: embeddings with their identity ids.

    Sampling follows the authors' loader: identities are drawn uniformly (with
    replacement) among those allowed, then one embedding of each, so identities with
    many photos are not over-represented.
    """

    def __init__(self, embeddings: torch.Tensor, identity_ids: torch.Tensor):
        if embeddings.ndim != 2 or embeddings.shape[0] != identity_ids.shape[0]:
            raise ValueError("negative pool needs embeddings [P, D] and identity ids [P]")
        self.embeddings = embeddings.float()
        self.identity_ids = identity_ids.long()
        self._order = torch.argsort(self.identity_ids, stable=True)
        self._identities, self._counts = torch.unique_consecutive(self.identity_ids[self._order], return_counts=True)
        self._starts = torch.cumsum(self._counts, 0) - self._counts

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def from_manifest(cls, manifest: Manifest, index) -> NegativePool:
        embs, ids = [], []
        for record in manifest.records:
            for person in record.persons:
                embs.append(torch.from_numpy(person.embedding))
                ids.append(index.ids[person.identity])
        return cls(torch.stack(embs), torch.tensor(ids))

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": self.embeddings.contiguous(), "identity_ids": self.identity_ids}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NegativePool:
        from withanyone_core.checkpoints.reading import load_safetensors

        tensors = load_safetensors(path)
        missing = {"embeddings", "identity_ids"} - set(tensors)
        if missing:
            raise ValueError(
                f"{path} is not a negative pool (missing {sorted(missing)}); rebuild it with `python train/prepare.py`"
            )
        embeddings, ids = tensors["embeddings"].float(), tensors["identity_ids"]
        if embeddings.ndim != 2 or ids.ndim != 1 or embeddings.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{path}: a negative pool holds embeddings [P, D] and identity_ids [P], got "
                f"{list(embeddings.shape)} and {list(ids.shape)}; rebuild it with `python train/prepare.py`"
            )
        norms = embeddings.double().norm(dim=1)
        good = (
            torch.isfinite(embeddings).all(dim=1)
            & (norms >= EMBEDDING_NORM_RANGE[0])
            & (norms <= EMBEDDING_NORM_RANGE[1])
        )
        bad = (~good).nonzero().flatten().tolist()
        if bad:
            if len(bad) == len(good):
                raise ValueError(
                    f"{path}: every one of its {len(bad)} embeddings is non-finite or of an impossible "
                    "norm; rebuild it with `python train/prepare.py`"
                )
            logging.getLogger(__name__).warning(
                "%s: skipping %d of %d negative embeddings that are non-finite or of an impossible norm (rows %s%s); "
                "rebuild it with `python train/prepare.py`",
                path,
                len(bad),
                len(good),
                bad[:10],
                " ..." if len(bad) > 10 else "",
            )
            embeddings, ids = embeddings[good], ids[good]
        return cls(embeddings, ids)

    def sample(
        self, k: int, exclude_identities: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``k`` embeddings ``[k, D]`` of identities not in ``exclude_identities``."""
        exclude = torch.as_tensor(
            list(exclude_identities) if not torch.is_tensor(exclude_identities) else exclude_identities,
            dtype=torch.long,
        ).flatten()
        candidates = (~torch.isin(self._identities, exclude)).nonzero().flatten()
        if candidates.numel() == 0:
            raise ValueError("the negative pool has no identity outside the batch: add more identities to the dataset")
        pick = candidates[torch.randint(candidates.numel(), (k,), generator=generator)]
        within = (torch.rand(k, generator=generator) * self._counts[pick]).long().clamp(max=self._counts[pick] - 1)
        return self.embeddings[self._order[self._starts[pick] + within]]

    def sample_per_anchor(
        self, k: int, anchor_identities: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[M, k, D]``: for each anchor, ``k`` embeddings of identities other than its own."""
        return torch.stack([self.sample(k, [int(i)], generator) for i in anchor_identities.flatten().cpu()])
