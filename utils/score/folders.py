"""Scoring saved predictions against their masks, and the report ``cal_from_mask.py`` writes.

    evaluators = score_folders("results/NUDT-SIRST/mat", "datasets/NUDT-SIRST/test/masks", ("paper", "standard"))
    scores = {name: evaluator.compute() for name, evaluator in evaluators.items()}
    print(format_table(scores))
    write_report(Path("eval/NUDT-SIRST"), evaluators, header="...", table=format_table(scores))

Predictions are .mat files (variable T, logits) or, when a folder holds no .mat, images (sigmoid(T) x 255; or
0/255 masks with ``png_is_binary``); masks are matched to them by file stem. Problems with the folders or
files raise ``UserError`` with a message that names them.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.io

from utils.io.images import ImageReadError, list_images, read_gray, read_mask
from utils.score.metrics import Evaluator
from utils.score.protocols import PRESETS, InvalidPredictionError

PROTOCOLS = ("paper", "standard")
SATURATED_LOGIT = 200.0  # sigmoid of +-200 is exactly 1 or 0 in float32: the logit of a 255 or 0 pixel
MAX_NAMES_LISTED = 20
MASK_MIN_BACKGROUND = 0.9    # the share of 0 pixels a mask with more than two grey levels must have (checked_mask)


class UserError(ValueError):
    """A problem with the folders or files to score; the message names them and says what to do."""


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


def checked_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """``mask`` if it can be a mask, else a UserError naming ``path`` and what it holds. A mask is 0 for
    background and one value for targets; anti-aliased or compressed edges add other values around targets, on a
    background that stays mostly 0. More than two grey levels with less than ``MASK_MIN_BACKGROUND`` of the
    pixels at 0 is an image (the frames of NUAA-SIRST hold 12 to 256 levels and at most 82% zeros; its masks
    two levels)."""
    levels = np.unique(mask)
    background = float(np.count_nonzero(mask == 0)) / max(mask.size, 1)
    if len(levels) > 2 and background < MASK_MIN_BACKGROUND:
        raise UserError(f"{path}: not a mask: it holds {len(levels)} grey levels ({levels.min()} to {levels.max()}) "
                        f"and {background:.0%} of its pixels are 0, where a mask is 0 for background and one value "
                        f"for targets (at least {MASK_MIN_BACKGROUND:.0%} of 0 when its edges add levels). Is "
                        f"{path.parent} a folder of images? Give --mask-dir the folder of masks "
                        f"(<data-root>/NAME/test/masks)")
    return mask


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
    try:
        for stem, pred_path, mask_path in pairs:
            logits, mask = read_prediction(pred_path, png_is_binary), checked_mask(read_mask(mask_path), mask_path)
            for evaluator in evaluators.values():
                evaluator.update(logits, mask, name=stem)
    except (ImageReadError, InvalidPredictionError) as error:
        raise UserError(str(error)) from error
    resized = evaluators["standard"].resized_masks if "standard" in evaluators else 0
    if resized:
        log(f"warning: {resized} mask(s) differ in size from their prediction; the standard protocol resized them "
            f"to the prediction's size (nearest neighbour at pixel centres)")
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


def refuse_inputs(paths: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Stop when a report file would land in an input folder (a roc_*.mat among the predictions would be scored
    next time; a .png among the masks read as one), even with --overwrite."""
    folders = {Path(p).resolve() for p in inputs}
    for path in paths:
        if Path(path).resolve().parent in folders or Path(path).resolve() in folders:
            raise UserError(f"{path} would be written into an input folder ({Path(path).parent}), which is never "
                            f"written, even with --overwrite: pass another --out (or --json)")


def refuse_overwrite(paths: Sequence[Path], overwrite: bool) -> None:
    """Stop before any work when a report file exists already and ``overwrite`` is not set."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise UserError(f"a report exists already ({_name_list(existing)}); pass --overwrite to replace it "
                        f"or --out to write it elsewhere")


CSV_COLUMNS = ("name", "height", "width", "IoU", "targets", "detected", "false_alarm_pixels", "missed_targets_xy",
               "note")


def write_per_image_csv(path: Path, evaluator: Evaluator) -> None:
    """One row per image: its IoU (blank, with a note, for an image with no target and no predicted pixel, whose
    IoU of 0 only counts by convention), targets, detections, false-alarm pixels, the size it was scored at and
    the centroids (x y, pixels) of the targets it missed."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in evaluator.records:
            missed = "; ".join(f"{col:.1f} {row:.1f}" for row, col in record.missed)
            writer.writerow([record.name, *record.size, "" if record.empty else f"{record.IoU:.6f}", record.targets,
                             record.detected, record.false_alarm_pixels, missed,
                             "no target, no prediction" if record.empty else ""])


def write_report(out_dir: Path, evaluators: dict[str, Evaluator], header: str, table: str) -> None:
    """summary.txt, and per protocol: per_image_<name>.csv, roc_<name>.mat and roc_<name>.png (the ROC next to
    Pd against Fa on a log axis)."""
    from utils.score.figures import save_roc_figure   # matplotlib loads only when a report is written

    out_dir.mkdir(parents=True, exist_ok=True)
    rules = "\n".join(f"  {evaluator.config.describe()}" for evaluator in evaluators.values())
    (out_dir / "summary.txt").write_text(f"{header}\n\n{table}\n\nrules:\n{rules}\n")
    for name, evaluator in evaluators.items():
        write_per_image_csv(out_dir / f"per_image_{name}.csv", evaluator)
        roc = evaluator.roc()
        scipy.io.savemat(str(out_dir / f"roc_{name}.mat"),
                         {"thresholds": roc.thresholds, "fpr": roc.fpr, "tpr": roc.tpr, "auc": roc.auc})
        save_roc_figure(out_dir / f"roc_{name}.png", roc, name)


def resolve_folders(dataset: str | None, pred_dir: str | Path | None = None, mask_dir: str | Path | None = None,
                    data_root: str | Path = "datasets", results_root: str | Path = "results") -> tuple[Path, Path, str]:
    """(prediction folder, mask folder, report name) from a data set name and/or explicit folders:
    results/NAME/mat (or img) against datasets/NAME/test/masks unless the folders are given."""
    if dataset is None and (pred_dir is None or mask_dir is None):
        raise UserError("say what to score: --dataset NAME, or both --pred-dir DIR and --mask-dir DIR")
    if pred_dir is not None:
        pred_dir = Path(pred_dir)
    else:
        results = Path(results_root) / dataset
        pred_dir = results / "mat" if (results / "mat").is_dir() else results / "img"
        if not pred_dir.is_dir():
            raise UserError(f"no predictions for {dataset}: neither {results / 'mat'} nor {results / 'img'} "
                            f"exists; run t_models.py --dataset {dataset} first or pass --pred-dir")
    mask_dir = Path(mask_dir) if mask_dir is not None else Path(data_root) / dataset / "test" / "masks"
    return pred_dir, mask_dir, dataset or _report_name(pred_dir)


def _report_name(pred_dir: Path) -> str:
    """results/NAME/mat and results/NAME/img are reported as NAME; any other folder under its own name."""
    resolved = pred_dir.resolve()
    return resolved.parent.name if resolved.name in ("mat", "img") and resolved.parent.name else resolved.name
