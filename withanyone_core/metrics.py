"""MultiID-Bench identity metrics on face embeddings, as the authors' ``MultiID-Bench/eval.py`` computes them.

With g a generated face, t the ground-truth face and r the reference face (embeddings of
one face model) and theta_ab = arccos(cos(a, b)):

    Sim(GT)  = cos(g, t)        Sim(Ref) = cos(g, r)
    CP       = (theta_gt - theta_gr) / theta_tr      (0 when theta_tr < 1e-6)

CP is +1 when the output is the reference (a copy-paste), -1 when it is the ground truth.

Matching, as the authors do it:

- Sim(Ref): every generated face against every reference, one optimal (Hungarian)
  assignment on cosine similarity; the sample's value is the mean of the assigned
  cosines. The *off-assignment* mean (every other entry of the similarity matrix: a
  generated face against the other persons' references) measures identity blending.
- Sim(GT): every generated face against every face of the ground-truth photo, the same
  way (the matrix may be rectangular when the counts differ).
- CP: only when the generated image, the ground truth and the references have the same
  number of faces; generated faces are matched to ground-truth faces and, separately, to
  references, and each generated face is scored with its two partners.

Persons a rectangular assignment leaves without a face do not lower the means; the number
of faces found is reported beside them.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    # as torch's cosine_similarity, which the authors use for Sim(GT) / Sim(Ref): norms clamped at 1e-8
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((_unit(a) * _unit(b)).sum(-1), -1.0, 1.0)


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.arccos(cosine(a, b))


def similarity_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` [m, d] with every row of ``b`` [n, d] -> [m, n]."""
    return _unit(a) @ _unit(b).T


def copy_paste_score(generated: np.ndarray, ground_truth: np.ndarray, reference: np.ndarray, eps: float = EPS) -> float:
    """CP of one generated face: (theta(g, t) - theta(g, r)) / theta(t, r); 0 when t and r coincide.

    The authors divide by (norm + 1e-6) before arccos, which puts identical faces about
    2e-3 rad apart on unit vectors (4e-4 on raw ArcFace embeddings): a perfect copy then
    scores slightly below +1. Exact normalisation is used here (README, "MultiID-Bench").
    """
    g, t, r = (_unit(v) for v in (generated, ground_truth, reference))

    def theta(a, b):
        return float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))

    theta_tr = theta(t, r)
    if theta_tr < eps:
        return 0.0
    return (theta(g, t) - theta(g, r)) / theta_tr


def hungarian(sims: np.ndarray) -> list[tuple[int, int]]:
    """The assignment (row, column) pairs maximising the total similarity (any shape)."""
    from scipy.optimize import linear_sum_assignment

    if sims.size == 0:
        return []
    rows, cols = linear_sum_assignment(-sims)
    return list(zip(rows.tolist(), cols.tolist()))


def match_faces(generated: np.ndarray, targets: np.ndarray) -> list[tuple[int, int]]:
    """Optimal assignment of generated faces to targets: (target index, generated index) pairs, sorted."""
    generated, targets = _as_rows(generated), _as_rows(targets)
    if not len(generated) or not len(targets):
        return []
    return sorted((t, g) for g, t in hungarian(similarity_matrix(generated, targets)))


def matched_similarity(generated: np.ndarray, targets: np.ndarray) -> dict | None:
    """Hungarian-matched cosines of generated faces [g, d] against targets [n, d].

    Returns ``None`` when either side has no face, else ``pairs`` (generated, target),
    their ``scores``, the ``mean`` and ``off_assignment`` (mean of the other entries of
    the similarity matrix; ``None`` for a 1x1 matrix).
    """
    generated, targets = _as_rows(generated), _as_rows(targets)
    if not len(generated) or not len(targets):
        return None
    sims = similarity_matrix(generated, targets)
    pairs = hungarian(sims)
    scores = [float(sims[g, t]) for g, t in pairs]
    mask = np.ones_like(sims, dtype=bool)
    for g, t in pairs:
        mask[g, t] = False
    off = float(sims[mask].mean()) if mask.any() else None
    return {"pairs": pairs, "scores": scores, "mean": float(np.mean(scores)), "off_assignment": off}


