"""Exact evaluation metrics of CTR models, computed from all predictions.

NumPy only (no TensorFlow): the numbers reported in ``metrics.json`` come from
here, never from ``keras.metrics.AUC``, whose thresholded Riemann sum is an
approximation (it is used for the progress display only).

* :func:`auc`: the area under the ROC curve, exactly, by ranks
  (Mann-Whitney): ``AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-)`` where ``R+`` is
  the sum of the ranks of the positives among all scores. Tied scores get
  the average of the ranks they span, so a tie between a positive and a
  negative counts 1/2, as in the trapezoidal ROC area.
* :func:`logloss`: mean binary cross-entropy, predictions clipped to
  ``[eps, 1 - eps]`` with ``eps = 1e-7`` (Keras' epsilon).
* :func:`gauc`: group AUC: the AUC of every group (user) that has both a
  positive and a negative row, averaged with weights = the group's rows
  (impressions); groups with one class only are left out (their AUC is
  undefined). The MMCTR challenge and FuxiCTR's ``gAUC`` define it so.

Example::

    auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])   # 0.75
    auc([0, 1], [0.5, 0.5])                    # 0.5 (a tie counts 1/2)
    gauc([0, 1, 0, 1, 1], [.1, .9, .8, .2, .5], groups=[7, 7, 8, 8, 9])
    # user 7: 1.0, user 8: 0.0, user 9 has one class -> (2*1 + 2*0) / 4 = 0.5
"""

from __future__ import annotations

import math

import numpy as np

#: Predictions are clipped to [LOGLOSS_EPS, 1 - LOGLOSS_EPS] for the log loss.
LOGLOSS_EPS = 1e-7


def _check(labels, scores, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and {name} must have the same length. "
                         f"Received: {y.shape[0]} labels, {s.shape[0]} {name}.")
    if y.size == 0:
        raise ValueError("no examples to evaluate.")
    if not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise ValueError(f"labels must be 0 or 1. Received values such as {bad.tolist()}.")
    if not np.all(np.isfinite(s)):
        n = int(np.sum(~np.isfinite(s)))
        raise ValueError(f"{n} of {s.size} {name} are NaN or infinite.")
    return y.astype(np.int64), s


def _average_ranks(sorted_scores: np.ndarray, new_group: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks of sorted scores, ties averaged; ranks restart where ``new_group``."""
    n = sorted_scores.size
    # A tie block starts where the score changes (or a new group starts).
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_scores[1:] != sorted_scores[:-1]
    pos = np.arange(n, dtype=np.float64)
    if new_group is not None:
        starts |= new_group
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
        pos = pos - group_start
    block = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:], n) - 1
    # Positions within a group are contiguous, so the average rank of a tie
    # block is the mean of its first and last position, plus one.
    avg = (pos[first] + pos[last]) / 2.0 + 1.0
    return avg[block]


def auc(labels, scores) -> float:
    """Exact ROC AUC with tie handling (see the module docstring).

    Args:
        labels: 0/1 array of shape ``[n]``.
        scores: predictions of shape ``[n]``; any monotone scale.

    Raises:
        ValueError: if the labels hold only one class (AUC is undefined), or
            on NaN scores or non-binary labels.
    """
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined when all {y.size} labels are {int(y[0])}.")
    order = np.argsort(s, kind="mergesort")
    ranks = _average_ranks(s[order])
    rank_sum = float(ranks[y[order] == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels, predictions, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy of probabilities, clipped to ``[eps, 1 - eps]``."""
    y, p = _check(labels, predictions, "predictions")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("predictions must be probabilities in [0, 1].")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def group_aucs(labels, scores, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact AUC of every group that has both classes.

    Returns:
        ``(group_ids, aucs, sizes)`` of the groups with both classes, sorted
        by group id; ``sizes`` counts each group's rows.
    """
    y, s = _check(labels, scores)
    g = np.asarray(groups).reshape(-1)
    if g.shape != y.shape:
        raise ValueError(f"groups must have one entry per label. Received: {g.size} groups, {y.size} labels.")
    order = np.lexsort((s, g))  # by group, then by score
    gs, ss, ys = g[order], s[order], y[order]
    new_group = np.ones(gs.size, dtype=bool)
    new_group[1:] = gs[1:] != gs[:-1]
    ranks = _average_ranks(ss, new_group)
    ids = np.cumsum(new_group) - 1
    n_groups = int(ids[-1]) + 1
    size = np.bincount(ids, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(ids, weights=ys, minlength=n_groups)
    n_neg = size - n_pos
    rank_sum = np.bincount(ids, weights=ranks * ys, minlength=n_groups)
    both = (n_pos > 0) & (n_neg > 0)
    aucs = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
    return gs[new_group][both], aucs, size[both].astype(np.int64)


def gauc(labels, scores, groups) -> float:
    """Group AUC: per-group AUCs averaged, weighted by the group's rows.

    Only groups (users) with at least one positive and one negative count.

    Raises:
        ValueError: if no group has both classes.
    """
    _, aucs, sizes = group_aucs(labels, scores, groups)
    if aucs.size == 0:
        raise ValueError("gAUC is undefined: no group has both a positive and a negative example.")
    return float(np.sum(aucs * sizes) / np.sum(sizes))


def calibration_bins(labels, predictions, num_bins: int = 10) -> dict[str, list]:
    """Reliability diagram data: equal-width bins of the predicted probability.

    Returns:
        ``{"mean_prediction", "positive_rate", "count"}``, one entry per
        non-empty bin, in increasing order of prediction.
    """
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be >= 1. Received: num_bins={num_bins}")
    y, p = _check(labels, predictions, "predictions")
    b = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    b = np.clip(b, 0, num_bins - 1)
    count = np.bincount(b, minlength=num_bins)
    keep = count > 0
    mean_p = np.bincount(b, weights=p, minlength=num_bins)[keep] / count[keep]
    rate = np.bincount(b, weights=y, minlength=num_bins)[keep] / count[keep]
    return {"mean_prediction": mean_p.tolist(), "positive_rate": rate.tolist(),
            "count": count[keep].astype(int).tolist()}


def evaluate(labels, predictions, groups=None) -> dict[str, float]:
    """All reported metrics of one split.

    Returns:
        ``auc``, ``logloss``, ``gauc`` (only with ``groups``; NaN when no
        group has both classes), ``num_examples``, ``positive_rate``,
        ``mean_prediction``.
    """
    y, p = _check(labels, predictions, "predictions")
    out = {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "num_examples": int(y.size),
        "positive_rate": float(y.mean()),
        "mean_prediction": float(p.mean()),
    }
    if groups is not None:
        _, aucs, sizes = group_aucs(y, p, groups)
        out["gauc"] = float(np.sum(aucs * sizes) / np.sum(sizes)) if aucs.size else math.nan
        out["gauc_groups"] = int(aucs.size)
    return out
