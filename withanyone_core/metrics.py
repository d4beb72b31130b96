"""MultiID-Bench identity metrics: Sim(GT), Sim(Ref) and the copy-paste score CP.

With g the generated face, t the ground-truth face and r the reference face (ArcFace
embeddings) and theta_ab = arccos(cos(a, b)):

    Sim(GT)  = cos(g, t)        Sim(Ref) = cos(g, r)
    CP       = (theta_gt - theta_gr) / max(theta_tr, eps)

CP is +1 when the output is the reference (a copy-paste), -1 when it is the ground truth,
and 0 halfway. With several people, generated faces are assigned to persons by optimal
matching (Hungarian) on similarity to the references.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((_normalise(a) * _normalise(b)).sum(-1), -1.0, 1.0)


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.arccos(cosine(a, b))


def copy_paste_score(generated: np.ndarray, ground_truth: np.ndarray, reference: np.ndarray,
                     eps: float = EPS) -> np.ndarray:
    """CP = (theta(g, t) - theta(g, r)) / max(theta(t, r), eps), per row."""
    return (angle(generated, ground_truth) - angle(generated, reference)) / np.maximum(
        angle(ground_truth, reference), eps)


def match_faces(generated: np.ndarray, targets: np.ndarray) -> list[tuple[int, int]]:
    """Optimal (Hungarian) assignment of generated faces to target persons by cosine similarity.

    Returns (person, generated index) pairs; persons without a generated face are absent.
    """
    from scipy.optimize import linear_sum_assignment

    if len(generated) == 0 or len(targets) == 0:
        return []
    sims = _normalise(targets) @ _normalise(generated).T  # [persons, generated]
    rows, cols = linear_sum_assignment(-sims)
    return sorted(zip(rows.tolist(), cols.tolist()))


def identity_metrics(generated: np.ndarray, references: np.ndarray,
                     ground_truth: np.ndarray | None = None) -> dict:
    """Per-person and mean Sim(Ref), Sim(GT) and CP.

    generated ``[g, 512]`` (faces found in the output, any order), references ``[n, 512]``
    and optionally ground_truth ``[n, 512]`` (same person order as the references).
    Persons the matching leaves without a face are reported as missing.
    """
    generated = np.asarray(generated, dtype=np.float64).reshape(-1, 512) if len(generated) else np.zeros((0, 512))
    references = np.asarray(references, dtype=np.float64).reshape(-1, 512)
    gt = None if ground_truth is None else np.asarray(ground_truth, dtype=np.float64).reshape(-1, 512)
    if gt is not None and gt.shape != references.shape:
        raise ValueError(f"ground truth has {len(gt)} faces but there are {len(references)} references")
    pairs = match_faces(generated, gt if gt is not None else references)
    persons = []
    matched = dict(pairs)
    for k in range(len(references)):
        entry = {"person": k + 1, "generated_face": matched.get(k)}
        if k in matched:
            g = generated[matched[k]]
            entry["sim_ref"] = float(cosine(g, references[k]))
            if gt is not None:
                entry["sim_gt"] = float(cosine(g, gt[k]))
                entry["cp"] = float(copy_paste_score(g, gt[k], references[k]))
        persons.append(entry)
    result = {"persons": persons, "faces_found": int(len(generated)), "missing": [p["person"] for p in persons
                                                                                 if p["generated_face"] is None]}
    for key in ("sim_ref", "sim_gt", "cp"):
        values = [p[key] for p in persons if key in p]
        if values:
            result[key] = float(np.mean(values))
    return result
