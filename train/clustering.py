"""prepare.py's identities: faces grouped by ArcFace similarity, with the cannot-link rule.

Two stages. **Search** finds every pair of faces with cosine >= the threshold; it is the
O(N^2) part and has three back ends:

- ``exact``: row blocks of the similarity matrix (memory O(block x N)), each block a unit
  of work that ``map_blocks`` can hand to Ray tasks;
- ``faiss``: an inverted-file index (``IndexIVFFlat``, inner product) and a range search
  per row block, when ``faiss`` is installed (``pip install faiss-cpu`` or ``faiss-gpu``).
  Approximate: a pair whose faces fall in cells more than ``nprobe`` apart is missed;
  with ``nprobe`` >= the number of cells it is exhaustive and equals ``exact``;
- ``auto`` (default): ``exact`` up to ``exact_below`` faces, ``faiss`` above when
  installed, else ``exact`` (with a log line saying that faiss would be faster).

Every back end only *proposes* candidate pairs (with a small margin below the threshold);
the similarities that decide are recomputed one way for all of them, so the back ends
differ only in which true pairs they may miss, never in the order of the merges.

**Merging** (on the driver, cheap next to the search): single linkage along the most
similar pairs first, refusing any merge that would put two faces of one photo into one
identity (a photo shows each person once).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("withanyone.prepare")

CLUSTER_BLOCK = 2048  # rows per search block
EXACT_BELOW = 50_000  # faces up to which "auto" searches exactly
# candidates are collected this far below the threshold, then decided on recomputed similarities,
# so float differences between back ends (BLAS blocking, faiss kernels) cannot drop a true pair
CANDIDATE_MARGIN = 1e-4
RECOMPUTE_CHUNK = 1 << 15  # candidate pairs whose similarity is recomputed at once
FAISS_TRAIN_PER_CELL = 64  # training vectors per IVF cell (faiss warns below 39)


@dataclass(frozen=True)
class ClusterSearch:
    """How the similar pairs are found (see the module docstring)."""

    index: str = "auto"  # auto | exact | faiss
    nprobe: int = 16  # faiss: cells searched per query
    cells: int = 0  # faiss: IVF cells (0 = about 4 sqrt(N))
    exact_below: int = EXACT_BELOW
    block: int = CLUSTER_BLOCK

    def __post_init__(self):
        if self.index not in ("auto", "exact", "faiss"):
            raise ValueError(f"cluster index must be auto, exact or faiss, got {self.index!r}")
        if self.nprobe < 1 or self.block < 1 or self.cells < 0:
            raise ValueError("cluster search: nprobe and block must be >= 1 and cells >= 0")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _local_map(function: Callable, shared, argument_tuples: Sequence[tuple]) -> list:
    return [function(shared, *args) for args in argument_tuples]


def _exact_block(embs: np.ndarray, start: int, stop: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i, j), i < j, of rows ``start:stop`` against all rows."""
    block = embs[start:stop] @ embs.T
    i, j = np.nonzero(block >= floor)
    keep = start + i < j
    return (start + i[keep]).astype(np.int64), j[keep].astype(np.int64)


# one deserialised faiss index per (Ray worker) process, keyed by the index's token
_FAISS_INDEXES: dict[str, object] = {}


