"""Score saved predictions against their masks under the paper and/or the standard protocol.

    python cal_from_mask.py --dataset NUDT-SIRST     # results/NUDT-SIRST/mat (or img) vs datasets/NUDT-SIRST/test/masks
    python cal_from_mask.py --pred-dir DIR --mask-dir DIR --protocol both --json scores.json

Predictions are .mat files (variable T, logits) or, when a folder holds no .mat, images (sigmoid(T) x 255;
with --png-is-binary, 0/255 masks); masks are matched to them by file stem. The scores are printed as a table
(the paper protocol also as the release prints them) and written to eval/NAME/ (or --out): summary.txt,
per_image_<protocol>.csv, roc_<protocol>.mat and roc_<protocol>.png. An existing report is never replaced
without --overwrite. Exit status: 0 on success, 2 on a user error (with a message saying what to do).

The paper protocol is the release's scorer: maps resized to 256x256 (bilinear), masks with cv2.INTER_NEAREST,
targets = the pixels at the mask's maximum. The standard protocol is this project's: each map at its own size,
a mask of another size resized at pixel centres, targets = the pixels > 0. Under both an empty mask has no target.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import run_script
from utils.score.folders import (PROTOCOLS, format_table, refuse_inputs, refuse_overwrite, report_files, resolve_folders,
                              score_folders, write_report)
from utils.score.protocols import METRIC_KEYS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="score results/NAME/mat (or img) against <data-root>/NAME/test/masks")
    parser.add_argument("--data-root", default="datasets", help="folder holding the data sets (default: datasets)")
    parser.add_argument("--results-root", default="results", help="folder holding predictions (default: results)")
    parser.add_argument("--pred-dir", help="predictions: .mat (variable T, logits) or images (sigmoid(T) x 255)")
    parser.add_argument("--mask-dir", help="masks, matched to predictions by file stem")
    parser.add_argument("--png-is-binary", action="store_true", help="image predictions are 0/255 masks")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both",
                        help="paper (the release's numbers, quirks included), standard (this project's, as most "
                             "toolkits), or both (default: both)")
    parser.add_argument("--json", help="also write the scores here as {protocol: {metric: fraction}}")
    parser.add_argument("--out", help="report folder (default: eval/NAME, NAME = the data set or the prediction "
                                      "folder's name, results/NAME/mat counting as NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip predictions without a mask and masks without a prediction instead of stopping")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_script("cal_from_mask.py", lambda: score(args))


def score(args: argparse.Namespace) -> int:
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    pred_dir, mask_dir, name = resolve_folders(args.dataset, args.pred_dir, args.mask_dir, args.data_root,
                                               args.results_root)
    out_dir = Path(args.out) if args.out else Path("eval") / name
    outputs = report_files(out_dir, protocols) + ([Path(args.json)] if args.json else [])
    refuse_inputs(outputs, [pred_dir, mask_dir])
    refuse_overwrite(outputs, args.overwrite)
    print(f"scoring {pred_dir} against {mask_dir}, protocol(s): {', '.join(protocols)}")
    evaluators = score_folders(pred_dir, mask_dir, protocols, args.png_is_binary, args.allow_missing)
    scores = {protocol: evaluator.compute() for protocol, evaluator in evaluators.items()}
    header = f"{len(next(iter(evaluators.values())))} images; predictions {pred_dir}; masks {mask_dir}"
    table = format_table(scores)
    print(f"{header}\n{table}")
    write_report(out_dir, evaluators, header, table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        plain = {protocol: {key: None if math.isnan(values[key]) else values[key] for key in METRIC_KEYS}
                 for protocol, values in scores.items()}
        Path(args.json).write_text(json.dumps(plain, indent=1) + "\n")
    print(f"report written to {out_dir}" + (f", scores to {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
