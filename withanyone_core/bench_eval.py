"""Score MultiID-Bench results: ``python -m withanyone_core.bench_eval RESULTS [RESULTS ...] --insightface ROOT``.

Each RESULTS folder holds one method's outputs in the MultiID-Bench layout (one folder per
sample: ``out.jpg``, ``ori.jpg``, ``ref_1.jpg`` .. ``ref_4.jpg`` or the authors' 0-based
``ref_0.jpg`` .., ``meta.json`` with ``prompt``). For every sample this writes
``<sample>/metrics.json``; for every method ``RESULTS/summary.json``; and into ``--out``
the paper's tables (``tables.md``, ``tables.csv``; methods as rows, single-person and
multi-person subsets apart, the paper's published rows of Tables 1a, 2a, 2b beside the
measured ones), ``report.json`` (every method's summary) and ``tradeoff.png`` (Sim(GT)
against CP with every published method and fitted trade-off curve). The GT and Ref rows
(the ground truth and the reference scored as the output) are measured too and checked
against the metric's bounds (Sim(GT) 1, CP -1 / +1): a miss fails the run.

Identity metrics use insightface ``buffalo_l`` (the authors' choice) or ``antelopev2``
(``--face-model``), detection threshold 0.45, references padded onto a black square 1.5x
their long side; with ``--torch-faces`` also AdaFace IR-50 and FaceNet on facexlib-aligned
faces, and the table then shows the authors' average (the three models' values pooled). CLIP-I/CLIP-T, the aesthetic score and FID run when their local weights
are given. Aggregation follows the authors' code: 1.5 x IQR outliers dropped per metric,
the median when more than half would go. A rerun reuses every ``metrics.json`` made with
the same settings for an unchanged output (``--no-resume`` recomputes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .bench.aggregate import CP_GATES, gated, robust_stats
from .bench.faces import DET_THRESH, InsightFaceModel, pad_reference
from .bench.samples import Sample, list_samples
from .faces import FaceModelsNotFound, ImageReadError, load_image
from .metrics import identity_scores

logger = logging.getLogger("withanyone.bench_eval")

SCHEMA = 2  # bump when a per-sample record changes meaning
IDENTITY_KEYS = ("sim_gt", "sim_ref", "cp", "off_gt", "off_ref")


# --------------------------------------------------------------------------- one sample
def score_identity(
    face_model,
    output: np.ndarray,
    ground_truth: np.ndarray | None,
    references: list[np.ndarray],
    reference_embeddings: np.ndarray | None = None,
) -> dict:
    """Identity metrics of one sample with one face model (shared by the CLI and the ComfyUI node).

    ``reference_embeddings`` replaces detection on ``references`` (the node passes its identities').
    """
    if reference_embeddings is None:
        refs = [face_model.reference(r) for r in references]
        missing = [k + 1 for k, e in enumerate(refs) if e is None]
        if missing:  # the authors' get_multi_img_embeddings: no face in any reference -> no identity metrics
            return {
                "error": f"no face found in reference(s) {missing} (after padding)",
                "sim_ref": None,
                "sim_gt": None,
                "cp": None,
            }
        reference_embeddings = np.stack(refs)
    generated = face_model.faces(output)
    gt = face_model.faces(ground_truth) if ground_truth is not None else None
    return identity_scores(generated, reference_embeddings, gt, multi_person=len(reference_embeddings) > 1)


class Scorer:
    """Every metric model the run was given, and the settings a cached record must match."""

    def __init__(self, face_models: list, clip=None, aesthetic=None, settings: dict | None = None):
        self.face_models = face_models
        self.clip = clip
        self.aesthetic = aesthetic
        self.settings = {"schema": SCHEMA, **(settings or {})}

    def score(self, sample: Sample) -> dict:
        record = {"sample": sample.name, "persons": sample.persons, "prompt": sample.prompt, "settings": self.settings}
        if "error" in sample.meta:
            raise ValueError(sample.meta["error"])
        if not sample.refs:
            raise ImageReadError(f"{sample.name}: no reference photo (ref_1.jpg, or the authors' ref_0.jpg)")
        if sample.output is None:
            raise ImageReadError(f"{sample.name}: out.jpg (the generated image) is missing")
        output = load_image(sample.output)
        truth = load_image(sample.ground_truth) if sample.ground_truth is not None else None
        refs = [load_image(p) for p in sample.refs]
        record["face_models"] = {m.kind: score_identity(m, output, truth, refs) for m in self.face_models}
        if all(r.get("sim_ref") is None for r in record["face_models"].values()):
            # the authors drop such a sample from every metric, quality ones included
            reasons = "; ".join(r.get("error") or "no face found in the output" for r in record["face_models"].values())
            record.update(status="failed", error=reasons)
            return record
        if self.clip is not None:
            record["clip_t"] = self.clip.clip_t(output, sample.prompt)
            record["clip_i"] = self.clip.clip_i(truth, output) if truth is not None else None
        if self.aesthetic is not None:
            record["aesthetic"] = self.aesthetic(output)
        record["status"] = "ok"
        return record

    def bound_records(self, sample: Sample) -> tuple[dict, dict | None]:
        """The paper's GT and Ref rows for one sample: identity metrics of the ground truth scored as the
        output, and (one person only, as the paper's Ref row) of the reference scored as the output.

        The reference is scored as each face model sees it (padded as for its reference embedding), so a
        correct metric gives Sim(Ref) 1 and CP +1 exactly; the ground truth gives Sim(GT) 1 and CP -1.
        """
        base = {"sample": sample.name, "persons": sample.persons}
        try:
            if "error" in sample.meta:
                raise ValueError(sample.meta["error"])
            if not sample.refs or sample.ground_truth is None:
                raise ImageReadError(f"{sample.name}: the bounds need ori.jpg and the reference photos")
            truth = load_image(sample.ground_truth)
            refs = [load_image(p) for p in sample.refs]
        except (ImageReadError, ValueError) as exc:
            failed = {**base, "status": "failed", "error": str(exc)}
            return failed, (dict(failed) if sample.persons == 1 else None)

        def record(outputs: dict) -> dict:
            scores = {m.kind: score_identity(m, outputs[m.kind], truth, refs) for m in self.face_models}
            ok = any(r.get("sim_ref") is not None for r in scores.values())
            return {
                **base,
                "face_models": scores,
                "status": "ok" if ok else "failed",
                **({} if ok else {"error": "no face found"}),
            }

        gt = record({m.kind: truth for m in self.face_models})
        if sample.persons != 1:
            return gt, None
        padded = pad_reference(refs[0])
        ref = record({m.kind: padded if getattr(m, "pad_references", True) else refs[0] for m in self.face_models})
        return gt, ref


# the paper's bounds: (row, metric, expected value); a correct metric reaches them up to float rounding
BOUNDS = (("GT", "sim_gt", 1.0), ("GT", "cp", -1.0), ("Ref", "sim_ref", 1.0), ("Ref", "cp", 1.0))
BOUND_TOLERANCE = 1e-4
# CP divides by theta(t, r): where the ground truth's and the reference's faces are closer than this
# angle (rad) it is ill-conditioned (0 below 1e-6 by definition), so such a sample's CP is not checked
BOUND_MIN_ANGLE = 1e-3


def evaluate_bounds(folder: Path, scorer: Scorer) -> tuple[dict, list[str]]:
    """Summaries of the GT and Ref rows over ``folder``'s samples, and the self-check's deviations.

    Every sample and face model is checked against :data:`BOUNDS` (a value left undefined, e.g. CP
    when the face counts differ, is not a deviation, nor CP where a person's ground-truth and reference
    faces lie within :data:`BOUND_MIN_ANGLE`); each deviation is one line naming the sample.
    """
    closest = float(np.cos(BOUND_MIN_ANGLE))
    records = {"GT": [], "Ref": []}
    for sample in list_samples(folder):
        gt, ref = scorer.bound_records(sample)
        records["GT"].append(gt)
        if ref is not None:
            records["Ref"].append(ref)
    deviations = []
    for row, key, expected in BOUNDS:
        for record in records[row]:
            for model, scores in record.get("face_models", {}).items():
                value = scores.get(key)
                # the output is t (GT row) or r (Ref row): its similarity to the other one is cos(t, r)
                other = "sim_ref" if row == "GT" else "sim_gt"
                if key == "cp" and any((p.get(other) or -1.0) > closest for p in scores.get("persons", [])):
                    continue
                if value is not None and abs(value - expected) > BOUND_TOLERANCE:
                    deviations.append(
                        f"{record['sample']}, {model}: the {'ground truth' if row == 'GT' else 'reference'}"
                        f" scored as the output gives {key} {value:.6f}, not {expected:+g}"
                    )
    return {row: {"method": row, **summarise(rows)} for row, rows in records.items() if rows}, deviations


def _cached(sample: Sample, settings: dict) -> dict | None:
    path = sample.folder / "metrics.json"
    if not path.is_file() or sample.output is None:
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    fresh = path.stat().st_mtime >= sample.output.stat().st_mtime
    return record if fresh and record.get("settings") == settings else None


# --------------------------------------------------------------------------- one method
SUBSETS = {
    "single": lambda n: n == 1,
    "multi": lambda n: n >= 2,
    "multi_2": lambda n: n == 2,
    "multi_3_4": lambda n: n >= 3,
}


def summarise(records: list[dict], fids: dict | None = None) -> dict:
    """Per subset: counts, per-face-model statistics, the pooled 'average' model and the table values."""
    subsets = {}
    for subset, belongs in SUBSETS.items():
        part = [r for r in records if belongs(r["persons"])]
        if not part:
            continue
        ok = [r for r in part if r.get("status") == "ok"]
        entry = {
            "samples": len(part),
            "scored": len(ok),
            "failed": {r["sample"]: r.get("error", "") for r in part if r.get("status") != "ok"},
        }
        models = sorted({m for r in ok for m in r["face_models"]})
        per_model = {}
        for model in models:
            per_model[model] = {
                key: robust_stats([r["face_models"][model].get(key) for r in ok if model in r["face_models"]])
                for key in IDENTITY_KEYS
            }
        if len(models) > 1:  # the authors' 'average': every model's per-sample values in one pool
            per_model["average"] = {
                key: robust_stats([r["face_models"][m].get(key) for r in ok for m in models if m in r["face_models"]])
                for key in IDENTITY_KEYS
            }
        gate = CP_GATES["single" if subset == "single" else "multi"]
        for model, stats in per_model.items():  # the other reading of the gate: per sample, not per method
            pool = [
                r["face_models"][m]
                for r in ok
                for m in (models if model == "average" else [model])
                if m in r["face_models"]
            ]
            stats["cp_gated"] = robust_stats(gated([f.get("cp") for f in pool], [f.get("sim_gt") for f in pool], gate))
        entry["face_models"] = per_model
        for key in ("clip_i", "clip_t", "aesthetic"):
            entry[key] = robust_stats([r.get(key) for r in ok])
        if fids and subset in fids:
            entry["fid"] = fids[subset]
        identity = per_model.get("average") or (per_model[models[0]] if models else {})

        def mean(stats):
            return None if not stats else stats["mean"]

        entry["table"] = {
            "sim_gt": mean(identity.get("sim_gt")),
            "sim_ref": mean(identity.get("sim_ref")),
            "cp": mean(identity.get("cp")),
            "bld": mean(identity.get("off_gt")) if subset != "single" else None,
            "clip_i": mean(entry["clip_i"]),
            "clip_t": mean(entry["clip_t"]),
            "aesthetic": mean(entry["aesthetic"]),
            "fid": (fids or {})
            .get(subset, {})
            .get("authors" if "authors" in (fids or {}).get(subset, {}) else "standard"),
        }
        subsets[subset] = entry
    return {"subsets": subsets}


def evaluate_folder(
    folder: Path, scorer: Scorer, fid=None, fid_forms=("standard",), resume: bool = True, progress: bool = True
) -> dict:
    samples = list_samples(folder)
    records = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm ships with ComfyUI and transformers; plain logging otherwise

        def tqdm(it, **_):
            return it

    bar = tqdm(samples, desc=f"scoring {folder.name}", unit="sample", disable=not progress)
    reused = 0
    for sample in bar:
        record = _cached(sample, scorer.settings) if resume else None
        if record is not None:
            reused += 1
        else:
            try:
                record = scorer.score(sample)
            except (ImageReadError, ValueError) as exc:
                record = {
                    "sample": sample.name,
                    "persons": sample.persons,
                    "settings": scorer.settings,
                    "status": "failed",
                    "error": str(exc),
                }
            if record.get("status") != "ok":
                logger.warning("%s: %s", sample.name, record.get("error"))
            (sample.folder / "metrics.json").write_text(json.dumps(record, indent=1))
        records.append(record)
    if reused:
        logger.info("%s: %d of %d samples reused from an earlier run", folder.name, reused, len(samples))
    fids = {}
    if fid is not None:
        fids = _fid_by_subset(fid, fid_forms, samples, records)
    summary = {"method": folder.name, "settings": scorer.settings, **summarise(records, fids)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _fid_by_subset(fid, forms, samples: list[Sample], records: list[dict]) -> dict:
    """FID of GT photos against outputs per subset (scored samples only); each image's features computed once."""
    from .bench.quality import frechet_distance

    by_name = {s.name: s for s in samples}
    cache: dict = {}

    def features(paths, form):
        todo = [p for p in paths if (p, form) not in cache]
        if todo:
            for path, row in zip(todo, fid.features([load_image(p) for p in todo], form)):
                cache[(path, form)] = row
        return np.stack([cache[(p, form)] for p in paths])

    out, seen = {}, {}
    for subset, belongs in SUBSETS.items():
        chosen = tuple(
            sorted(
                r["sample"]
                for r in records
                if r.get("status") == "ok" and belongs(r["persons"]) and by_name[r["sample"]].ground_truth is not None
            )
        )
        if len(chosen) < 2:
            continue
        if chosen not in seen:  # e.g. multi_2 == multi when no sample has 3-4 people
            real = [by_name[n].ground_truth for n in chosen]
            generated = [by_name[n].output for n in chosen]
            seen[chosen] = {form: frechet_distance(features(real, form), features(generated, form)) for form in forms}
        out[subset] = seen[chosen]
    return out


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m withanyone_core.bench_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", type=Path, nargs="+", help="one folder of samples per method")
    p.add_argument("--names", nargs="+", help="method names for the tables (default: the folder names)")
    p.add_argument(
        "--out",
        type=Path,
        help="where tables.md/.csv, report.json and tradeoff.png go "
        "(default: the results folder, or ./bench_report for several)",
    )
    p.add_argument(
        "--insightface",
        "--antelopev2",
        dest="insightface",
        type=Path,
        required=True,
        help="insightface models root holding models/buffalo_l/ or models/antelopev2/ "
        "(e.g. ComfyUI/models/insightface)",
    )
    p.add_argument(
        "--face-model",
        choices=["buffalo_l", "antelopev2"],
        default="buffalo_l",
        help="buffalo_l as in the paper (default), or antelopev2 as the pack uses",
    )
    p.add_argument("--det-thresh", type=float, default=DET_THRESH)
    p.add_argument("--no-ref-padding", action="store_true", help="detect on the reference photos as they are")
    p.add_argument("--providers", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--torch-faces",
        type=Path,
        help="folder with adaface_ir50_ms1mv2.safetensors, "
        "facenet_vggface2.safetensors and detection_Resnet50_Final.safetensors: adds AdaFace and "
        "FaceNet on facexlib-aligned faces, and the authors' average over the three face models",
    )
    p.add_argument("--clip", type=Path, help="folder of openai/clip-vit-base-patch16 (CLIP-I, CLIP-T)")
    p.add_argument("--aesthetic-encoder", type=Path, help="folder of google/siglip-so400m-patch14-384")
    p.add_argument("--aesthetic-head", type=Path, help="aesthetic_predictor_v2_5.safetensors")
    p.add_argument(
        "--fid-weights",
        type=Path,
        help="pt_inception-2015-12-05-6726825d.safetensors (pytorch-fid) "
        "or torchvision's inception_v3_google-0cc3c7bd.safetensors",
    )
    p.add_argument(
        "--fid-form",
        choices=["standard", "authors", "both"],
        default="both",
        help="FID preprocessing: standard (pytorch-fid), authors (ImageNet-normalised, then scaled again)",
    )
    p.add_argument("--device", default="auto", help="torch device for CLIP, aesthetic and FID")
    p.add_argument(
        "--paper-points",
        type=Path,
        help="JSON of published rows, in the shipped file's form "
        "(default: withanyone_core/bench/paper_points.json, Tables 1a, 2a, 2b of arXiv 2510.14975v1)",
    )
    p.add_argument(
        "--no-bounds",
        action="store_true",
        help="skip the GT and Ref rows (the ground truth and the "
        "reference scored as the output) and their self-check against Sim(GT) 1, CP -1 / +1",
    )
    p.add_argument("--no-resume", action="store_true", help="recompute every sample")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for folder in args.results:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    if args.names and len(args.names) != len(args.results):
        parser.error(f"{len(args.names)} names for {len(args.results)} result folders")
    if bool(args.aesthetic_encoder) != bool(args.aesthetic_head):
        parser.error("the aesthetic score needs both --aesthetic-encoder and --aesthetic-head")
    from .bench import quality
    from .bench.report import PaperPointsError, load_paper_points
    from .checkpoints.reading import CheckpointError

    try:  # a bad replacement file stops the run before anything is scored
        paper = load_paper_points(args.paper_points)
    except PaperPointsError as exc:
        parser.exit(2, f"error: --paper-points: {exc}\n")

    try:
        face_model = InsightFaceModel(
            args.insightface,
            args.face_model,
            det_thresh=args.det_thresh,
            providers=args.providers,
            pad_references=not args.no_ref_padding,
        )
        face_models = [face_model]
        if args.torch_faces:
            from .bench.torch_faces import TorchFaceModel

            adaface = TorchFaceModel("adaface", args.torch_faces, args.device, not args.no_ref_padding)
            face_models += [
                adaface,
                TorchFaceModel(
                    "facenet", args.torch_faces, args.device, not args.no_ref_padding, detector=adaface.detector
                ),
            ]
        clip = aesthetic = fid = None
        if args.clip:
            clip = quality.ClipMetric(args.clip, args.device)
        if args.aesthetic_encoder:
            aesthetic = quality.AestheticMetric(args.aesthetic_encoder, args.aesthetic_head, args.device)
        if args.fid_weights:
            fid = quality.FIDMetric(args.fid_weights, args.device)
    except (FaceModelsNotFound, quality.MissingWeights, CheckpointError) as exc:
        parser.exit(2, f"error: {exc}\n")
    settings = {
        "face_model": args.face_model,
        "det_thresh": args.det_thresh,
        "ref_padding": not args.no_ref_padding,
        "clip": bool(clip),
        "aesthetic": bool(aesthetic),
        "face_models": [m.kind for m in face_models],
    }
    scorer = Scorer(face_models, clip, aesthetic, settings)
    forms = ("standard", "authors") if args.fid_form == "both" else (args.fid_form,)
    names = args.names or [f.name for f in args.results]
    methods = {}
    for name, folder in zip(names, args.results):
        methods[name] = evaluate_folder(
            folder, scorer, fid, forms, resume=not args.no_resume, progress=not args.no_progress
        )
    bounds = check = None
    if not args.no_bounds:
        bounds, deviations = evaluate_bounds(args.results[0], scorer)
        check = {
            "ok": not deviations,
            "tolerance": BOUND_TOLERANCE,
            "deviations": deviations,
            "samples_from": str(args.results[0]),
        }
    out = args.out or (args.results[0] if len(args.results) == 1 else Path("bench_report"))
    combined = write_report(methods, out, paper, bounds, check)
    if check is not None and not check["ok"]:
        for line in check["deviations"]:
            logger.error("self-check: %s", line)
        parser.exit(
            1,
            f"error: self-check failed: {len(check['deviations'])} value(s) of the GT/Ref rows miss the "
            f"paper's bounds (Sim(GT) 1, CP -1 / +1) by more than {BOUND_TOLERANCE:g} (listed above and "
            f"in {out / 'report.json'}); the metric code is wrong for these samples: please report it\n",
        )
    return combined


def write_report(
    methods: dict[str, dict],
    out: Path,
    paper: dict | Path | None = None,
    bounds: dict[str, dict] | None = None,
    bounds_check: dict | None = None,
) -> dict:
    """tables.md/.csv (published and measured rows), report.json and tradeoff.png into ``out``.

    ``paper``: the published rows (a loaded dict, a replacement file, or ``None`` for the shipped
    tables); ``bounds``: the measured GT/Ref rows (:func:`evaluate_bounds`) and their ``bounds_check``.
    """
    from .bench import report

    if not isinstance(paper, dict):
        paper = report.load_paper_points(paper)
    out.mkdir(parents=True, exist_ok=True)
    tables = report.markdown_tables(methods, paper=paper, bounds=bounds)
    (out / "tables.md").write_text(tables + "\n")
    (out / "tables.csv").write_text(report.csv_table(methods, paper=paper, bounds=bounds))
    combined = {
        "methods": methods,
        "bounds": bounds,
        "bounds_check": bounds_check,
        "paper": {"paper": paper.get("paper"), "citation": paper.get("citation")},
    }
    combined["figure"] = report.tradeoff_figure(methods, out / "tradeoff.png", paper)
    (out / "report.json").write_text(json.dumps(combined, indent=1))
    logger.info("\n%s", tables)
    logger.info(
        "wrote %s, %s, %s and %s", out / "tables.md", out / "tables.csv", out / "report.json", out / "tradeoff.png"
    )
    return combined


if __name__ == "__main__":
    main()
