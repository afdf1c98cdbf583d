"""Exact AUC, log loss and gAUC on hand-computed cases (NumPy only, no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qin_tf import metrics


def pairwise_auc(y, s):
    """The definition: P(score of a positive > score of a negative), ties 1/2."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("labels, scores, expected", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),   # 3 of 4 pairs ordered
    ([0, 1], [0.5, 0.5], 0.5),                     # a tie counts 1/2
    ([1, 0], [0.9, 0.1], 1.0),
    ([1, 0], [0.1, 0.9], 0.0),
    # pos {0.2, 0.5, 0.5}, neg {0.5, 0.1}: pairs (0.2>0.5 no, 0.2>0.1 yes,
    # 0.5=0.5 half, 0.5>0.1 yes) x2 -> (1 + 1.5 + 1.5) / 6 = 2/3
    ([1, 1, 1, 0, 0], [0.2, 0.5, 0.5, 0.5, 0.1], 4 / 6),
    ([0, 0, 0, 1], [0.3, 0.3, 0.3, 0.3], 0.5),    # all tied
])
def test_auc_hand_computed(labels, scores, expected):
    assert metrics.auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) + 0.3 * y, 1)  # heavy ties: 14 distinct values
    assert metrics.auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    # invariant under a monotone transform of the scores
    assert metrics.auc(y, np.exp(3 * s)) == pytest.approx(metrics.auc(y, s), abs=1e-12)


def test_auc_rejects_one_class_nan_and_bad_labels():
    with pytest.raises(ValueError, match="undefined when all 3 labels are 1"):
        metrics.auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1 of 2 scores are NaN"):
        metrics.auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        metrics.auc([0, 1, 1], [0.1, 0.2])


def test_logloss_hand_computed():
    # -(log 0.8 + log 0.6 + log 0.5) / 3
    expected = -(math.log(0.8) + math.log(0.6) + math.log(0.5)) / 3
    assert metrics.logloss([1, 0, 1], [0.8, 0.4, 0.5]) == pytest.approx(expected, rel=1e-12)
    # clipped at 1e-7: a confident wrong prediction costs -log(1e-7), not inf
    assert metrics.logloss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert metrics.logloss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    with pytest.raises(ValueError, match="probabilities"):
        metrics.logloss([1], [1.5])


def test_gauc_hand_computed():
    labels = [0, 1, 0, 1, 1, 1, 0, 0, 0]
    scores = [.1, .9, .8, .2, .5, .3, .3, .3, .3]
    groups = [7, 7, 8, 8, 9, 5, 5, 5, 5]
    # user 7: AUC 1 (2 rows); user 8: AUC 0 (2 rows); user 9: one class, left
    # out; user 5: one positive tied with three negatives: AUC 0.5 (4 rows)
    expected = (2 * 1.0 + 2 * 0.0 + 4 * 0.5) / 8
    assert metrics.gauc(labels, scores, groups) == pytest.approx(expected, abs=1e-12)
    ids, aucs, sizes = metrics.group_aucs(labels, scores, groups)
    assert ids.tolist() == [5, 7, 8]
    assert aucs.tolist() == [0.5, 1.0, 0.0]
    assert sizes.tolist() == [4, 2, 2]


def test_gauc_matches_per_user_loop():
    rng = np.random.default_rng(1)
    n = 3000
    users = rng.integers(0, 200, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.2 * y, 2)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * pairwise_auc(y[m], s[m])
            den += m.sum()
    assert metrics.gauc(y, s, users) == pytest.approx(num / den, abs=1e-12)


def test_gauc_undefined_without_mixed_groups():
    with pytest.raises(ValueError, match="no group has both"):
        metrics.gauc([0, 1], [0.2, 0.3], [1, 2])
    out = metrics.evaluate([0, 1], [0.2, 0.3], groups=[1, 2])
    assert math.isnan(out["gauc"]) and out["gauc_groups"] == 0
    assert out["auc"] == 1.0


def test_evaluate_and_calibration():
    y = [0, 0, 1, 1, 1]
    p = [0.05, 0.15, 0.12, 0.95, 1.0]
    out = metrics.evaluate(y, p, groups=[1, 1, 1, 2, 2])
    assert out["num_examples"] == 5
    assert out["positive_rate"] == pytest.approx(0.6)
    assert out["mean_prediction"] == pytest.approx(np.mean(p))
    # user 1: pos 0.12 vs neg {0.05, 0.15}: 1/2; user 2 has one class
    assert out["gauc"] == pytest.approx(0.5) and out["gauc_groups"] == 1
    cal = metrics.calibration_bins(y, p, num_bins=10)
    # bins: [0, .1): 0.05 | [.1, .2): 0.15, 0.12 | [.9, 1]: 0.95, 1.0
    assert cal["count"] == [1, 2, 2]
    assert cal["mean_prediction"] == pytest.approx([0.05, 0.135, 0.975])
    assert cal["positive_rate"] == pytest.approx([0.0, 0.5, 1.0])
