"""Pooling per-sample values into the numbers of the paper's tables (the authors' ``_compute_statistics``).

Per metric, the per-sample values are pooled; values outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]
(numpy's linear percentiles, bounds inclusive) are dropped and the mean of the rest is
reported. When that would drop more than half of the values, median-based statistics
are reported instead (``mean`` is then the median of all values). The "average" face
model pools the per-sample values of every face model into one list before this rule.

For the copy-paste ranking the paper counts only cases whose Sim(GT) exceeds a gate
(0.40 single-person, 0.35 multi-person): a generator that draws a stranger has a CP
near 0 without being any good.
"""

from __future__ import annotations

import numpy as np

IQR_FACTOR = 1.5
CP_GATES = {"single": 0.40, "multi": 0.35}


def robust_stats(values, factor: float = IQR_FACTOR) -> dict | None:
    """The authors' statistics of a list of per-sample values (``None`` for an empty list)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return None
    q1, q3 = np.percentile(arr, 25), np.percentile(arr, 75)
    iqr = q3 - q1
    kept = arr[(arr >= q1 - factor * iqr) & (arr <= q3 + factor * iqr)]
    if len(kept) < 0.5 * len(arr):
        median = float(np.median(arr))
        return {
            "mean": median,
            "std": float(q3 - q1),
            "min": float(np.percentile(arr, 5)),
            "max": float(np.percentile(arr, 95)),
            "median": median,
            "q1": float(q1),
            "q3": float(q3),
            "n": int(arr.size),
            "outliers_removed": 0,
            "robust_fallback": True,
        }
    return {
        "mean": float(kept.mean()),
        "std": float(kept.std()),
        "min": float(kept.min()),
        "max": float(kept.max()),
        "median": float(np.median(kept)),
        "q1": float(np.percentile(kept, 25)),
        "q3": float(np.percentile(kept, 75)),
        "n": int(arr.size),
        "outliers_removed": int(arr.size - kept.size),
        "robust_fallback": False,
    }


def gated(values, sim_gt, gate: float) -> list[float]:
    """The values of the cases whose Sim(GT) exceeds ``gate`` (pairs with a missing value are left out)."""
    return [v for v, s in zip(values, sim_gt) if v is not None and s is not None and s > gate]
