"""prepare.py's scale-out path on Ray: ``python train/prepare.py ... --ray [ADDRESS]``.

Detection + embedding run as a Ray Data actor pool (one FaceAnalyzer per actor: one per
GPU when Ray sees GPUs, else one per 2 CPUs); their entries stream back into prepare.py's
resumable ``faces.partial.jsonl``. The clustering's similarity search runs as one Ray task
per row block (the embeddings, or the serialised faiss index, put in the object store
once); the merges, identities and the manifest are computed on the driver exactly as
without Ray. ``--format multiid2m`` shards and identity chunks are written as one Ray task
each, resumable per unit (see train/data/multiid2m/write.py), so the output is the same
bytes as the single-process path. With a ``ray://`` cluster, ``--images`` and ``--out``
must be on a file system every node mounts at the same path. ``ADDRESS``: ``local`` (a
Ray started here) or ``ray://...``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("withanyone.prepare")


def start(address: str = "local", num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    logger.info("Ray: %s", ray.cluster_resources())


class _Detector:
    """One FaceAnalyzer per actor; rows {"photo", "rel"} -> rows {"entry": JSON of the detections}."""

    def __init__(self, antelopev2: str, analyzer_kwargs: dict, min_face: int, max_pixels: int | None = None):
        from withanyone_core.faces import FaceAnalyzer

        self.analyzer = FaceAnalyzer(antelopev2, **analyzer_kwargs)
        self.min_face = min_face
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        from train.prepare_photos import analyse_photo

        entries = [
            json.dumps(analyse_photo(Path(photo), rel, self.analyzer, self.min_face, self.max_pixels))
            for photo, rel in zip(batch["photo"], batch["rel"])
        ]
        return {"entry": entries}


def detector_pool(antelopev2, analyzer_kwargs: dict, min_face: int, actors: int = 0, max_pixels: int | None = None):
    """``analyse_many(todo)`` for :func:`train.prepare_photos.detect_all`: the entries, streamed from the pool."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if actors <= 0:
        actors = gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)
    kwargs = dict(analyzer_kwargs)
    if gpus and kwargs.get("providers") == "auto":
        kwargs["providers"] = "cuda"

    def analyse_many(todo):
        if not todo:
            return
        dataset = ray.data.from_items([{"photo": str(photo), "rel": rel} for photo, rel in todo])
        results = dataset.map_batches(
            _Detector,
            fn_constructor_kwargs={
                "antelopev2": str(antelopev2),
                "analyzer_kwargs": kwargs,
                "min_face": min_face,
                "max_pixels": max_pixels,
            },
            batch_size=8,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
        logger.info("Ray: detecting %d photos on %d actor(s)", len(todo), actors)
        for row in results.iter_rows():
            yield json.loads(row["entry"])

    return analyse_many


def parallel_map(function, argument_tuples: list[tuple]) -> list:
    """``[function(*args) for args in argument_tuples]`` as Ray tasks, results in order."""
    import ray

    remote = ray.remote(function)
    return ray.get([remote.remote(*args) for args in argument_tuples])


def block_map(function, shared, argument_tuples: list[tuple]) -> list:
    """``[function(shared, *args) for args in argument_tuples]`` as Ray tasks; ``shared`` (the
    embeddings, a serialised index) goes to the object store once, not once per task."""
    import ray

    shared_ref = ray.put(shared)
    remote = ray.remote(function)
    return ray.get([remote.remote(shared_ref, *args) for args in argument_tuples])
