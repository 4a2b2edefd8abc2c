"""Learning curves of training runs: read from their logs, drawn into one figure.

    curves = read_curves("Weight/IRSTD-1k")                        # a run folder (its log.txt) or a log file
    release = read_curves("../shared/reference/release_logs/IRSTD-1K_log.txt")
    plot_curves([curves, release], "curves.png")                   # overlaid, one colour per run

Two log formats are read, told apart by their lines:

- this project's log.txt (``utils.train.run_dir.RunLog``, lines from ``utils.train.loop``): a training line
  ``epoch 1/15 iter 10/43 (total 10/645) - loss 1.0100 (soft_iou 0.9993, mse 0.10777) - lr 9.874e-04 - ...``
  (``mse 0.10777, bce 0.00123)`` with ``--bce-weight``; the cross-entropy is not drawn: the total holds it)
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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from utils.train.curve_figure import plot_curves

LOSS_PARTS = ("loss", "soft_iou", "mse")

_STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
_PROJECT_TRAIN = re.compile(_STAMP + r"epoch (\d+)/\d+ iter (\d+)/(\d+) \(total (\d+)/\d+\) - loss (\S+) "
                            r"\(soft_iou (\S+), mse ([^\s,)]+)(?:, bce [^\s)]+)?\) - lr (\S+)")
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


def truncate(curves: RunCurves, last: int) -> None:
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
            truncate(curves, 0)
            curves.val.clear()
        elif m := _PROJECT_RESUMED.match(line):
            truncate(curves, int(m.group(1)))


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


def refresh_run_curves(run_dir: str | Path, note: Callable[[str], None]) -> Path | None:
    """Redraw ``<run_dir>/curves.png`` from the run's own log.txt; a failure is handed to ``note`` (one line)
    and never raised, so that a figure cannot stop training. Returns the figure's path, or None."""
    run_dir = Path(run_dir)
    try:
        return plot_curves([read_curves(run_dir)], run_dir / "curves.png")
    except Exception as error:                              # noqa: BLE001 - any failure to draw is only noted
        note(f"note: {run_dir / 'curves.png'} not drawn ({type(error).__name__}: {error})")
        return None
