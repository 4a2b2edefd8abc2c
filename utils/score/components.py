"""Targets as 8-connected components: labelling, centroids, centroid matching and false-alarm pixels.

The one labelling that scores (``utils.score.metrics``), pictures (``utils.export.panels``) and detections share.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Components:
    """8-connected components of a binary map, labelled 1..n in raster order of their first pixel (as
    skimage.measure.label(connectivity=2)): label map, area (n,) and centroid (n, 2) as (row, col), the mean of
    the component's pixel coordinates (as regionprops)."""

    labels: np.ndarray
    n: int
    area: np.ndarray
    centroid: np.ndarray


def components(binary: np.ndarray) -> Components:
    """The 8-connected components of ``binary`` (H, W) with their areas and centroids."""
    labels, n = ndimage.label(binary, structure=EIGHT_CONNECTED)
    pixels = np.flatnonzero(labels)                      # only the foreground: maps are mostly empty
    owner = labels.ravel()[pixels]
    rows, cols = np.divmod(pixels, labels.shape[1])
    area = np.bincount(owner, minlength=n + 1)[1:]
    row_sum = np.bincount(owner, weights=rows, minlength=n + 1)[1:]
    col_sum = np.bincount(owner, weights=cols, minlength=n + 1)[1:]
    centroid = np.stack([row_sum / np.maximum(area, 1), col_sum / np.maximum(area, 1)], axis=1)  # (n, 2)
    return Components(labels=labels, n=int(n), area=area, centroid=centroid)


def match_targets(target_centroids: np.ndarray, pred_centroids: np.ndarray, radius: float) -> np.ndarray:
    """Greedy centroid matching: for each target in order, the first free predicted component closer than
    ``radius`` (Euclidean, strict). Returns, per target, the matched component's index or -1."""
    matched = np.full(len(target_centroids), -1, dtype=np.int64)
    if len(target_centroids) == 0 or len(pred_centroids) == 0:
        return matched
    diff = pred_centroids[None, :, :] - target_centroids[:, None, :]      # (targets, preds, 2)
    distance = np.sqrt(diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1])
    free = np.ones(len(pred_centroids), dtype=bool)
    for t, row in enumerate(distance < radius):
        candidates = np.flatnonzero(row & free)
        if candidates.size:
            matched[t] = candidates[0]
            free[candidates[0]] = False
    return matched


def false_alarm_pixels(pred_areas: np.ndarray, matched: np.ndarray, skip_equal_area: bool) -> int:
    """Pixels of the predicted components no target matched; with ``skip_equal_area`` (the release's quirk,
    which compares areas by value) a component is also left out when a matched component has its area."""
    hit = matched[matched >= 0]
    unmatched = np.ones(len(pred_areas), dtype=bool)
    unmatched[hit] = False
    if skip_equal_area:
        unmatched &= ~np.isin(pred_areas, pred_areas[hit])
    return int(pred_areas[unmatched].sum())
