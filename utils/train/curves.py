"""Learning curves of training runs: read from their logs, drawn into one figure.

    curves = read_curves("Weight/IRSTD-1k")                        # a run folder (its log.txt) or a log file
    release = read_curves("../shared/reference/release_logs/IRSTD-1K_log.txt")
    plot_curves([curves, release], "curves.png")                   # overlaid, one colour per run

Two log formats are read, told apart by their lines:

- this project's log.txt (``utils.run.RunLog``, lines from ``utils.training``): a training line
  ``epoch 1/15 iter 10/43 (total 10/645) - loss 1.0100 (soft_iou 0.9993, mse 0.10777) - lr 9.874e-04 - ...``
  whose global iteration is the "total" count, and a validation line
  ``validation epoch 1/15 iter 43 - mIoU 0.0006, nIoU ..., Fa 1.23e-6, ... - best mIoU ...`` whose "iter" is
  already the global iteration. A "start:" line begins the run afresh; "resumed after epoch E (iteration G)"
  drops what the log holds past G (the interrupted epoch, trained again after it);
- the authors' release log (``DCONet INFO: Epoch-Iter: [e/E]-[i/I] || Lr: ... || Loss: a=b+c`` and
  ``Data: NAME, mIoU: x/best, F1: y/best``). Its in-epoch counter is the global iteration modulo I (0 on an
  epoch's last iteration); a validation comes after the logged iteration when that is a multiple of the run's
  save_iter_step (read from its Namespace line), else at the end of the epoch.

Loss parts are the same in both: the total, the SoftIoU loss and the unweighted MSE(D, image). Every training run
redraws ``curves.png`` in its folder at each validation (``refresh_run_curves``); ``plot_curves.py`` overlays runs.
"""
from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

LOSS_PARTS = ("loss", "soft_iou", "mse")

_STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
_PROJECT_TRAIN = re.compile(_STAMP + r"epoch (\d+)/\d+ iter (\d+)/(\d+) \(total (\d+)/\d+\) - loss (\S+) "
                            r"\(soft_iou (\S+), mse (\S+)\) - lr (\S+)")
_PROJECT_VAL = re.compile(_STAMP + r"validation epoch \d+/\d+ iter (\d+) - (.*?)(?: - best mIoU .*)?$")
_PROJECT_START = re.compile(_STAMP + r"start: ")
_PROJECT_RESUMED = re.compile(_STAMP + r"resumed after epoch \d+ \(iteration (\d+)\)")

_RELEASE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ INFO: "
_RELEASE_ANY = re.compile(_RELEASE + r"(Epoch-Iter: |Data: |Namespace\()")
_RELEASE_TRAIN = re.compile(_RELEASE + r"Epoch-Iter: \[(\d+)/\d+\]-\[(\d+)/(\d+)\] \|\| Lr: (\S+) \|\| "
                            r"Loss: ([^=\s]+)=([^+\s]+)\+(\S+)")
_RELEASE_VAL = re.compile(_RELEASE + r"Data: [^,]*, (.*?)\s*$")
_RELEASE_SAVE_STEP = re.compile(r"save_iter_step=(\d+)")


class LogFormatError(ValueError):
    """A file that is neither a log.txt of this project nor an authors' release log."""


@dataclass
class RunCurves:
    """One run's curves. ``train``: loss parts ("loss", "soft_iou", "mse") and "lr" at ``train_iter``;
    ``val``: validation scores at ``val_iter`` (this project: mIoU, nIoU, Pd, Fa, Prec, Recall, F1, AUC as
    fractions; the release: mIoU, F1). Iterations are global, counted from 1."""
    label: str
    source: Path
    format: str                                     # "project" or "release"
    iterations_per_epoch: int | None = None
    train_iter: list[int] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (*LOSS_PARTS, "lr")})
    val_iter: list[int] = field(default_factory=list)
    val: dict[str, list[float]] = field(default_factory=dict)

    def best(self, metric: str = "mIoU") -> tuple[int, float] | None:
        """(iteration, value) of the first highest ``metric`` among the validations; None when there is none."""
        values = [(v, -i, i) for i, v in zip(self.val_iter, self.val.get(metric, [])) if not math.isnan(v)]
        if not values:
            return None
        value, _, iteration = max(values)
        return iteration, value


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

