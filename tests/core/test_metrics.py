"""MultiID-Bench identity metrics and aggregation on constructed embeddings with known angles."""

import json
import math

import numpy as np
import pytest

from withanyone_core.bench.aggregate import gated, robust_stats
from withanyone_core.metrics import (
    angle,
    copy_paste_per_face,
    copy_paste_score,
    identity_scores,
    match_faces,
    matched_similarity,
)


def _plane(theta, dim=512):
    """A unit vector at angle theta in the plane of the first two axes."""
    v = np.zeros(dim)
    v[0], v[1] = math.cos(theta), math.sin(theta)
    return v


def _axis(k, dim=512, tilt=0.0):
    """Nearly orthogonal identities: axis k, tilted by ``tilt`` towards axis k + 8."""
    v = np.zeros(dim)
    v[k], v[k + 8] = math.cos(tilt), math.sin(tilt)
    return v


def test_cp_formula_and_sanity_rows():
    t, r = _plane(0.0), _plane(0.6)
    assert copy_paste_score(t, t, r) == pytest.approx(-1.0)  # scoring the ground truth
    assert copy_paste_score(r, t, r) == pytest.approx(1.0)  # scoring the reference: a copy-paste
    assert copy_paste_score(_plane(0.3), t, r) == pytest.approx(0.0, abs=1e-9)  # halfway
    assert copy_paste_score(_plane(0.2), t, r) == pytest.approx((0.2 - 0.4) / 0.6)
    assert copy_paste_score(_plane(0.2), t, t) == 0.0  # theta(t, r) < 1e-6: the authors' 0
    assert angle(t, r) == pytest.approx(0.6)


def test_sample_scores_gt_itself_and_reference_itself():
    refs = np.stack([_axis(0, tilt=0.5), _axis(1, tilt=0.7)])
    gts = np.stack([_axis(0), _axis(1)])
    as_gt = identity_scores(gts[::-1] * 3.0, refs * 7.0, gts)  # raw (unnormalised) embeddings, any face order
    assert as_gt["sim_gt"] == pytest.approx(1.0) and as_gt["cp"] == pytest.approx(-1.0)
    as_ref = identity_scores(refs, refs, gts)
    assert as_ref["sim_ref"] == pytest.approx(1.0) and as_ref["cp"] == pytest.approx(1.0)
    json.dumps(as_gt)


def test_swapped_person_order_gives_the_same_scores():
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((3, 512))
    gts = refs + 0.8 * rng.standard_normal((3, 512))
    generated = 0.5 * refs + 0.5 * gts + 0.3 * rng.standard_normal((3, 512))
    base = identity_scores(generated, refs, gts)
    perm = [2, 0, 1]
    swapped = identity_scores(generated[::-1], refs[perm], gts[perm])
    for key in ("sim_ref", "sim_gt", "cp", "off_ref", "off_gt"):
        assert swapped[key] == pytest.approx(base[key]), key
    assert base["cp"] is not None and -1 < base["cp"] < 1


@pytest.mark.parametrize("persons", [3, 4])
def test_hungarian_matching_with_a_missing_face(persons):
    refs = np.stack([_axis(k, tilt=0.4) for k in range(persons)])
    gts = np.stack([_axis(k) for k in range(persons)])
    # the output lost person 2; the others are drawn in reverse order, each a bit off its ground truth
    kept = [k for k in range(persons) if k != 1]
    generated = np.stack([_axis(k, tilt=0.1) for k in kept][::-1])
    result = identity_scores(generated, refs, gts)
    assert result["missing"] == [2] and result["faces_generated"] == persons - 1
    for p in result["persons"]:
        if p["person"] != 2:
            assert generated[p["generated_face"]] @ gts[p["person"] - 1] == pytest.approx(math.cos(0.1))
            assert p["sim_ref"] == pytest.approx(math.cos(0.3))
    # the means run over the assigned pairs only (a missing face does not count as 0)
    assert result["sim_gt"] == pytest.approx(math.cos(0.1)) and result["sim_ref"] == pytest.approx(math.cos(0.3))
    # CP is undefined when the face counts differ, as in the authors' code
    assert result["cp"] is None and copy_paste_per_face(generated, gts, refs) is None
    # off-assignment (blending): every other entry of the gen x ref matrix, here all ~0 similarity
    assert result["off_ref"] == pytest.approx(0.0, abs=0.05)


