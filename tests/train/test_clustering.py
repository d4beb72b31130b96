"""train/clustering.py: the similarity search back ends (exact, faiss; here and as Ray tasks) and their merges.

Embeddings are synthetic (identity centres + noise, unit length) so the true pairs are
known; faiss is the real package (requirements-dev.txt), Ray a real local 2-CPU Ray.
"""

import logging

import numpy as np
import pytest

from train import clustering
from train.clustering import ClusterSearch, assign_identities, similar_pairs


def _faces(identities: int, per_identity: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, 512))
    labels = np.repeat(np.arange(identities), per_identity)
    embs = centres[labels] + noise * rng.normal(size=(len(labels), 512))
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    return embs.astype(np.float32), labels


def _brute_force(embs: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = embs.astype(np.float64) @ embs.T.astype(np.float64)
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_exact_and_exhaustive_faiss_find_the_same_pairs_with_the_same_similarities():
    embs, _ = _faces(60, 25, noise=0.09)  # 1500 faces, same-identity cosine ~0.5-0.7
    threshold = 0.5
    exact = similar_pairs(embs, threshold, ClusterSearch("exact", block=300))
    cells = 1500 // 39
    faiss = similar_pairs(embs, threshold, ClusterSearch("faiss", cells=cells, nprobe=cells, block=256))
    for a, b in zip(exact, faiss):
        np.testing.assert_array_equal(a, b)
    truth = _brute_force(embs, threshold)
    assert set(zip(exact[0].tolist(), exact[1].tolist())) == truth
    assert len(truth) > 1000 and np.all(exact[0] < exact[1]) and np.all(exact[2] >= threshold)
    # the block size only splits the work
    for a, b in zip(exact, similar_pairs(embs, threshold, ClusterSearch("exact", block=7))):
        np.testing.assert_array_equal(a, b)


def test_approximate_faiss_misses_few_pairs_and_never_invents_one():
    embs, labels = _faces(200, 20, noise=0.08, seed=1)  # 4000 faces
    threshold = 0.45
    truth = _brute_force(embs, threshold)
    rows, cols, sims = similar_pairs(embs, threshold, ClusterSearch("faiss", cells=64, nprobe=8))
    found = set(zip(rows.tolist(), cols.tolist()))
    assert found <= truth
    assert len(found) >= 0.98 * len(truth), (len(found), len(truth))
    # the identities it yields are the true ones
    entries = {f"{i:05d}.png": {"faces": [{"box": [0, 0, 10, 10], "embedding": e}]} for i, e in enumerate(embs)}
    got = assign_identities(entries, threshold, ClusterSearch("faiss", cells=64, nprobe=8))
    names = [got[(f"{i:05d}.png", 0)] for i in range(len(embs))]
    same = {(labels[i] == labels[j]) == (names[i] == names[j]) for i, j in [(0, 1), (0, 20), (39, 40), (41, 42)]}
    assert same == {True}
    assert len(set(names)) == 200


def test_auto_searches_exactly_below_the_threshold_and_with_faiss_above():
    assert clustering.choose_backend(10, ClusterSearch("auto", exact_below=10)) == "exact"
    assert clustering.choose_backend(11, ClusterSearch("auto", exact_below=10)) == "faiss"
    assert clustering.choose_backend(10**9, ClusterSearch("exact")) == "exact"
    assert clustering.choose_backend(2, ClusterSearch("faiss")) == "faiss"


def test_without_faiss_auto_falls_back_to_exact_and_faiss_is_refused(monkeypatch, caplog):
    # faiss is installed here; the missing package is simulated
    monkeypatch.setattr(clustering, "faiss_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="withanyone.prepare"):
        assert clustering.choose_backend(11, ClusterSearch("auto", exact_below=10)) == "exact"
    assert "pip install faiss-cpu" in caplog.text
    with pytest.raises(RuntimeError, match="pip install faiss-cpu"):
        clustering.choose_backend(2, ClusterSearch("faiss"))
    with pytest.raises(ValueError, match="auto, exact or faiss"):
        ClusterSearch("annoy")


def test_search_blocks_as_ray_tasks_equal_the_local_search():
    ray = pytest.importorskip("ray")
    from train import prepare_ray

    embs, _ = _faces(30, 20, noise=0.09, seed=2)
    threshold = 0.5
    local = {
        name: similar_pairs(embs, threshold, search)
        for name, search in (
            ("exact", ClusterSearch("exact", block=128)),
            ("faiss", ClusterSearch("faiss", cells=8, nprobe=8)),
        )
    }
    prepare_ray.start("local", num_cpus=2)
    try:
        for name, search in (
            ("exact", ClusterSearch("exact", block=128)),
            ("faiss", ClusterSearch("faiss", cells=8, nprobe=8, block=100)),
        ):
            remote = similar_pairs(embs, threshold, search, map_blocks=prepare_ray.block_map)
            for a, b in zip(local[name], remote):
                np.testing.assert_array_equal(a, b)
    finally:
        ray.shutdown()


def test_cannot_link_holds_in_large_clusters():
    """Union by size must keep the rule: one photo's faces never share an identity, whatever the merge order."""
    embs, labels = _faces(3, 40, noise=0.05, seed=3)
    entries = {}
    for k in range(0, len(embs), 2):  # photos of two faces, often two look-alikes of one identity
        entries[f"{k:04d}.png"] = {
            "faces": [{"box": [0, 0, 10, 10], "embedding": embs[k]}, {"box": [20, 0, 30, 10], "embedding": embs[k + 1]}]
        }
    got = assign_identities(entries, 0.5)
    for photo in entries:
        assert got[(photo, 0)] != got[(photo, 1)]
    assert len(set(got.values())) >= 6  # each identity splits in at least two
