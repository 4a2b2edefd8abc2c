"""Score saved predictions against their masks under the paper and/or the standard protocol (DCONET.md section 7).

    python cal_from_mask.py --dataset NUDT-SIRST     # results/NUDT-SIRST/mat (or img) vs datasets/NUDT-SIRST/test/masks
    python cal_from_mask.py --pred-dir DIR --mask-dir DIR --protocol both --json scores.json

Predictions are .mat files (variable T, logits) or, when a folder holds no .mat, images (sigmoid(T) x 255;
with --png-is-binary, 0/255 masks); masks are matched to them by file stem. The scores are printed as a table
and written to eval/NAME/ (or --out): summary.txt, per_image_<protocol>.csv, roc_<protocol>.mat and
roc_<protocol>.png. An existing report is never replaced without --overwrite.
Exit status: 0 on success, 2 on a user error (with a message saying what to do).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.io

from utils.imageio import ImageReadError, list_images, read_gray, read_mask
from utils.metrics import METRIC_KEYS, PRESETS, Evaluator, InvalidPredictionError

PROTOCOLS = ("paper", "standard")
SATURATED_LOGIT = 200.0  # sigmoid of +-200 is exactly 1 or 0 in float32: the logit of a 255 or 0 pixel
MAX_NAMES_LISTED = 20


class UserError(Exception):
    """A problem with the command line or the files it names; main() prints it and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------
# Reading and pairing files
# ----------------------------------------------------------------------------------------------------------

