"""Figures of the scores: the ROC curve next to Pd against Fa on a log axis, as IRSTD papers plot them."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def save_roc_figure(path: str | Path, roc, protocol: str) -> Path:
    """The ROC (false-positive rate over background pixels against Pd, linear axes) next to Pd against Fa on a
    log axis, as IRSTD papers plot it; both titled with the protocol and the AUC. ``roc``: a ``utils.score.roc.RocCurve``."""
    path = Path(path)
    fig = Figure(figsize=(10, 4.5), dpi=DPI)
    FigureCanvasAgg(fig)
    linear, log = fig.subplots(1, 2)
    title = f"{protocol} protocol, AUC = {roc.auc:.4f}"
    linear.plot(roc.fpr, roc.tpr, marker=".", markersize=3)
    linear.set(xlabel="false-positive rate (background pixels)", ylabel="Pd (targets detected)", xlim=(0, 1),
               ylim=(0, 1.02), title=f"ROC, {title}")
    positive = roc.fpr > 0                                       # a log axis has no place for a rate of 0
    log.plot(roc.fpr[positive], roc.tpr[positive], marker=".", markersize=3)
    log.set_xscale("log")
    log.set(xlabel="Fa (false-alarm rate per background pixel, log)", ylabel="Pd (targets detected)",
            ylim=(0, 1.02), title=f"Pd-Fa, {title}")
    for axes in (linear, log):
        axes.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
