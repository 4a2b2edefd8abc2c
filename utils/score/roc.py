"""ROC curves of infrared small-target detection: per-threshold target detections and false-positive pixels.

A target (an 8-connected mask component) is detected at threshold t when any of its pixels scores >= t; false
positives are the background pixels scoring >= t. ``utils.score.metrics.Evaluator`` sums these counts over a set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.score.components import Components


@dataclass(frozen=True)
class RocCurve:
    """ROC over the set, one point per threshold (ascending): fpr over background pixels, tpr = Pd of targets."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def roc_thresholds(levels: int) -> np.ndarray:
    """t = i / (levels - 1), i = 0..levels-1 (float64)."""
    return np.arange(levels) / (levels - 1)


def count_at_or_above(values: np.ndarray, levels: int) -> np.ndarray:
    """For each threshold t_i = i / (levels - 1), how many values are >= t_i (exact float64 comparisons,
    as ``values >= t_i`` would give), in one pass: no loop over thresholds."""
    thresholds = roc_thresholds(levels)
    values = values.ravel()
    high = values[values >= thresholds[1]].astype(np.float64)  # maps are mostly low: bin only the rest
    upper = np.append(thresholds, np.inf)                  # upper[k] = t_k, +inf past the last threshold
    lower = np.append(-np.inf, thresholds)                 # lower[k] = t_(k-1), -inf before the first
    passed = np.minimum(np.floor(high * (levels - 1)), levels - 1).astype(np.int64) + 1  # ~ #{i: t_i <= v}
    passed += upper[passed] <= high                        # correct an estimate that rounded down
    passed -= lower[passed] > high                         # or up
    counts = np.cumsum(np.bincount(passed, minlength=levels + 1)[::-1])[::-1][1:]
    counts[0] = np.count_nonzero(values >= thresholds[0])  # t_0 = 0: every non-negative value
    return counts


def roc_counts(score: np.ndarray, targets: Components, levels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One image's ROC counts per threshold: (detected targets, false-positive pixels, background pixels).
    A target is detected at t when any of its pixels has score >= t, i.e. when its maximum does."""
    pixels = np.flatnonzero(targets.labels)
    target_scores = score.ravel()[pixels]
    peaks = np.full(targets.n, -np.inf)
    np.maximum.at(peaks, targets.labels.ravel()[pixels] - 1, target_scores)
    false_positives = count_at_or_above(score, levels) - count_at_or_above(target_scores, levels)
    return count_at_or_above(peaks, levels), false_positives, int(score.size - pixels.size)


def area_under_curve(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area of the curve through the given points, ordered by threshold (fpr falls as t rises)."""
    return float(-np.trapezoid(tpr, fpr))