def copy_paste_per_face(generated: np.ndarray, ground_truth: np.ndarray, references: np.ndarray) -> list[dict] | None:
    """CP of every generated face with its own gen<->GT and gen<->ref matchings.

    ``None`` (undefined) unless all three hold the same number of faces, as in the authors' code.
    """
    generated, ground_truth, references = _as_rows(generated), _as_rows(ground_truth), _as_rows(references)
    n = len(generated)
    if n == 0 or len(ground_truth) != n or len(references) != n:
        return None
    to_gt = dict(hungarian(similarity_matrix(generated, ground_truth)))
    to_ref = dict(hungarian(similarity_matrix(generated, references)))
    return [
        {
            "generated": g,
            "ground_truth": to_gt[g],
            "reference": to_ref[g],
            "cp": copy_paste_score(generated[g], ground_truth[to_gt[g]], references[to_ref[g]]),
        }
        for g in sorted(to_gt)
    ]


def _as_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return np.zeros((0, x.shape[-1] if x.ndim == 2 else 1))
    return x.reshape(-1, x.shape[-1])


def identity_scores(
    generated: np.ndarray,
    references: np.ndarray,
    ground_truth: np.ndarray | None = None,
    multi_person: bool | None = None,
) -> dict:
    """One sample's identity metrics for one face model, as the authors' evaluation computes them.

    ``generated`` [g, d]: every face found in the output; ``references`` [n, d]: one face per
    reference photo, in person order; ``ground_truth`` [k, d]: every face of the ground-truth
    photo (optional). ``multi_person`` (default: more than one reference) decides whether the
    off-assignment (blending) means are reported; the authors set them to 0 for single-person runs.

    Returns ``sim_ref``, ``sim_gt``, ``cp`` (sample means, ``None`` when undefined),
    ``off_ref``/``off_gt`` (blending), per-person entries and face counts.
    """
    generated, references = _as_rows(generated), _as_rows(references)
    gt = None if ground_truth is None else _as_rows(ground_truth)
    multi = len(references) > 1 if multi_person is None else multi_person
    ref_match = matched_similarity(generated, references)
    gt_match = matched_similarity(generated, gt) if gt is not None else None
    cp_faces = copy_paste_per_face(generated, gt, references) if gt is not None else None

    persons = []
    to_person = {g: t for g, t in ref_match["pairs"]} if ref_match else {}
    to_gt_sim = {g: s for (g, _), s in zip(gt_match["pairs"], gt_match["scores"])} if gt_match else {}
    cp_of = {c["generated"]: c["cp"] for c in cp_faces} if cp_faces else {}
    ref_sims = similarity_matrix(generated, references) if len(generated) and len(references) else None
    for k in range(len(references)):
        g = next((g for g, t in to_person.items() if t == k), None)
        entry = {"person": k + 1, "generated_face": g}
        if g is not None:
            entry["sim_ref"] = float(ref_sims[g, k])
            if g in to_gt_sim:
                entry["sim_gt"] = to_gt_sim[g]
            if g in cp_of:
                entry["cp"] = cp_of[g]
        persons.append(entry)

    def off(match):
        if match is None:
            return None
        return (match["off_assignment"] if match["off_assignment"] is not None else None) if multi else 0.0

    return {
        "sim_ref": ref_match["mean"] if ref_match else None,
        "sim_gt": gt_match["mean"] if gt_match else None,
        "cp": float(np.mean([c["cp"] for c in cp_faces])) if cp_faces else None,
        "off_ref": off(ref_match),
        "off_gt": off(gt_match),
        "faces_generated": int(len(generated)),
        "faces_ground_truth": None if gt is None else int(len(gt)),
        "persons": persons,
        "missing": [p["person"] for p in persons if p["generated_face"] is None],
    }
