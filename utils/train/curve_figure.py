"""The learning-curves figure: runs read by ``utils.train.curves`` drawn overlaid, written atomically."""
from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from utils.train.curves import RunCurves

# ----------------------------------------------------------------------------------------------------------

# (key, title, factor on the values, y scale): the training row, then the validation row. Fa spans orders of
# magnitude (an untrained model's is near 1e6 x 1e-6) and may be 0: symmetric log, linear below 1e-6.
_TRAIN_PANELS = (("loss", "training loss (total)", 1, "linear"), ("soft_iou", "SoftIoU loss", 1, "linear"),
                 ("mse", "MSE(D, image), unweighted", 1, "log"), ("lr", "learning rate", 1, "linear"))
_VAL_PANELS = (("mIoU", "validation mIoU", 1, "linear"), ("nIoU", "validation nIoU", 1, "linear"),
               ("F1", "validation F1", 1, "linear"), ("Pd", "validation Pd", 1, "linear"),
               ("Fa", "validation Fa (x 1e-6)", 1e6, "symlog"))
# With --negatives: false targets per held-out background frame, counted at some validations only.
_FT_PANEL = ("FT/frame", "held-out false targets per background frame", 1, "linear")


def _smooth(values: list[float]) -> list[float]:
    """A moving average over about a fiftieth of the points (the logged losses are single batches)."""
    window = max(1, len(values) // 50)
    if window == 1:
        return list(values)
    out, total, kept = [], 0.0, []
    for value in values:
        kept.append(value)
        total += value
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def curves_figure(runs: Sequence[RunCurves], title: str | None = None, max_iteration: int | None = None):
    """The matplotlib Figure that ``plot_curves`` writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg      # Agg only, no pyplot state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(18, 7.5), dpi=100, layout="constrained")     # room for every axis's labels
    FigureCanvasAgg(figure)
    if max_iteration is not None:
        runs = [_cropped(run, max_iteration) for run in runs]
    counted = any(not math.isnan(v) for run in runs for v in run.val.get(_FT_PANEL[0], []))
    axes = figure.subplots(2, 6 if counted else 5, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, name, scale, y_scale) in zip(axes[0], _TRAIN_PANELS):
        drawn = False
        for run, colour in zip(runs, colours):
            values = [v * scale for v in run.train[key]]
            if not values:
                continue
            drawn = True
            if key == "lr":
                ax.plot(run.train_iter, values, color=colour, linewidth=1.4)
            else:
                ax.plot(run.train_iter, values, color=colour, linewidth=0.6, alpha=0.3)
                ax.plot(run.train_iter, _smooth(values), color=colour, linewidth=1.4)
        _finish(ax, name, drawn, y_scale)
    for ax, (key, name, scale, y_scale) in zip(axes[1], _VAL_PANELS):
        drawn = False
        for run, colour in zip(runs, colours):
            values = [v * scale for v in run.val.get(key, [])]
            if not values:
                continue
            drawn = True
            ax.plot(run.val_iter, values, color=colour, linewidth=1.2,
                    marker="o" if len(values) <= 60 else None, markersize=3)
            best = run.best(key) if key != "Fa" else None
            if best is not None:
                ax.plot([best[0]], [best[1] * scale], color=colour, marker="*", markersize=11,
                        markeredgecolor="black", markeredgewidth=0.5, linestyle="none")
        _finish(ax, name, drawn, y_scale)
        ax.set_xlabel("iteration")
    if counted:
        key, name, _, y_scale = _FT_PANEL
        ax = axes[0, 4]
        for run, colour in zip(runs, colours):
            points = [(i, v) for i, v in zip(run.val_iter, run.val.get(key, [])) if not math.isnan(v)]
            if points:
                ax.plot(*zip(*points), color=colour, linewidth=1.2, marker="o", markersize=3)
        _finish(ax, name, True, y_scale)
        axes[1, 5].axis("off")

    legend = axes[0, -1]
    legend.axis("off")
    handles = []
    for run, colour in zip(runs, colours):
        best, count = run.best("mIoU"), len(run.val_iter)
        text = f"{run.label}\n{run.format} log, to iteration {run.train_iter[-1] if run.train_iter else 0}"
        if best is not None:
            text += f"\nbest mIoU {best[1]:.4f} at iteration {best[0]}\n({count} validation{'s' if count != 1 else ''})"
        handles.append((Line2D([], [], color=colour, linewidth=2), text))
    if handles:
        legend.legend([h for h, _ in handles], [t for _, t in handles], loc="upper left", fontsize=8,
                      frameon=False, handlelength=1.5, labelspacing=1.0)
    legend.text(0.0, 0.0, "losses: faint = logged batches,\nsolid = moving average\nstar: best validation value",
                transform=legend.transAxes, fontsize=8, va="bottom", color="0.35")
    if title:
        figure.suptitle(title)
    return figure


def plot_curves(runs: Sequence[RunCurves], out: str | Path, title: str | None = None,
                max_iteration: int | None = None) -> Path:
    """Draw ``runs`` overlaid (loss parts and lr, then validation mIoU, nIoU, F1, Pd, Fa, against the global
    iteration, and false targets per held-out background frame where a run counted them; with ``max_iteration``,
    the points up to that iteration only) and write a PNG to ``out`` atomically (a temporary file beside it, then
    os.replace)."""
    figure = curves_figure(runs, title, max_iteration)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)               # an ordinary file, not mkstemp's owner-only one
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def _cropped(run: RunCurves, last: int) -> RunCurves:
    from utils.train.curves import truncate
    run = copy.deepcopy(run)
    truncate(run, last)
    return run


def _finish(ax, title: str, drawn: bool, y_scale: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not in these logs", transform=ax.transAxes, ha="center", va="center", color="0.5")
    elif y_scale == "symlog":
        ax.set_yscale("symlog", linthresh=1)
        # from 0 to the next power of ten above the data, so that a single value too sits between ticks
        ax.set_ylim(0, 10 ** math.ceil(math.log10(max(ax.dataLim.y1, 1.0) * 1.25)))
    else:
        ax.set_yscale(y_scale)
