"""prepare.py benchmark: photos per second single-process vs on a local Ray, and the MultiID-2M stream.

Same folder for both paths: group photos with 1-4 faces; models: random-weight antelopev2
stand-ins whose compute is ``--scale`` x the real models' (as in bench_faces.py). Each
repetition runs both paths into fresh output folders, interleaved (single, Ray, single,
...); the Ray session is started once, before the first timing. Then the streaming
reader's samples per second over the shards prepare wrote (decode + crop + collate, no
DataLoader workers, then 2 workers). Reports median and min per path and the ratio.

    .venv/bin/python tests/bench/bench_prepare.py [--photos 24] [--reps 3] [--scale 0.25] [--ray-cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

logger = logging.getLogger("bench_prepare")


def _photos(folder: Path, count: int) -> None:
    from PIL import Image

    from withanyone_core.testing.faces import make_face_image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        n = 1 + i % 4
        cells = [
            (int(x), int(y)) for x, y in zip(rng.choice(np.arange(3, 18, 4), n, replace=False), rng.integers(3, 17, n))
        ]
        image = make_face_image(cells, identities=list(range(10 * (i % 6), 10 * (i % 6) + n)), seed=i)[0]
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text("a group photo")


def _stream_rate(shards: list[str], workers: int, batches: int) -> float:
    import torch

    from train.data import DataOptions
    from train.data.multiid2m import MultiID2MStream

    stream = MultiID2MStream(
        shards, DataOptions(buckets=((512, 512),), min_face_size=0, siglip_crops=False), batch_size=1, shuffle_buffer=16
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, multiprocessing_context="fork" if workers else None
    )
    it = iter(loader)
    next(it)  # worker start-up is not the reader's speed
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def _cluster_bench(faces: int, reps: int) -> None:
    from train.clustering import ClusterSearch, similar_pairs

    rng = np.random.default_rng(0)
    identities = max(1, faces // 10)
    centres = rng.normal(size=(identities, 512)).astype(np.float32)
    embs = centres[rng.integers(0, identities, faces)] + 0.075 * rng.normal(size=(faces, 512)).astype(np.float32)
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    threshold = 0.5
    searches = {"exact": ClusterSearch("exact"), "faiss": ClusterSearch("faiss")}
    times: dict[str, list[float]] = {name: [] for name in searches}
    found: dict[str, set] = {}
    for _ in range(reps):
        for name, search in searches.items():
            start = time.perf_counter()
            rows, cols, _ = similar_pairs(embs, threshold, search)
            times[name].append(time.perf_counter() - start)
            found[name] = set(zip(rows.tolist(), cols.tolist()))
    recall = len(found["faiss"] & found["exact"]) / max(1, len(found["exact"]))
    for name, values in times.items():
        logger.info(
            "cluster search %-5s %d faces: median %.2f s, min %.2f s",
            name,
            faces,
            statistics.median(values),
            min(values),
        )
    logger.info(
        "cluster bench %d faces: faiss %.1fx faster than exact (median), found %.4f of the %d exact pairs, "
        "none extra: %s",
        faces,
        statistics.median(times["exact"]) / statistics.median(times["faiss"]),
        recall,
        len(found["exact"]),
        found["faiss"] <= found["exact"],
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("withanyone.prepare", "withanyone_core.faces", "ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.25, help="stand-in compute as a fraction of the real models'")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--cluster-faces", type=int, default=40000, help="0 skips the clustering bench")
    args = parser.parse_args()
    import ray

    from train import prepare, prepare_ray
    from withanyone_core.testing.faces import build_tiny_antelopev2

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    build_tiny_antelopev2(root / "insightface", compute_scale=args.scale)
    _photos(root / "photos", args.photos)
    common = [
        "--images",
        str(root / "photos"),
        "--antelopev2",
        str(root / "insightface"),
        "--providers",
        "cpu",
        "--format",
        "multiid2m",
        "--shard-size",
        "8",
    ]
    prepare_ray.start("local", num_cpus=args.ray_cpus)
    times: dict[str, list[float]] = {"single": [], "ray": []}
    try:
        for rep in range(args.reps):
            for path, extra in (("single", []), ("ray", ["--ray", "--ray-actors", str(max(1, args.ray_cpus))])):
                out = root / f"out-{path}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                prepare.main(common + ["--out", str(out)] + extra)
                times[path].append(time.perf_counter() - start)
                logger.info("rep %d %-6s %.2f s", rep, path, times[path][-1])
    finally:
        ray.shutdown()
    for path, values in times.items():
        logger.info(
            "prepare %-6s photos/s median %.2f min-time %.2f (%d photos)",
            path,
            args.photos / statistics.median(values),
            args.photos / min(values),
            args.photos,
        )
    same = (root / "out-single" / "manifest.jsonl").read_bytes() == (root / "out-ray" / "manifest.jsonl").read_bytes()
    shards = sorted(str(p) for p in (root / "out-single" / "multiid2m" / "train").glob("*.tar"))
    rates = {w: [] for w in (0, 2)}
    for _ in range(args.reps):
        for workers in rates:
            rates[workers].append(_stream_rate(shards, workers, batches=2 * args.photos))
    for workers, values in rates.items():
        logger.info(
            "stream reader, %d worker(s): samples/s median %.1f max %.1f",
            workers,
            statistics.median(values),
            max(values),
        )
    ratio = statistics.median(times["single"]) / statistics.median(times["ray"])
    logger.info(
        "prepare bench: ray %.2fx the single-process photos/s (median), same manifest: %s; "
        "stream %.1f samples/s (0 workers), %.1f (2 workers)",
        ratio,
        same,
        statistics.median(rates[0]),
        statistics.median(rates[2]),
    )
    shutil.rmtree(root, ignore_errors=True)
    if args.cluster_faces:
        _cluster_bench(args.cluster_faces, args.reps)


if __name__ == "__main__":
    main()