def log_file(run_or_log: str | Path) -> Path:
    """The log of a run folder (its log.txt) or the file itself; FileNotFoundError naming what is missing."""
    path = Path(run_or_log)
    if path.is_dir():
        path = path / "log.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {path.parent} is not a run folder with a log")
    elif not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a run folder or a log file)")
    return path


def detect_format(lines: Sequence[str]) -> str | None:
    """"project", "release", or None, by the first line that only one of the formats writes."""
    for line in lines:
        if _RELEASE_ANY.match(line):
            return "release"
        if any(p.match(line) for p in (_PROJECT_TRAIN, _PROJECT_VAL, _PROJECT_START, _PROJECT_RESUMED)):
            return "project"
    return None


def read_curves(run_or_log: str | Path, label: str | None = None) -> RunCurves:
    """The curves of a run folder or log file in either format. ``label`` defaults to the run folder's name
    (for a folder or a file named log.txt), else the file name."""
    path = log_file(run_or_log)
    if label is None:
        label = path.parent.resolve().name if path.name == "log.txt" else path.name
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kind = detect_format(lines)
    if kind is None:
        raise LogFormatError(
            f"{path}: neither a log.txt of this project (lines like '2026-01-01 12:00:00 epoch 1/400 iter 10/100 "
            f"(total 10/40000) - loss ...') nor an authors' release log (lines like '2025-03-06 23:19:28,954 DCONet "
            f"INFO: Epoch-Iter: [1/400]-[10/100] || ...'); give a run folder or one of these logs")
    curves = RunCurves(label=label, source=path, format=kind)
    (_read_project if kind == "project" else _read_release)(lines, curves)
    return curves


def _add_train(curves: RunCurves, iteration: int, loss: str, soft_iou: str, mse: str, lr: str) -> None:
    curves.train_iter.append(iteration)
    for key, value in zip((*LOSS_PARTS, "lr"), (loss, soft_iou, mse, lr)):
        curves.train[key].append(float(value))


def _add_val(curves: RunCurves, iteration: int, scores: dict[str, float]) -> None:
    for key in scores.keys() - curves.val.keys():          # a metric first seen now: NaN for the earlier ones
        curves.val[key] = [math.nan] * len(curves.val_iter)
    curves.val_iter.append(iteration)
    for key, values in curves.val.items():
        values.append(scores.get(key, math.nan))


def _truncate(curves: RunCurves, last: int) -> None:
    """Keep the points up to iteration ``last`` (0: none)."""
    keep = sum(1 for i in curves.train_iter if i <= last)
    del curves.train_iter[keep:]
    for values in curves.train.values():
        del values[keep:]
    keep = sum(1 for i in curves.val_iter if i <= last)
    del curves.val_iter[keep:]
    for values in curves.val.values():
        del values[keep:]


def _read_project(lines: Sequence[str], curves: RunCurves) -> None:
    for line in lines:
        if m := _PROJECT_TRAIN.match(line):
            _, _, per_epoch, total, loss, soft_iou, mse, lr = m.groups()
            curves.iterations_per_epoch = int(per_epoch)
            _add_train(curves, int(total), loss, soft_iou, mse, lr)
        elif m := _PROJECT_VAL.match(line):
            scores = {}
            for part in m.group(2).split(", "):             # "mIoU 0.0006", ..., "Fa 1.23e-6" (a fraction)
                key, _, value = part.partition(" ")
                try:
                    scores[key] = float(value)
                except ValueError:
                    continue
            _add_val(curves, int(m.group(1)), scores)
        elif _PROJECT_START.match(line):                    # a run started (again) in this folder
            _truncate(curves, 0)
            curves.val.clear()
        elif m := _PROJECT_RESUMED.match(line):
            _truncate(curves, int(m.group(1)))


