"""Score a folder of MultiID-Bench samples: ``python -m withanyone_core.bench_eval FOLDER``.

Layout (one folder per sample)::

    FOLDER/<sample>/out.jpg        the generated image
    FOLDER/<sample>/ori.jpg        the ground-truth photo
    FOLDER/<sample>/ref_1.jpg ...  ref_4.jpg  one reference photo per person, in order
    FOLDER/<sample>/meta.json      {"prompt": ...}

Writes ``<sample>/metrics.json`` for each sample and ``FOLDER/summary.json`` plus a
summary table (Sim(GT), Sim(Ref), CP, faces missing) on the log. Persons are the
reference photos in order; ground-truth faces are matched to them by similarity.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .faces import FaceAnalyzer, ImageReadError, NoFaceError, load_image, select_face
from .metrics import identity_metrics, match_faces

logger = logging.getLogger("withanyone.bench_eval")


def _find(sample: Path, stem: str) -> Path | None:
    for suffix in (".jpg", ".jpeg", ".png", ".webp"):
        if (sample / (stem + suffix)).is_file():
            return sample / (stem + suffix)
    return None


def score_sample(analyzer: FaceAnalyzer, sample: Path) -> dict:
    refs = []
    for k in range(1, 5):
        path = _find(sample, f"ref_{k}")
        if path is None:
            break
        face = select_face(analyzer.analyze(load_image(path), image_name=path.name), image_name=f"{sample.name}/{path.name}")
        refs.append(face.embedding)
    if not refs:
        raise NoFaceError(f"{sample.name}: no ref_1 image; each sample needs ref_1..ref_n")
    out_path, gt_path = _find(sample, "out"), _find(sample, "ori")
    if out_path is None:
        raise ImageReadError(f"{sample.name}: out.jpg (the generated image) is missing")
    generated = [f.embedding for f in analyzer.analyze(load_image(out_path), image_name=out_path.name)]
    gt = None
    if gt_path is not None:
        gt_faces = [f.embedding for f in analyzer.analyze(load_image(gt_path), image_name=gt_path.name)]
        pairs = dict(match_faces(np.array(gt_faces).reshape(-1, 512), np.array(refs)))  # ref person -> gt face
        if len(pairs) == len(refs):
            gt = np.array([gt_faces[pairs[k]] for k in range(len(refs))])
        else:
            logger.warning("%s: ground truth has %d faces for %d persons; Sim(GT) and CP skipped",
                           sample.name, len(gt_faces), len(refs))
    result = identity_metrics(np.array(generated).reshape(-1, 512), np.array(refs), gt)
    meta = sample / "meta.json"
    if meta.is_file():
        result["prompt"] = json.loads(meta.read_text()).get("prompt")
    return result


def evaluate(folder: Path, analyzer: FaceAnalyzer) -> dict:
    samples = sorted(p for p in folder.iterdir() if p.is_dir())
    if not samples:
        raise SystemExit(f"{folder} holds no sample folders (expected <sample>/out.jpg, ori.jpg, ref_1.jpg, ...)")
    rows, failed = [], {}
    for sample in samples:
        try:
            result = score_sample(analyzer, sample)
        except (NoFaceError, ImageReadError) as exc:
            failed[sample.name] = str(exc)
            logger.warning("%s", exc)
            continue
        (sample / "metrics.json").write_text(json.dumps(result, indent=1))
        rows.append((sample.name, result))
    summary = {"samples": len(samples), "scored": len(rows), "failed": failed}
    for key in ("sim_gt", "sim_ref", "cp"):
        values = [r[key] for _, r in rows if key in r]
        if values:
            summary[key] = float(np.mean(values))
    summary["missing_faces"] = int(sum(len(r["missing"]) for _, r in rows))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    header = f"{'sample':<24} {'Sim(GT)':>8} {'Sim(Ref)':>9} {'CP':>7} {'missing':>8}"
    lines = [header, "-" * len(header)]

    def fmt(d, key):
        return f"{d[key]:.3f}" if key in d else "-"

    for name, r in rows:
        lines.append(f"{name:<24} {fmt(r, 'sim_gt'):>8} {fmt(r, 'sim_ref'):>9} {fmt(r, 'cp'):>7} {len(r['missing']):>8}")
    lines.append(f"{'mean':<24} {fmt(summary, 'sim_gt'):>8} {fmt(summary, 'sim_ref'):>9} {fmt(summary, 'cp'):>7} "
                 f"{summary['missing_faces']:>8}")
    logger.info("\n%s", "\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--antelopev2", type=Path, required=True,
                        help="insightface models root holding models/antelopev2/ (e.g. ComfyUI/models/insightface)")
    parser.add_argument("--providers", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--det-thresh", type=float, default=0.4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    return evaluate(args.folder, FaceAnalyzer(args.antelopev2, providers=args.providers, det_thresh=args.det_thresh))


if __name__ == "__main__":
    main()
