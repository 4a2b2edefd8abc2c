"""Infrared small-target scores: mIoU, nIoU, Prec/Recall/F1, Pd/Fa and ROC/AUC under explicit rules.

IRSTD papers disagree on what Pd and Fa mean, so every rule is a field of ``MetricConfig`` and two presets
name the two protocols this project scores with:

- ``PRESETS["paper"]`` reproduces the numbers the DCONet release prints, quirks included: maps resized to
  256x256 (bilinear), masks with cv2.INTER_NEAREST, target pixels those at the mask's maximum, segmentation on
  sigmoid(T) / its image max > 0.5, detection on T > 0, centroids matched closer than 2 px, Fa over 512*512
  pixels per image, unmatched components whose area equals a matched one's not counted, ROC on the
  max-normalised probability with images without targets left out.
- ``PRESETS["standard"]`` is the rule set most IRSTD toolkits use: native size (a mask of another size resized at
  pixel centres), target pixels the mask's non-zero ones, sigmoid(T) > 0.5 for everything, centroids closer than
  3 px, Fa = unmatched predicted pixels / all pixels.

Usage, in a validation loop or a scoring script (one image at a time, or a batch of tensors)::

    evaluator = Evaluator(PRESETS["standard"])
    for images, masks, names in loader:
        T = model(images)[1]                        # logits, (N, 1, H, W)
        evaluator.update_batch(T, masks, names)     # torch tensors or numpy arrays
    scores = evaluator.compute()                    # {"mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1", "AUC"}

``update(logits (H, W), mask (H, W), name)`` takes one image. Scores are fractions and Fa a plain rate
(papers print Fa x 1e6). ``records`` holds one ``ImageRecord`` per image and ``roc()`` the ROC curve.
The accumulator keeps counts only, never the maps, so memory does not grow with the images' size.

A quantity that cannot be measured on the images seen is NaN: Recall and Pd without any target,
AUC without any target or any background pixel. Precision without any predicted pixel is 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import special

from utils.score.components import components, false_alarm_pixels, match_targets
from utils.io.images import release_targets, resize_linear, resize_mask_centres
from utils.score.protocols import PRESETS, InvalidPredictionError, MaskRule, MetricConfig, Score
from utils.score.roc import RocCurve, area_under_curve, roc_counts, roc_thresholds

@dataclass(frozen=True)
class ImageRecord:
    """One image's share of the scores: its IoU, its targets, how many were detected, its false-alarm pixels,
    the size it was scored at, its predicted pixels (for mIoU) and the centroids (row, col) of missed targets."""

    name: str
    IoU: float
    targets: int
    detected: int
    false_alarm_pixels: int
    size: tuple[int, int] = (0, 0)
    predicted_pixels: int = 0
    missed: tuple[tuple[float, float], ...] = ()

    @property
    def empty(self) -> bool:
        """No target and no predicted pixel: the IoU is 0 by convention (``MetricConfig.iou_if_empty``), not a miss."""
        return self.targets == 0 and self.predicted_pixels == 0


# ----------------------------------------------------------------------------------------------------------
# Pure functions on one image
# ----------------------------------------------------------------------------------------------------------

def score_map(logits: np.ndarray, kind: Score) -> np.ndarray:
    """The map a threshold applies to: T, sigmoid(T) or sigmoid(T) / its max (float32, (H, W))."""
    logits = np.asarray(logits, dtype=np.float32)
    if kind == "logit":
        return logits
    p = special.expit(logits)  # float32 in, float32 out
    if kind == "sigmoid":
        return p
    peak = p.max()
    return p / peak if peak > 0 else p  # an all-zero p (logits below about -104) stays zero


def resize_pair(logits: np.ndarray, mask: np.ndarray, size: tuple[int, int] | None,
                mask_rule: MaskRule = "nonzero") -> tuple[np.ndarray, np.ndarray, bool]:
    """Bring a prediction and its mask to the protocol's size: both to ``size`` (logits bilinear), or with
    ``size`` None the mask to the prediction's size; the mask becomes its target pixels by ``mask_rule`` (see
    ``MetricConfig``). Returns (logits, target pixels (bool), mask_was_resized)."""
    mask = np.asarray(mask)
    mask_resized = mask.shape != logits.shape
    target = logits.shape if size is None else tuple(size)
    if mask_rule == "release":
        targets = release_targets(mask, target)
    else:
        targets = resize_mask_centres(mask > 0, target)
    return resize_linear(logits, target), targets, mask_resized


def _ratio(numerator: float, denominator: float, if_zero: float) -> float:
    return float(numerator / denominator) if denominator else float(if_zero)


# ----------------------------------------------------------------------------------------------------------
# The accumulator
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Totals:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    targets: int = 0
    detected: int = 0
    false_alarm_pixels: int = 0
    fa_pixels: int = 0
    roc_detected: np.ndarray | None = None
    roc_false_positives: np.ndarray | None = None
    roc_targets: int = 0
    roc_background: int = 0
    iou_per_image: list[float] = field(default_factory=list)


class Evaluator:
    """Accumulates the scores of a set image by image under one ``MetricConfig``.

    Args:
        config: the protocol, e.g. ``PRESETS["standard"]`` (the default) or ``PRESETS["paper"]``.
    """

    def __init__(self, config: MetricConfig = PRESETS["standard"]) -> None:
        self.config = config
        self.thresholds = roc_thresholds(config.roc_levels)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._totals = _Totals(roc_detected=np.zeros(len(self.thresholds), dtype=np.int64),
                               roc_false_positives=np.zeros(len(self.thresholds), dtype=np.int64))
        self.records: list[ImageRecord] = []
        self.resized_masks = 0  # masks whose size differed from their prediction's

    def __len__(self) -> int:
        return len(self.records)

    def update(self, logits: np.ndarray, mask: np.ndarray, name: str | None = None) -> ImageRecord:
        """Score one image: ``logits`` T of shape (H, W), finite; ``mask`` (H, W) as stored or boolean, its
        target pixels chosen by ``config.mask_rule``.
        ``name`` (a file name) is used in records and error messages. Returns the image's record."""
        config, totals = self.config, self._totals
        name = f"image {len(self.records)}" if name is None else str(name)
        logits = np.asarray(logits)
        mask = np.asarray(mask)
        if logits.ndim != 2 or mask.ndim != 2:
            raise InvalidPredictionError(f"{name}: expected a prediction and a mask of shape (H, W), got "
                                         f"{logits.shape} and {mask.shape}; use update_batch for (N, 1, H, W)")
        if not np.isfinite(logits).all():
            raise InvalidPredictionError(f"{name}: the prediction holds NaN or inf values; "
                                         f"check the model output or the file that holds it")
        logits, mask, mask_resized = resize_pair(logits.astype(np.float32, copy=False), mask, config.size,
                                                 config.mask_rule)
        self.resized_masks += int(mask_resized)

        scores: dict[str, np.ndarray] = {}  # each score map computed once

        def score(kind: Score) -> np.ndarray:
            if kind not in scores:
                scores[kind] = score_map(logits, kind)
            return scores[kind]

        # mIoU, nIoU, Prec, Recall, F1: pixel counts
        seg = score(config.seg_score) > config.seg_threshold
        tp = int(np.count_nonzero(seg & mask))
        fp = int(np.count_nonzero(seg)) - tp
        fn = int(np.count_nonzero(mask)) - tp
        iou = _ratio(tp, tp + fp + fn, config.iou_if_empty)
        totals.tp, totals.fp, totals.fn = totals.tp + tp, totals.fp + fp, totals.fn + fn
        totals.iou_per_image.append(iou)

        # Pd, Fa: components and centroids
        targets = components(mask)
        predicted = components(score(config.det_score) > config.det_threshold)
        matched = match_targets(targets.centroid, predicted.centroid, config.match_radius)   # (targets,), -1: missed
        detected = int((matched >= 0).sum())
        fa_pixels = false_alarm_pixels(predicted.area, matched, config.fa_skip_equal_area)
        totals.targets += targets.n
        totals.detected += detected
        totals.false_alarm_pixels += fa_pixels
        totals.fa_pixels += config.fa_pixels_per_image or logits.size

        # ROC: counts per threshold
        if targets.n or not config.roc_skip_empty:
            roc_detected, roc_fp, background = roc_counts(score(config.roc_score), targets, config.roc_levels)
            totals.roc_detected += roc_detected
            totals.roc_false_positives += roc_fp
            totals.roc_targets += targets.n
            totals.roc_background += background

        record = ImageRecord(name=name, IoU=iou, targets=targets.n, detected=detected, false_alarm_pixels=fa_pixels,
                             size=logits.shape, predicted_pixels=int(np.count_nonzero(seg)),
                             missed=tuple(map(tuple, targets.centroid[matched < 0].tolist())))
        self.records.append(record)
        return record

    def update_batch(self, logits: Any, masks: Any, names: Sequence[str] | None = None) -> None:
        """Score a batch: ``logits`` and ``masks`` as torch tensors or numpy arrays of shape (N, 1, H, W) or
        (N, H, W); tensors are detached and moved to the CPU. ``names``: one per image, or None."""
        logits, masks = _to_numpy(logits), _to_numpy(masks)
        logits = logits.reshape(-1, *logits.shape[-2:])  # (N, 1, H, W) -> (N, H, W)
        masks = masks.reshape(-1, *masks.shape[-2:])
        if len(logits) != len(masks):
            raise ValueError(f"update_batch: {len(logits)} predictions but {len(masks)} masks")
        if names is not None and len(names) != len(logits):
            raise ValueError(f"update_batch: {len(logits)} images but {len(names)} names")
        for i in range(len(logits)):
            self.update(logits[i], masks[i], None if names is None else names[i])

    def roc(self) -> RocCurve:
        """The ROC curve over the images seen (NaN rates when there was no target or no background pixel)."""
        totals = self._totals
        nan = np.full(len(self.thresholds), np.nan)
        tpr = totals.roc_detected / totals.roc_targets if totals.roc_targets else nan
        fpr = totals.roc_false_positives / totals.roc_background if totals.roc_background else nan
        return RocCurve(thresholds=self.thresholds.copy(), fpr=fpr, tpr=tpr, auc=area_under_curve(fpr, tpr))

    def compute(self) -> dict[str, float]:
        """The scores over the images seen: exactly ``METRIC_KEYS``, as fractions; Fa as a plain rate."""
        totals = self._totals
        if not self.records:
            raise ValueError("Evaluator.compute: no image was scored; call update() first")
        precision = _ratio(totals.tp, totals.tp + totals.fp, 0.0)
        recall = _ratio(totals.tp, totals.tp + totals.fn, np.nan)
        if np.isnan(recall):
            f1 = np.nan
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {
            "mIoU": _ratio(totals.tp, totals.tp + totals.fp + totals.fn, self.config.iou_if_empty),
            "nIoU": float(np.mean(totals.iou_per_image)),
            "Pd": _ratio(totals.detected, totals.targets, np.nan),
            "Fa": _ratio(totals.false_alarm_pixels, totals.fa_pixels, np.nan),
            "Prec": precision,
            "Recall": recall,
            "F1": float(f1),
            "AUC": self.roc().auc,
        }


def _to_numpy(array: Any) -> np.ndarray:
    """A torch tensor (any device, any float type) or array-like as a numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        if array.is_floating_point():
            array = array.float()
        return array.numpy()
    return np.asarray(array)