def _faiss_block(shared: tuple, start: int, stop: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of rows ``start:stop`` from a range search of the shared IVF index."""
    import faiss

    token, index_bytes, embs, nprobe = shared
    index = _FAISS_INDEXES.get(token)
    if index is None:
        _FAISS_INDEXES.clear()  # one run's index at a time
        index = _FAISS_INDEXES[token] = faiss.deserialize_index(np.asarray(index_bytes))
        if hasattr(index, "nprobe"):
            index.nprobe = nprobe
    lims, _, found = index.range_search(np.ascontiguousarray(embs[start:stop]), floor)
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
    found = found.astype(np.int64)
    keep = rows != found
    rows, found = rows[keep], found[keep]
    return np.minimum(rows, found), np.maximum(rows, found)  # each pair once, as (low, high)


def _faiss_shared(embs: np.ndarray, search: ClusterSearch) -> tuple:
    import faiss

    n, dim = embs.shape
    cells = search.cells or max(1, int(4 * math.sqrt(n)))
    cells = max(1, min(cells, n // 39))  # faiss needs ~39 training points per cell
    rng = np.random.default_rng(0)  # the index (and so the result) depends on the data only
    sample = (
        embs
        if n <= cells * FAISS_TRAIN_PER_CELL
        else embs[np.sort(rng.choice(n, cells * FAISS_TRAIN_PER_CELL, replace=False))]
    )
    if cells == 1:  # too few faces for cells: a flat (exhaustive) index
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.cp.niter = 10  # the cells only route the search; rough k-means is enough
        index.train(np.ascontiguousarray(sample))
    index.add(embs)
    nprobe = min(search.nprobe, cells)
    logger.info(
        "clustering: faiss IVF index of %d faces in %d cells, %d searched per face%s",
        n,
        cells,
        nprobe,
        " (exhaustive)" if nprobe == cells else "",
    )
    return uuid.uuid4().hex, faiss.serialize_index(index), embs, nprobe


def choose_backend(count: int, search: ClusterSearch) -> str:
    if search.index == "exact":
        return "exact"
    if search.index == "faiss":
        if not faiss_available():
            raise RuntimeError(
                "--cluster-index faiss needs the faiss package: `pip install faiss-cpu` "
                "(or faiss-gpu), or use --cluster-index exact"
            )
        return "faiss"
    if count <= search.exact_below:
        return "exact"
    if faiss_available():
        return "faiss"
    logger.info(
        "clustering %d faces with exact search; `pip install faiss-cpu` makes this much faster above %d "
        "faces (--cluster-index)",
        count,
        search.exact_below,
    )
    return "exact"


def similar_pairs(
    embs: np.ndarray, threshold: float, search: ClusterSearch = ClusterSearch(), map_blocks: Callable | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, sims): every found pair i < j of unit vectors with cosine >= ``threshold``.

    ``map_blocks(function, shared, argument_tuples)`` -> ``[function(shared, *args), ...]``
    runs the row blocks (e.g. as Ray tasks with ``shared`` put in the object store once);
    default: here, one block after another.
    """
    embs = np.ascontiguousarray(embs, dtype=np.float32)
    n = len(embs)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty, np.zeros(0, np.float32)
    backend = choose_backend(n, search)
    floor = threshold - CANDIDATE_MARGIN
    blocks = [(start, min(start + search.block, n), floor) for start in range(0, n, search.block)]
    if backend == "faiss":
        function, shared = _faiss_block, _faiss_shared(embs, search)
    else:
        function, shared = _exact_block, embs
    results = (map_blocks or _local_map)(function, shared, blocks)
    rows = np.concatenate([r for r, _ in results]) if results else empty
    cols = np.concatenate([c for _, c in results]) if results else empty
    pair_ids = np.unique(rows * n + cols)  # faiss finds a pair from both ends
    rows, cols = pair_ids // n, pair_ids % n
    sims = np.empty(len(rows), np.float32)
    for at in range(0, len(rows), RECOMPUTE_CHUNK):  # one formula decides for every back end; chunks bound memory
        part = slice(at, at + RECOMPUTE_CHUNK)
        sims[part] = np.einsum("ij,ij->i", embs[rows[part]], embs[cols[part]])
    keep = sims >= threshold
    return rows[keep], cols[keep], sims[keep]


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def assign_identities(
    entries: dict[str, dict],
    threshold: float,
    search: ClusterSearch = ClusterSearch(),
    map_blocks: Callable | None = None,
) -> dict[tuple[str, int], str]:
    """(photo, face index) -> identity name.

    Photos in per-person subfolders give their largest face that folder's name. Every other
    face joins a named person when close enough to that person's mean (best match first,
    each name once per photo), else is clustered with the other unnamed faces; cluster
    names are ``person_NNNN`` (numbers a folder already uses are skipped).
    """
    labels: dict[tuple[str, int], str] = {}
    named: dict[str, list[np.ndarray]] = defaultdict(list)
    pending: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for rel, entry in sorted(entries.items()):
        folder = Path(rel).parent.as_posix()
        faces = entry["faces"]
        largest = max(
            range(len(faces)),
            default=None,
            key=lambda i: (faces[i]["box"][2] - faces[i]["box"][0]) * (faces[i]["box"][3] - faces[i]["box"][1]),
        )
        for i, face in enumerate(faces):
            emb = _normalise(np.asarray(face["embedding"], dtype=np.float32))
            if folder != "." and i == largest:
                labels[(rel, i)] = folder
                named[folder].append(emb)
            else:
                pending[rel].append((i, emb))
    names = sorted(named)
    centroids = np.stack([_normalise(np.mean(named[name], axis=0)) for name in names]) if names else None
    unlabelled: list[tuple[tuple[str, int], np.ndarray]] = []
    for rel in sorted(pending):
        taken = {labels[(rel, i)] for i in range(len(entries[rel]["faces"])) if (rel, i) in labels}
        options = []
        if centroids is not None:
            scores = np.stack([emb for _, emb in pending[rel]]) @ centroids.T
            options = sorted(
                (-float(scores[k, c]), i, names[c])
                for k, (i, _) in enumerate(pending[rel])
                for c in np.nonzero(scores[k] >= threshold)[0]
            )
        for _, i, name in options:  # best match first, each name once per photo
            if (rel, i) not in labels and name not in taken:
                labels[(rel, i)] = name
                taken.add(name)
        unlabelled += [((rel, i), emb) for i, emb in pending[rel] if (rel, i) not in labels]
    roots = _merge_cannot_link(unlabelled, threshold, search, map_blocks)
    clusters: dict[int, str] = {}
    numbers = (f"person_{n:04d}" for n in range(1, len(unlabelled) + len(named) + 2))
    for i, (key, _) in enumerate(unlabelled):
        if roots[i] not in clusters:
            clusters[roots[i]] = next(name for name in numbers if name not in named)
        labels[key] = clusters[roots[i]]
    return labels


def _merge_cannot_link(
    faces: list[tuple[tuple[str, int], np.ndarray]],
    threshold: float,
    search: ClusterSearch,
    map_blocks: Callable | None,
) -> list[int]:
    """Single-linkage cluster root of each face (union-find), most similar pairs first."""
    parent = list(range(len(faces)))
    photos = [{key[0]} for key, _ in faces]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if faces:
        rows, cols, sims = similar_pairs(np.stack([e for _, e in faces]), threshold, search, map_blocks)
        refused = 0
        for k in np.lexsort((cols, rows, -sims)):  # most similar pairs first, ties in a fixed order
            a, b = root(int(rows[k])), root(int(cols[k]))
            if a == b:
                continue
            if photos[a] & photos[b]:
                refused += 1
                continue
            if len(photos[a]) > len(photos[b]):  # union by size keeps the photo sets' merging O(N log N)
                a, b = b, a
            parent[a] = b
            photos[b] |= photos[a]
            photos[a] = set()
        if refused:
            logger.info(
                "clustering: %d merges refused that would have put two faces of one photo into one identity", refused
            )
    return [root(i) for i in range(len(faces))]
