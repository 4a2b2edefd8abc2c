"""Overlay the learning curves of training runs: loss parts and learning rate, then validation mIoU, nIoU, F1,
Pd and Fa, against the global iteration.

    python plot_curves.py Weight/IRSTD-1k --out curves.png
    python plot_curves.py runs/a runs/b ../shared/reference/release_logs/IRSTD-1K_log.txt --out cmp.png \\
        --labels "lr 1e-3" "lr 1e-4" release --max-iteration 5000

Each input is a run folder (its log.txt), a log.txt of this project, or a log the authors published with their
weights; the format is recognised by its lines. Every training run also draws its own curves.png at each
validation. An existing --out is never replaced without --overwrite. Exit status: 0 when the figure was written,
2 on a missing file, a log in neither format or another problem the message names.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import run_script
from utils.train.curves import plot_curves, read_curves


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_LOG", help="run folders or log files, in either format")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per input (default: the run folder's name, "
                                                    "or the log file's name)")
    parser.add_argument("--title", help="a title above the panels")
    parser.add_argument("--max-iteration", type=int, metavar="N",
                        help="draw the points up to iteration N only (to compare a short run with a long one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_script("plot_curves.py", lambda: draw(args))


def draw(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.labels is not None and len(args.labels) != len(args.inputs):
        raise ValueError(f"--labels gives {len(args.labels)} label(s) for {len(args.inputs)} input(s); give "
                         f"one per input, in the same order")
    if args.max_iteration is not None and args.max_iteration < 1:
        raise ValueError(f"--max-iteration {args.max_iteration}: give an iteration of 1 or more")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    runs = [read_curves(path, label) for path, label in zip(args.inputs, args.labels or [None] * len(args.inputs))]
    for run in runs:
        best = run.best("mIoU")
        last = run.train_iter[-1] if run.train_iter else 0
        print(f"{run.label}: {run.format} log {run.source}, {len(run.train_iter)} loss points to iteration {last}, "
              f"{len(run.val_iter)} validation{'s' if len(run.val_iter) != 1 else ''}"
              + (f", best mIoU {best[1]:.4f} at iteration {best[0]}" if best else ""))
    plot_curves(runs, out, title=args.title, max_iteration=args.max_iteration)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