def probability_to_logits(p: np.ndarray) -> np.ndarray:
    """Logits T (float32) with sigmoid(T) = p within float32 rounding, so that every threshold means what it
    means on the model's own T; p = 0 and p = 1 become -200 and +200 (finite, with sigmoid exactly 0 and 1)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(p) - np.log1p(-p)
    return np.clip(logits, -SATURATED_LOGIT, SATURATED_LOGIT).astype(np.float32)


def read_prediction(path: Path, png_is_binary: bool = False) -> np.ndarray:
    """The logits (H, W) float32 stored in ``path``: variable T of a .mat file, or an image of sigmoid(T) x 255
    (8-bit; 16-bit images are read as x 65535); with ``png_is_binary`` any non-zero pixel is a target."""
    if path.suffix.lower() == ".mat":
        try:
            content = scipy.io.loadmat(str(path), variable_names=["T"])
        except Exception as error:  # scipy raises several types for a damaged file
            raise UserError(f"{path}: not a readable .mat file ({error}); export the predictions again") from error
        if "T" not in content:
            raise UserError(f"{path}: holds no variable T (the logits); "
                            f"cal_from_mask.py reads the .mat files written by t_models.py")
        logits = np.squeeze(np.asarray(content["T"], dtype=np.float32))
        if logits.ndim != 2:
            raise UserError(f"{path}: T has shape {content['T'].shape}; expected one map (H, W)")
    elif png_is_binary:
        logits = np.where(read_mask(path) > 0, SATURATED_LOGIT, -SATURATED_LOGIT).astype(np.float32)
    else:
        logits = probability_to_logits(read_gray(path))
    if not np.isfinite(logits).all():
        raise UserError(f"{path}: the prediction holds NaN or inf values; export it again from a finite model output")
    return logits


def _by_stem(files: list[Path], what: str) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise UserError(f"two {what} share the name {path.stem!r}: {stems[path.stem].name} and {path.name}; "
                            f"keep one of them")
        stems[path.stem] = path
    return stems


def list_predictions(pred_dir: Path) -> dict[str, Path]:
    """The prediction files of a folder by stem: its .mat files, or its images when it holds no .mat."""
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {pred_dir} does not exist; pass --pred-dir or run t_models.py first")
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and p.suffix.lower() == ".mat") or list_images(pred_dir)
    if not files:
        raise UserError(f"prediction folder {pred_dir} holds no .mat or image files")
    return _by_stem(files, f"predictions in {pred_dir}")


def list_masks(mask_dir: Path) -> dict[str, Path]:
    """The mask images of a folder by stem."""
    if not mask_dir.is_dir():
        raise UserError(f"mask folder {mask_dir} does not exist; pass --mask-dir or check --data-root")
    files = list_images(mask_dir)
    if not files:
        raise UserError(f"mask folder {mask_dir} holds no image files")
    return _by_stem(files, f"masks in {mask_dir}")


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_LISTED])
    return shown + (f" and {len(names) - MAX_NAMES_LISTED} more" if len(names) > MAX_NAMES_LISTED else "")


def pair_files(predictions: dict[str, Path], masks: dict[str, Path], allow_missing: bool = False,
               log: Callable[[str], None] = print) -> list[tuple[str, Path, Path]]:
    """(stem, prediction, mask) for every stem with both, sorted. Unmatched files stop the run with their names,
    or with ``allow_missing`` are skipped and counted."""
    no_mask = sorted(set(predictions) - set(masks))
    no_prediction = sorted(set(masks) - set(predictions))
    if no_mask or no_prediction:
        problems = []
        if no_mask:
            problems.append(f"{len(no_mask)} prediction(s) without a mask: {_name_list(no_mask)}")
        if no_prediction:
            problems.append(f"{len(no_prediction)} mask(s) without a prediction: {_name_list(no_prediction)}")
        if not allow_missing:
            raise UserError("; ".join(problems) + ". Fix the folders or pass --allow-missing to score only the pairs")
        log(f"warning: skipping {len(no_mask) + len(no_prediction)} unmatched file(s): " + "; ".join(problems))
    stems = sorted(set(predictions) & set(masks))
    if not stems:
        raise UserError("no prediction has a mask of the same name; check --pred-dir and --mask-dir")
    return [(stem, predictions[stem], masks[stem]) for stem in stems]


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------

def score_folders(pred_dir: str | Path, mask_dir: str | Path, protocols: Sequence[str] = PROTOCOLS,
                  png_is_binary: bool = False, allow_missing: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Evaluator]:
    """Score every prediction of ``pred_dir`` against the mask of the same stem in ``mask_dir``, each file read
    once and fed to one Evaluator per protocol. Returns {protocol: Evaluator}; raises UserError on bad input."""
    pairs = pair_files(list_predictions(Path(pred_dir)), list_masks(Path(mask_dir)), allow_missing, log)
    evaluators = {name: Evaluator(PRESETS[name]) for name in protocols}
    resized = 0
    try:
        for stem, pred_path, mask_path in pairs:
            logits, mask = read_prediction(pred_path, png_is_binary), read_mask(mask_path)
            resized += logits.shape != mask.shape
            for evaluator in evaluators.values():
                evaluator.update(logits, mask, name=stem)
    except (ImageReadError, InvalidPredictionError) as error:
        raise UserError(str(error)) from error
    if resized:
        log(f"warning: {resized} mask(s) differ in size from their prediction; resized as each protocol says "
            f"(paper: prediction bilinear and mask nearest to 256x256; "
            f"standard: mask nearest to the prediction's size)")
    return evaluators


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """The scores as papers print them: percentages, Fa x 1e6, AUC as a fraction; one column per protocol."""
    rows = [("mIoU (%)", "mIoU", 100), ("nIoU (%)", "nIoU", 100), ("Pd (%)", "Pd", 100), ("Fa (x1e-6)", "Fa", 1e6),
            ("Prec (%)", "Prec", 100), ("Recall (%)", "Recall", 100), ("F1 (%)", "F1", 100), ("AUC", "AUC", 1)]
    lines = [f"{'metric':<12}" + "".join(f"{name:>12}" for name in scores)]
    for label, key, scale in rows:
        lines.append(f"{label:<12}" + "".join(
            f"{values[key] * scale:>12.{4 if key == 'AUC' else 2}f}" for values in scores.values()))
    if "paper" in scores:
        lines.append(release_line(scores["paper"]))
    return "\n".join(lines)


RELEASE_ORDER = ("mIoU", "nIoU", "Prec", "Recall", "F1", "Pd", "Fa", "AUC")


def release_line(values: dict[str, float]) -> str:
    """The paper protocol's scores at the precision the release prints them: fractions to 6 decimals, Fa to 8."""
    return "paper, as the release prints: " + "  ".join(
        f"{key} {values[key]:.{8 if key == 'Fa' else 6}f}" for key in RELEASE_ORDER)


# ----------------------------------------------------------------------------------------------------------
# Writing the report
# ----------------------------------------------------------------------------------------------------------

def report_files(out_dir: Path, protocols: Sequence[str]) -> list[Path]:
    """The files a report in ``out_dir`` consists of."""
    files = [out_dir / "summary.txt"]
    for name in protocols:
        files += [out_dir / f"per_image_{name}.csv", out_dir / f"roc_{name}.mat", out_dir / f"roc_{name}.png"]
    return files