def _read_release(lines: Sequence[str], curves: RunCurves) -> None:
    save_step, last_train, last_val = None, 0, -1
    for line in lines:
        if m := _RELEASE_TRAIN.match(line):
            epoch, in_epoch, per_epoch, lr, loss, soft_iou, mse = m.groups()
            per_epoch = int(per_epoch)
            curves.iterations_per_epoch = per_epoch
            last_train = (int(epoch) - 1) * per_epoch + (int(in_epoch) or per_epoch)
            _add_train(curves, last_train, loss, soft_iou, mse, lr)
        elif m := _RELEASE_VAL.match(line):
            scores = {}
            for key, value in re.findall(r"(\w+): ([^/,\s]+)/", m.group(1)):     # "mIoU: this/best"
                scores[key] = float(value)
            iteration = last_train
            per_epoch = curves.iterations_per_epoch
            mid_epoch = save_step and last_train % save_step == 0 and last_val != last_train
            if per_epoch and not mid_epoch:                 # the validation at the end of the epoch
                iteration = -(-last_train // per_epoch) * per_epoch
            _add_val(curves, iteration, scores)
            last_val = iteration
        elif m := _RELEASE_SAVE_STEP.search(line):
            save_step = int(m.group(1))


# ----------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------

# (key, title, factor on the values, y scale): the training row, then the validation row. Fa spans orders of
# magnitude (an untrained model's is near 1e6 x 1e-6) and may be 0: symmetric log, linear below 1e-6.
_TRAIN_PANELS = (("loss", "training loss (total)", 1, "linear"), ("soft_iou", "SoftIoU loss", 1, "linear"),
                 ("mse", "MSE(D, image), unweighted", 1, "log"), ("lr", "learning rate", 1, "linear"))
_VAL_PANELS = (("mIoU", "validation mIoU", 1, "linear"), ("nIoU", "validation nIoU", 1, "linear"),
               ("F1", "validation F1", 1, "linear"), ("Pd", "validation Pd", 1, "linear"),
               ("Fa", "validation Fa (x 1e-6)", 1e6, "symlog"))


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


def plot_curves(runs: Sequence[RunCurves], out: str | Path, title: str | None = None,
                max_iteration: int | None = None) -> Path:
    """Draw ``runs`` overlaid (loss parts and lr, then validation mIoU, nIoU, F1, Pd, Fa, against the global
    iteration; with ``max_iteration``, the points up to that iteration only) and write a PNG to ``out``
    atomically (a temporary file beside it, then os.replace)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg      # Agg only, no pyplot state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(18, 7.5), dpi=100)
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.92 if title else 0.95, wspace=0.28, hspace=0.22)
    FigureCanvasAgg(figure)
    if max_iteration is not None:
        runs = [_cropped(run, max_iteration) for run in runs]
    axes = figure.subplots(2, 5, sharex=True)
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

    legend = axes[0, 4]
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

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def _cropped(run: RunCurves, last: int) -> RunCurves:
    run = copy.deepcopy(run)
    _truncate(run, last)
    return run


def _finish(ax, title: str, drawn: bool, y_scale: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not in these logs", transform=ax.transAxes, ha="center", va="center", color="0.5")
    elif y_scale == "symlog":
        ax.set_yscale("symlog", linthresh=1)
    else:
        ax.set_yscale(y_scale)


def refresh_run_curves(run_dir: str | Path, note: Callable[[str], None]) -> Path | None:
    """Redraw ``<run_dir>/curves.png`` from the run's own log.txt; a failure is handed to ``note`` (one line)
    and never raised, so that a figure cannot stop training. Returns the figure's path, or None."""
    run_dir = Path(run_dir)
    try:
        return plot_curves([read_curves(run_dir)], run_dir / "curves.png")
    except Exception as error:                              # noqa: BLE001 - any failure to draw is only noted
        note(f"note: {run_dir / 'curves.png'} not drawn ({type(error).__name__}: {error})")
        return None
