"""MultiID-Bench metrics on constructed embeddings with known angles."""

import json
import math

import numpy as np
import pytest

from withanyone_core.metrics import angle, copy_paste_score, identity_metrics, match_faces


def _plane(theta):
    """A unit vector at angle theta in the plane of the first two axes (512-d)."""
    v = np.zeros(512)
    v[0], v[1] = math.cos(theta), math.sin(theta)
    return v


def test_cp_formula_and_sanity_rows():
    t, r = _plane(0.0), _plane(0.6)
    assert copy_paste_score(t, t, r) == pytest.approx(-1.0)  # scoring the ground truth
    assert copy_paste_score(r, t, r) == pytest.approx(1.0)  # scoring the reference (copy-paste)
    assert copy_paste_score(_plane(0.3), t, r) == pytest.approx(0.0, abs=1e-9)  # halfway
    g = _plane(0.2)
    assert copy_paste_score(g, t, r) == pytest.approx((0.2 - 0.4) / 0.6)
    assert angle(t, r) == pytest.approx(0.6)


def test_identity_metrics_with_ground_truth_and_matching():
    refs = np.stack([_plane(0.5), _plane(2.0)])
    gts = np.stack([_plane(0.0), _plane(2.5)])
    generated = np.stack([_plane(2.4), _plane(0.1)])  # faces found in the other order
    result = identity_metrics(generated, refs * 7.0, gts * 3.0)  # raw (unnormalised) embeddings
    p1, p2 = result["persons"]
    assert p1["generated_face"] == 1 and p2["generated_face"] == 0
    assert p1["sim_gt"] == pytest.approx(math.cos(0.1)) and p1["sim_ref"] == pytest.approx(math.cos(0.4))
    assert p1["cp"] == pytest.approx((0.1 - 0.4) / 0.5)
    assert result["cp"] == pytest.approx(np.mean([(0.1 - 0.4) / 0.5, (0.1 - 0.4) / 0.5]))
    json.dumps(result)


def test_scoring_gt_image_gives_sim_gt_one():
    refs = np.stack([_plane(0.5), _plane(2.0)])
    gts = np.stack([_plane(0.0), _plane(2.5)])
    result = identity_metrics(gts, refs, gts)
    assert result["sim_gt"] == pytest.approx(1.0) and result["cp"] == pytest.approx(-1.0)
    result = identity_metrics(refs, refs, gts)
    assert result["sim_ref"] == pytest.approx(1.0) and result["cp"] == pytest.approx(1.0)


def test_missing_faces_are_reported_not_invented():
    refs = np.stack([_plane(0.5), _plane(2.0), _plane(-1.0)])
    result = identity_metrics(np.stack([_plane(2.1)]), refs)
    assert result["missing"] == [1, 3] and result["persons"][1]["generated_face"] == 0
    assert identity_metrics(np.zeros((0, 512)), refs)["missing"] == [1, 2, 3]
    with pytest.raises(ValueError, match="ground truth has 1 faces"):
        identity_metrics(refs, refs, refs[:1])


def test_matching_is_optimal_not_greedy():
    targets = np.stack([_plane(0.0), _plane(0.5)])
    generated = np.stack([_plane(0.3), _plane(-0.3)])
    # greedy would give target 0 the closest face (0.3); optimal total similarity swaps them
    assert match_faces(generated, targets) == [(0, 1), (1, 0)]
