"""Identities of MultiID-2M: the cluster centres, identity numbers shared by every process, and the
negative pool of the ID-contrastive loss (references' embeddings, else the centres)."""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..records import EMBEDDING_DIM
from .format import (
    ShardFormatError,
    StreamSample,
    UnsafePickleError,
    check_embeddings,
    load_npy,
    parsed_samples,
)
from .references import ReferenceFolder, ReferenceTars

logger = logging.getLogger(__name__)


# the authors build each identity's negative set from at most 200 reference embeddings
MAX_REFS_PER_IDENTITY = 200


def read_cluster_centres(source: str | os.PathLike, skipped: list | None = None) -> dict[str, np.ndarray]:
    """``<folder>/<name>.npy``, or the members ``[.../]<name>.npy`` of ``ref/cluster_centers.tar``
    (one streaming pass, never untarred) -> the identity's 512-d centre (plain or pickled .npy).
    A centre that is not 512 finite numbers of a plausible norm is skipped with a warning naming it
    (and appended to ``skipped`` as (where, reason, message))."""
    found: dict[str, tuple[bytes, str]] = {}
    source = Path(source)
    if source.is_file():
        try:
            with tarfile.open(source, mode="r|*") as tar:
                for info in tar:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isfile() and base.endswith(".npy") and not base.startswith("."):
                        found[base[: -len(".npy")]] = (tar.extractfile(info).read(), f"{source}:{info.name}")
        except tarfile.TarError as exc:
            raise ShardFormatError(
                f"{source}: not a readable tar ({exc}); data.multiid2m.cluster_centers takes "
                "ref/cluster_centers.tar or the folder it untars into"
            ) from exc
    else:
        for path in sorted(source.glob("*.npy")):
            found[path.stem] = (path.read_bytes(), str(path))
    out = {}
    for name in sorted(found):
        data, where = found[name]
        try:
            value = load_npy(data, where)
            try:
                centre = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ShardFormatError(f"{where}: not an array of numbers ({exc})", "embedding_shape") from exc
            if centre.size < EMBEDDING_DIM or centre.size % EMBEDDING_DIM:
                raise ShardFormatError(
                    f"{where}: a cluster centre of shape {list(centre.shape)}; expected "
                    f"[{EMBEDDING_DIM}] (or [k, {EMBEDDING_DIM}]: the first is used)",
                    "embedding_shape",
                )
            centre = centre.reshape(-1, EMBEDDING_DIM)[0]
            check_embeddings(centre[None], where)
        except UnsafePickleError:
            raise
        except ShardFormatError as exc:
            logger.warning("cluster centres: skipping %s (%s): %s", name, exc.reason, exc)
            if skipped is not None:
                skipped.append((where, exc.reason, str(exc)))
            continue
        out[name] = centre
    return out


def _stable_id(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:7], "big")


class IdentityNumbers:
    """Names -> identity ids shared by every process: listed names 0..K-1, others a stable hash above.

    Unidentifiable persons get an id of their own (negative, from shard and key), so they are
    never another sample's positive nor excluded from anyone's negatives.
    """

    def __init__(self, names: Sequence[str]):
        self.ids = {name: i for i, name in enumerate(sorted(set(names)))}

    def of(self, name: str | None, sample: StreamSample, person: int) -> int:
        if name is None:
            return -1 - _stable_id(f"{sample.where}#{person}")
        return self.ids.get(name, (1 << 56) + _stable_id(name))


def negative_pool_tensors(
    refs: ReferenceFolder | ReferenceTars | None,
    centres: dict[str, np.ndarray],
    numbers: IdentityNumbers,
    shards: Sequence[str] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and identity ids of the negative pool.

    The authors' pool: up to 200 reference embeddings per identity; an identity without
    references contributes its cluster centre. Without either, the shards' own faces
    (named ones under their name, each unidentifiable face as an identity of its own).
    """
    embs, ids = [], []
    names = set(refs.names() if refs else []) | set(centres)
    for name in sorted(names):
        files = refs.files(name)[:MAX_REFS_PER_IDENTITY] if refs else []
        got = 0
        for path in files:
            try:
                embs.append(refs.read(path)[0])
            except (ShardFormatError, OSError, ValueError) as exc:
                if isinstance(exc, UnsafePickleError):
                    raise
                logger.warning("negative pool: skipping %s (%s)", path, exc)
                continue
            ids.append(numbers.ids.get(name, (1 << 56) + _stable_id(name)))
            got += 1
        if not got and name in centres:
            embs.append(centres[name])
            ids.append(numbers.ids.get(name, (1 << 56) + _stable_id(name)))
    if not embs:
        for shard in shards:
            for _, sample in parsed_samples(shard, "negative pool"):
                for i, person in enumerate(sample.persons):
                    embs.append(person.embedding)
                    ids.append(numbers.of(person.name, sample, i))
    if not embs:
        raise ValueError("no embedding for the negative pool: give data.multiid2m.refs or cluster_centers")
    return torch.from_numpy(np.stack(embs).astype(np.float32)), torch.tensor(ids, dtype=torch.long)
