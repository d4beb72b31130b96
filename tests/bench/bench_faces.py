"""Face extraction benchmark: ours vs the reference's insightface usage, same images and models.

Reference usage (WithAnyone's FaceExtractor): ``FaceAnalysis(name="antelopev2")`` with all
five models, ``prepare(ctx_id, det_thresh=0.4)`` (detects at 128 and 640 px) and ``get()``
per image, which runs recognition, 3D landmarks, 2D landmarks and gender/age on every
face; the reference face is then picked from the result. Ours: one 640 px detection,
then recognition of the chosen face only (``FaceAnalyzer.extract``).

Models: random-weight antelopev2 stand-ins with the real interfaces whose compute is
``--scale`` x the real models' GFLOPs (see withanyone_core.testing.faces.ANTELOPEV2_GFLOPS);
images: group photos with 1-4 faces. Ends with exactly one line
``faces bench: <N>x faster, max diff <D>`` (N = time ratio per image, D = max |difference|
of the chosen faces' embeddings).

    .venv/bin/python tests/bench/bench_faces.py [--scale 0.25] [--images 8] [--reps 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from withanyone_core.faces import FaceAnalyzer  # noqa: E402
from withanyone_core.testing.faces import ANTELOPEV2_GFLOPS, build_tiny_antelopev2, make_face_image  # noqa: E402

logger = logging.getLogger("bench_faces")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("withanyone_core.faces").setLevel(logging.ERROR)  # "N faces, using the largest"
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="stand-in compute as a fraction of the real models'")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from insightface.app import FaceAnalysis

    root = Path(tempfile.mkdtemp(prefix="bench_faces_"))
    build_tiny_antelopev2(root, compute_scale=args.scale)
    for name, gflops in ANTELOPEV2_GFLOPS.items():
        logger.info("stand-in %-22s %.2f GFLOPs (%.2f x the real %.2f)", name, gflops * args.scale, args.scale, gflops)

    rng = np.random.default_rng(0)
    images = []
    for i in range(args.images):
        n = 1 + i % 4
        cells = [
            (int(x), int(y)) for x, y in zip(rng.choice(np.arange(3, 18, 4), n, replace=False), rng.integers(3, 17, n))
        ]
        images.append(make_face_image(cells, identities=list(range(10 * i, 10 * i + n)), seed=i)[0])
    logger.info("%d images with 1-4 faces (%d faces in all)", len(images), sum(1 + i % 4 for i in range(len(images))))

    reference = FaceAnalysis(name=str(root / "models" / "antelopev2"), providers=["CPUExecutionProvider"])
    reference.prepare(ctx_id=-1, det_thresh=0.4)
    ours = FaceAnalyzer(root, providers="cpu", det_thresh=0.4, det_size=640)

    def run_reference():
        out = []
        for img in images:
            faces = reference.get(np.ascontiguousarray(img[..., ::-1]))
            largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            out.append(largest.embedding)
        return out

    def run_ours():
        return [ours.extract(img).embedding for img in images]

    run_reference(), run_ours()  # warm-up (session creation, caches)
    t_ref = t_ours = float("inf")
    for rep in range(args.reps):
        start = time.perf_counter()
        ref_embs = run_reference()
        t_ref = min(t_ref, time.perf_counter() - start)
        start = time.perf_counter()
        our_embs = run_ours()
        t_ours = min(t_ours, time.perf_counter() - start)
        logger.info("rep %d: reference %.3f s, ours %.3f s", rep + 1, t_ref, t_ours)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_embs, our_embs))
    per_ref, per_ours = t_ref / len(images), t_ours / len(images)
    logger.info("per image: reference %.1f ms, ours %.1f ms", per_ref * 1e3, per_ours * 1e3)
    logger.info("faces bench: %.1fx faster, max diff %.1e", per_ref / per_ours, diff)


if __name__ == "__main__":
    main()