def test_blending_is_the_off_assignment_mean():
    refs = np.stack([_axis(0), _axis(1)])
    blend = (refs[0] + refs[1]) / math.sqrt(2)  # both generated faces look like a mix of the two people
    match = matched_similarity(np.stack([blend, blend]), refs)
    assert match["mean"] == pytest.approx(math.sqrt(0.5)) and match["off_assignment"] == pytest.approx(math.sqrt(0.5))
    single = identity_scores(refs[:1], refs[:1], refs[:1])
    assert single["off_ref"] == 0.0 and single["off_gt"] == 0.0  # the authors report 0 for single-person runs


def test_cp_uses_its_own_two_matchings():
    # g0 is closest to t1 but to r0: gen<->GT and gen<->ref assignments differ, each is used for its side
    t = np.stack([_plane(0.0), _plane(1.0)])
    r = np.stack([_plane(1.2), _plane(-0.3)])
    g = np.stack([_plane(0.95), _plane(0.05)])
    faces = copy_paste_per_face(g, t, r)
    g0 = next(f for f in faces if f["generated"] == 0)
    assert (g0["ground_truth"], g0["reference"]) == (1, 0)
    assert g0["cp"] == pytest.approx(copy_paste_score(g[0], t[1], r[0]))


def test_matching_is_optimal_not_greedy():
    targets = np.stack([_plane(0.0), _plane(0.5)])
    generated = np.stack([_plane(0.3), _plane(-0.3)])
    # greedy would give target 0 the closest face (0.3); optimal total similarity swaps them
    assert match_faces(generated, targets) == [(0, 1), (1, 0)]


def test_iqr_rule_drops_outliers():
    values = [0.40, 0.42, 0.44, 0.46, 0.48, 0.50, 0.52, 0.54, -0.9, 3.0]
    stats = robust_stats(values)
    # numpy's linear percentiles: Q1 = 0.425, Q3 = 0.515, fences [0.29, 0.65] -> -0.9 and 3.0 go
    assert np.percentile(values, 25) == pytest.approx(0.425) and np.percentile(values, 75) == pytest.approx(0.515)
    assert stats["outliers_removed"] == 2 and stats["n"] == 10 and not stats["robust_fallback"]
    assert stats["mean"] == pytest.approx(0.47) and stats["median"] == pytest.approx(0.47)
    # the fences are inclusive: at factor 0 they are Q1 = 2 and Q3 = 4 themselves, and both stay
    assert robust_stats([1.0, 2.0, 3.0, 4.0, 5.0], factor=0.0)["outliers_removed"] == 2
    assert robust_stats([None]) is None and robust_stats([]) is None


def test_iqr_median_fallback_on_a_constructed_sample():
    # With the 1.5 factor the middle half always survives (Q1 lies within a third of an IQR of the
    # value below it), so the authors' "more than half removed" branch needs a narrower fence to fire:
    values = [-5.0, 0.0, 0.1, 0.2, 0.3, 5.0]  # Q1 0.025, Q3 0.275; at factor 0 only 0.1 and 0.2 stay (2 of 6)
    stats = robust_stats(values, factor=0.0)
    assert stats["robust_fallback"] and stats["mean"] == pytest.approx(np.median(values)) == pytest.approx(0.15)
    assert stats["q1"] == pytest.approx(0.025) and stats["std"] == pytest.approx(0.25)  # IQR stands in for std
    assert stats["min"] == pytest.approx(np.percentile(values, 5))
    default = robust_stats(values)  # at 1.5 the fences [-0.35, 0.65] drop only -5 and 5
    assert not default["robust_fallback"] and default["outliers_removed"] == 2


def test_cp_gate_keeps_cases_above_the_threshold():
    assert gated([0.1, 0.2, 0.3, None], [0.5, 0.39, 0.41, 0.9], 0.40) == [0.1, 0.3]
