"""Average DCONet models parameter by parameter into one checkpoint (a weight-space ensemble).

    python average_weights.py runs/finetune_s1/latest.pkl base.pkl --shares 0.5 0.5 --out averaged.pkl

Meant for models that share their start, above all a fine-tuning run (``run_0.py --init``) and the weights it
started from: the average keeps much of what each gives (docs/training.md, the fourth candidate). Each input is a
checkpoint of this project or an authors' best.pkl, loaded as t_models.py loads it (a latest.pkl of a run with
--ema as its moving average); all must have the same K and width. The shares, one per input, add up to 1.
The result is this project's checkpoint format: it records its inputs and shares, the first input's training
size (the size t_models.py resizes to by default) and the first training settings found. An existing --out is
never replaced without --overwrite. Exit status: 0 when written, 2 on a problem the message names.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import run_script, starting

with starting("average_weights.py", active=__name__ == "__main__"):     # a Ctrl-C while torch loads: one line
    from model import average_models, save_checkpoint


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="two or more checkpoints or best.pkl files")
    parser.add_argument("--shares", nargs="+", type=float, required=True, metavar="W",
                        help="each input's share of the average, one per input in the same order, adding up to 1")
    parser.add_argument("--out", required=True, type=Path, help="the checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_script("average_weights.py", lambda: write_average(args))


def write_average(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out")
    if any(args.out.resolve() == Path(path).resolve() for path in args.inputs):
        raise ValueError(f"--out {args.out} is one of the inputs; write the average to another file")
    model, info = average_models(args.inputs, args.shares)
    save_checkpoint(args.out, model, meta=info["meta"], train_config=info["train_config"])
    parts = " + ".join(f"{item['share']:g} x {item['file']}" for item in info["meta"]["average_of"])
    print(f"wrote {args.out}: {parts} (K = {model.config.stage_num}, width {model.config.channels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