def refuse_overwrite(paths: Sequence[Path], overwrite: bool) -> None:
    """Stop before any work when a report file exists already and ``overwrite`` is not set."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise UserError(f"a report exists already ({_name_list(existing)}); pass --overwrite to replace it "
                        f"or --out to write it elsewhere")


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else value


def write_report(out_dir: Path, evaluators: dict[str, Evaluator], header: str, table: str) -> None:
    """summary.txt, and per protocol: per_image_<name>.csv, roc_<name>.mat, roc_<name>.png."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no global backend

    out_dir.mkdir(parents=True, exist_ok=True)
    rules = "\n".join(f"  {evaluator.config.describe()}" for evaluator in evaluators.values())
    (out_dir / "summary.txt").write_text(f"{header}\n\n{table}\n\nrules:\n{rules}\n")
    for name, evaluator in evaluators.items():
        with open(out_dir / f"per_image_{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "IoU", "targets", "detected", "false_alarm_pixels"])
            for record in evaluator.records:
                writer.writerow([record.name, f"{record.IoU:.6f}", record.targets, record.detected,
                                 record.false_alarm_pixels])
        roc = evaluator.roc()
        scipy.io.savemat(str(out_dir / f"roc_{name}.mat"),
                         {"thresholds": roc.thresholds, "fpr": roc.fpr, "tpr": roc.tpr, "auc": roc.auc})
        figure = Figure(figsize=(5, 4.5))
        axes = figure.subplots()
        axes.plot(roc.fpr, roc.tpr, marker=".", markersize=3)
        axes.set(xlabel="false-positive rate (background pixels)", ylabel="Pd (targets detected)",
                 title=f"ROC, {name} protocol, AUC = {roc.auc:.4f}", xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out_dir / f"roc_{name}.png", dpi=120)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="score results/NAME/mat (or img) against datasets/NAME/test/masks")
    parser.add_argument("--data-root", default="datasets", help="folder holding the data sets (default: datasets)")
    parser.add_argument("--results-root", default="results", help="folder holding predictions (default: results)")
    parser.add_argument("--pred-dir", help="predictions: .mat (variable T, logits) or images (sigmoid(T) x 255)")
    parser.add_argument("--mask-dir", help="masks, matched to predictions by file stem")
    parser.add_argument("--png-is-binary", action="store_true", help="image predictions are 0/255 masks")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both",
                        help="paper (the release's numbers, quirks included), standard, or both (default)")
    parser.add_argument("--json", help="also write the scores here as {protocol: {metric: fraction}}")
    parser.add_argument("--out", help="report folder (default: eval/NAME, NAME = the dataset, or the pred dir's name; NAME for results/NAME/mat)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip predictions without a mask and masks without a prediction instead of stopping")
    return parser.parse_args(argv)


def resolve_folders(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(prediction folder, mask folder, report name) from --dataset and/or --pred-dir / --mask-dir."""
    if args.dataset is None and (args.pred_dir is None or args.mask_dir is None):
        raise UserError("say what to score: --dataset NAME, or both --pred-dir DIR and --mask-dir DIR")
    if args.pred_dir is not None:
        pred_dir = Path(args.pred_dir)
    else:
        results = Path(args.results_root) / args.dataset
        pred_dir = results / "mat" if (results / "mat").is_dir() else results / "img"
        if not pred_dir.is_dir():
            raise UserError(f"no predictions for {args.dataset}: neither {results / 'mat'} nor {results / 'img'} "
                            f"exists; run t_models.py --dataset {args.dataset} first or pass --pred-dir")
    mask_dir = Path(args.mask_dir) if args.mask_dir is not None else (
        Path(args.data_root) / args.dataset / "test" / "masks")
    return pred_dir, mask_dir, args.dataset or _report_name(pred_dir)


def _report_name(pred_dir: Path) -> str:
    """results/NAME/mat and results/NAME/img are reported as NAME; any other folder under its own name."""
    resolved = pred_dir.resolve()
    return resolved.parent.name if resolved.name in ("mat", "img") and resolved.parent.name else resolved.name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    try:
        pred_dir, mask_dir, name = resolve_folders(args)
        out_dir = Path(args.out) if args.out else Path("eval") / name
        refuse_overwrite(report_files(out_dir, protocols) + ([Path(args.json)] if args.json else []), args.overwrite)
        print(f"scoring {pred_dir} against {mask_dir}, protocol(s): {', '.join(protocols)}")
        evaluators = score_folders(pred_dir, mask_dir, protocols, args.png_is_binary, args.allow_missing)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scores = {protocol: evaluator.compute() for protocol, evaluator in evaluators.items()}
    header = f"{len(next(iter(evaluators.values())))} images; predictions {pred_dir}; masks {mask_dir}"
    table = format_table(scores)
    print(f"{header}\n{table}")
    write_report(out_dir, evaluators, header, table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        plain = {protocol: {key: _plain(values[key]) for key in METRIC_KEYS} for protocol, values in scores.items()}
        Path(args.json).write_text(json.dumps(plain, indent=1) + "\n")
    print(f"report written to {out_dir}" + (f", scores to {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
