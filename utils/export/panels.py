"""Pictures of DCONet's decomposition: the image, each stage's background B_k, target layer T_k and
reconstruction D_k, the final detection and, when the ground truth is known, hits, misses and false alarms.

    save_panel("vis/Misc_1.png", image, prediction, mask)     # prediction from utils.export.predict, with stages

Detections follow the "standard" protocol of utils.score.metrics: sigmoid(T) > 0.5, 8-connected components, a target
(mask component) is hit when a predicted component's centroid lies closer than 3 px to its centroid.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle
from scipy import ndimage

from model.config import StageOutput
from utils.score.components import components, match_targets
from utils.score.metrics import score_map
from utils.score.protocols import PRESETS, MetricConfig

HIT, MISS, FALSE_ALARM = "#39ff14", "#00e5ff", "#ffa500"   # marker colours: green, cyan, orange
TILE_INCHES = 2.6
DPI = 100


@dataclass(frozen=True)
class DetectionOutcome:
    """Targets and detections of one image: centroids (n, 2) as (row, col), boxes (n, 4) as (r0, c0, r1, c1)
    inclusive-exclusive, and the binary prediction (H, W)."""

    hits: np.ndarray
    misses: np.ndarray
    false_alarms: np.ndarray
    false_alarm_boxes: np.ndarray
    predicted: np.ndarray


def detection_outcome(logits: np.ndarray, mask: np.ndarray,
                      config: MetricConfig = PRESETS["standard"]) -> DetectionOutcome:
    """Which targets of ``mask`` (H, W) the prediction ``logits`` (H, W) hits or misses, and its false alarms,
    by the Pd/Fa rule of ``config`` (at the prediction's own size: ``config.size`` is not applied here)."""
    predicted = score_map(logits, config.det_score) > config.det_threshold
    targets, found = components(np.asarray(mask) > 0), components(predicted)
    matched = match_targets(targets.centroid, found.centroid, config.match_radius)    # (targets,), -1 = missed
    unmatched = np.setdiff1d(np.arange(found.n), matched[matched >= 0])
    boxes = ndimage.find_objects(found.labels)                                        # label i + 1 -> boxes[i]
    fa_boxes = np.array([[boxes[i][0].start, boxes[i][1].start, boxes[i][0].stop, boxes[i][1].stop]
                         for i in unmatched], dtype=np.int64).reshape(-1, 4)
    return DetectionOutcome(hits=targets.centroid[matched >= 0], misses=targets.centroid[matched < 0],
                            false_alarms=found.centroid[unmatched], false_alarm_boxes=fa_boxes, predicted=predicted)


def _stretch(image: np.ndarray) -> tuple[float, float]:
    """A display range that ignores the extreme 0.5 % at each end (never empty)."""
    lo, hi = np.percentile(image, (0.5, 99.5))
    if hi - lo < 1e-6:
        lo, hi = float(image.min()), float(image.max()) + 1e-6
    return float(lo), float(hi)


def _gray(ax, image: np.ndarray, title: str) -> None:
    lo, hi = _stretch(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(f"{title}\n[{image.min():.2f}, {image.max():.2f}]", fontsize=8)


def _probability(ax, logits: np.ndarray, title: str) -> None:
    p = 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float32)))   # sigmoid, no overflow
    ax.imshow(p, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(f"{title}\nsigmoid, max {p.max():.2f}", fontsize=8)


def _overlay(image: np.ndarray, predicted: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """RGB (H, W, 3): the image dimmed, predicted pixels red, mask pixels green (both: yellow)."""
    lo, hi = _stretch(image)
    base = np.clip((image - lo) / (hi - lo), 0, 1) * 0.6
    rgb = np.repeat(base[..., None], 3, axis=2)
    rgb[predicted, 0] = 1.0
    if mask is not None:
        rgb[mask, 1] = 1.0
        rgb[mask & ~predicted, 0] = 0.0
    return rgb


def _mark(ax, outcome: DetectionOutcome, radius: float) -> None:
    for (r, c), colour in [(p, HIT) for p in outcome.hits] + [(p, MISS) for p in outcome.misses]:
        ax.add_patch(Circle((c, r), radius, fill=False, edgecolor=colour, linewidth=1.5))
    for r0, c0, r1, c1 in outcome.false_alarm_boxes:
        pad = radius / 3
        ax.add_patch(Rectangle((c0 - 0.5 - pad, r0 - 0.5 - pad), c1 - c0 + 2 * pad, r1 - r0 + 2 * pad,
                               fill=False, edgecolor=FALSE_ALARM, linewidth=1.0))


def decomposition_panel(image: np.ndarray, prediction, mask: np.ndarray | None = None,
                        title: str | None = None) -> Figure:
    """A figure of 3 rows x (K + 1) columns:

    row 1: the input, then B_1 .. B_K (background);  row 2: sigmoid(T) > 0.5 over the input, then sigmoid(T_k);
    row 3: detections (against the ground truth ``mask`` when given), then D_k (reconstruction).

    ``image`` (H, W) is what the prediction is aligned with (resized when the prediction was); ``prediction`` a
    ``utils.export.predict.Prediction`` (with ``stages`` for every stage, else only the last is shown).
    """
    stages = list(prediction.stages) or [StageOutput(prediction.B, prediction.T, prediction.D)]
    assert image.shape == prediction.T.shape, \
        f"decomposition_panel: image {image.shape} and prediction {prediction.T.shape} differ in size"
    if mask is not None:
        mask = np.asarray(mask) > 0
        assert mask.shape == image.shape, f"decomposition_panel: mask {mask.shape} and image {image.shape} differ"
    h, w = image.shape
    cols = len(stages) + 1
    tile_h = TILE_INCHES * min(max(h / w, 0.4), 2.5)
    fig = Figure(figsize=(TILE_INCHES * cols, (tile_h + 0.45) * 3 + (0.3 if title else 0)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])

    _gray(axes[0, 0], image, f"input {h}x{w}")
    outcome = detection_outcome(prediction.T, mask if mask is not None else np.zeros_like(image, dtype=bool))
    axes[1, 0].imshow(_overlay(image, outcome.predicted, None), interpolation="nearest")
    axes[1, 0].set_title(f"final: sigmoid(T) > 0.5\n{int(outcome.predicted.sum())} px, "
                         f"{len(outcome.false_alarms) + len(outcome.hits)} component(s)", fontsize=8)
    axes[2, 0].imshow(_overlay(image, outcome.predicted, mask), interpolation="nearest")
    radius = max(4.0, 0.025 * max(h, w))
    _mark(axes[2, 0], outcome, radius)
    if mask is not None:
        axes[2, 0].set_title(f"truth green, prediction red; {len(outcome.hits)} hit (green o),\n"
                             f"{len(outcome.misses)} missed (cyan o), {len(outcome.false_alarms)} false alarm "
                             f"(orange box)", fontsize=8)
    else:
        axes[2, 0].set_title(f"no ground truth\n{len(outcome.false_alarms)} detections (boxed)", fontsize=8)
    for k, stage in enumerate(stages, start=1):
        _gray(axes[0, k], stage.B, f"B{k}: background")
        _probability(axes[1, k], stage.T, f"T{k}: targets")
        _gray(axes[2, k], stage.D, f"D{k}: reconstruction")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_panel(path: str | Path, image: np.ndarray, prediction, mask: np.ndarray | None = None,
               title: str | None = None) -> Path:
    """Write ``decomposition_panel`` as a PNG (folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = decomposition_panel(image, prediction, mask, title=title or prediction.name)
    fig.savefig(path, dpi=DPI)
    return path
