"""The rules of a scoring protocol (``MetricConfig``) and the two presets this project scores with:
``PRESETS["paper"]`` (the release's evaluation, quirks included) and ``PRESETS["standard"]`` (most IRSTD
toolkits' rules). ``utils.score.metrics`` explains each rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Score = Literal["logit", "sigmoid", "normalised"]
SCORES = ("logit", "sigmoid", "normalised")
MaskRule = Literal["release", "nonzero"]
MASK_RULES = ("release", "nonzero")
METRIC_KEYS = ("mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1", "AUC")


class InvalidPredictionError(ValueError):
    """A prediction or mask that cannot be scored (NaN or inf values, wrong number of dimensions)."""


@dataclass(frozen=True)
class MetricConfig:
    """Every rule of a scoring protocol.

    Scores a threshold can apply to (``Score``): ``"logit"`` is T itself, ``"sigmoid"`` is p = sigmoid(T)
    and ``"normalised"`` is p / max(p) over the image (the release's per-image max normalisation; an image
    whose p is 0 everywhere stays 0). p is computed in float32, as the release's torch code does.

    Args:
        name: shown in reports.
        size: (H, W) every prediction is resized to (bilinear, cv2.INTER_LINEAR, on the logits) together with
            its mask; None scores each image at its prediction's own size (a mask of another size is resized
            to it).
        mask_rule: which mask pixels are target, and how a mask is resized. ``"release"``: the release's scorer,
            pixels equal to the mask's maximum ((mask / max).astype(int64)), resized with cv2.INTER_NEAREST
            (``utils.io.images.release_targets``); ``"nonzero"``: pixels > 0, resized at pixel centres
            (cv2.INTER_NEAREST_EXACT). An empty mask has no target under both (the release would divide 0 by 0).
        seg_score, seg_threshold: mIoU, nIoU, Prec, Recall and F1 count a pixel as predicted when
            seg_score > seg_threshold.
        det_score, det_threshold: Pd and Fa count a pixel as predicted when det_score > det_threshold.
        match_radius: a target (8-connected mask component) is matched by the first not yet matched
            predicted component, in label order, whose centroid is closer than this many pixels (strict <).
        fa_pixels_per_image: Fa denominator per image; None uses the scored map's own pixel count.
        fa_skip_equal_area: the release's quirk: an unmatched predicted component whose area equals the area
            of any matched component of the same image is not counted as false alarm.
        roc_score, roc_levels: the ROC thresholds roc_score at t = i / (roc_levels - 1), i = 0..roc_levels-1,
            a pixel being predicted when roc_score >= t; a target is detected at t when any of its pixels is
            predicted; the false-positive rate is over background pixels; the area is the trapezoid rule.
        roc_skip_empty: leave images whose mask has no target out of the ROC.
        iou_if_empty: the IoU of an image (for nIoU) or a set (for mIoU) with no target pixel and no
            predicted pixel: 0 as in the toolkits (their eps-guarded division), 1 to call it perfect.
    """

    name: str = "standard"
    size: tuple[int, int] | None = None
    mask_rule: MaskRule = "nonzero"
    seg_score: Score = "sigmoid"
    seg_threshold: float = 0.5
    det_score: Score = "sigmoid"
    det_threshold: float = 0.5
    match_radius: float = 3.0
    fa_pixels_per_image: int | None = None
    fa_skip_equal_area: bool = False
    roc_score: Score = "sigmoid"
    roc_levels: int = 201
    roc_skip_empty: bool = False
    iou_if_empty: float = 0.0

    def __post_init__(self) -> None:
        for key in ("seg_score", "det_score", "roc_score"):
            value = getattr(self, key)
            if value not in SCORES:
                raise ValueError(f"MetricConfig.{key} must be one of {SCORES}, got {value!r}")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"MetricConfig.mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"MetricConfig.size must be None or (H, W) with positive sides, got {self.size!r}")
        if not self.match_radius > 0:
            raise ValueError(f"MetricConfig.match_radius must be positive, got {self.match_radius}")
        if self.roc_levels < 2:
            raise ValueError(f"MetricConfig.roc_levels must be at least 2, got {self.roc_levels}")
        if self.fa_pixels_per_image is not None and self.fa_pixels_per_image <= 0:
            raise ValueError(f"MetricConfig.fa_pixels_per_image must be None or positive, "
                             f"got {self.fa_pixels_per_image}")

    def describe(self) -> str:
        """One line stating the rules, for reports."""
        size = ("each prediction's own size (its mask brought to it)" if self.size is None
                else f"resized to {self.size[0]}x{self.size[1]}")
        targets = ("targets = mask pixels at the mask's max, INTER_NEAREST" if self.mask_rule == "release"
                   else "targets = mask pixels > 0, nearest at pixel centres")
        fa_den = "all pixels" if self.fa_pixels_per_image is None else f"{self.fa_pixels_per_image} px/image"
        return (f"{self.name}: {size}; {targets}; IoU/F1 on {self.seg_score} > {self.seg_threshold}; "
                f"Pd/Fa on {self.det_score} > {self.det_threshold}, centroid < {self.match_radius} px, "
                f"Fa over {fa_den}{', equal-area quirk' if self.fa_skip_equal_area else ''}; "
                f"ROC on {self.roc_score} >= i/{self.roc_levels - 1}"
                f"{', images without targets skipped' if self.roc_skip_empty else ''}")


PRESETS: dict[str, MetricConfig] = {
    "paper": MetricConfig(name="paper", size=(256, 256), mask_rule="release",
                          seg_score="normalised", seg_threshold=0.5,
                          det_score="logit", det_threshold=0.0,
                          match_radius=2.0, fa_pixels_per_image=512 * 512, fa_skip_equal_area=True,
                          roc_score="normalised", roc_levels=201, roc_skip_empty=True),
    "standard": MetricConfig(name="standard"),
}
