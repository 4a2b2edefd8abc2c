"""cal_from_mask.py: the reference numbers through the command line, the report it writes, and every user error
(exit status 2 with a message, no traceback)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from scipy import special

from cal_from_mask import main
from conftest import PORTABLE, release_printed, shared_path
from utils.score.folders import CSV_COLUMNS, probability_to_logits, score_folders
from utils.score.protocols import METRIC_KEYS


def write_case(folder: Path, stems=("a", "b"), size: int = 32, mask_size: int | None = None) -> tuple[Path, Path]:
    """pred/<stem>.mat (T: one detected 2x2 target, one 1-pixel false alarm) and masks/<stem>.png (0/255)."""
    pred_dir, mask_dir = folder / "pred", folder / "masks"
    pred_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[10:12, 10:12] = 255
        logits = np.where(mask > 0, 6.0, -6.0).astype(np.float32)
        logits[25, 25] = 6.0
        scipy.io.savemat(str(pred_dir / f"{stem}.mat"), {"T": logits})
        if mask_size is not None:
            mask = cv2.resize(mask, (mask_size, mask_size), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(mask_dir / f"{stem}.png"), mask)
    return pred_dir, mask_dir


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------------------
# Reference numbers and the report
# ----------------------------------------------------------------------------------------------------------

def test_reference_case_through_the_command_line(tmp_path, capsys, metric_case):
    case, expected = metric_case
    out = tmp_path / "report"
    rc, stdout, _ = run(capsys, "--pred-dir", case / "mat", "--mask-dir", case / "masks", "--out", out,
                        "--json", tmp_path / "scores.json")
    assert rc == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert list(scores) == ["paper", "standard"]
    assert list(scores["paper"]) == list(scores["standard"]) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert scores["paper"][key] == release_printed(expected, key), key
    assert "Fa (x1e-6)" in stdout and f"{expected['Fa'] * 1e6:.2f}" in stdout
    for name in ("summary.txt", "per_image_paper.csv", "per_image_standard.csv", "roc_paper.mat",
                 "roc_paper.png", "roc_standard.mat", "roc_standard.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "per_image_paper.csv")))
    assert len(rows) == len(list((case / "mat").glob("*.mat"))) and tuple(rows[0]) == CSV_COLUMNS
    assert {(r["height"], r["width"]) for r in rows} == {("256", "256")}
    assert sum(int(r["detected"]) for r in rows) / sum(int(r["targets"]) for r in rows) == \
        release_printed(expected, "Pd")
    roc = scipy.io.loadmat(str(out / "roc_paper.mat"))
    assert roc["fpr"].size == roc["tpr"].size == roc["thresholds"].size == 201
    assert roc["auc"].item() == release_printed(expected, "AUC")
    figure = cv2.imread(str(out / "roc_paper.png"))
    assert figure is not None and figure.shape[1] > 1.8 * figure.shape[0]      # the ROC next to Pd against Fa


def test_one_protocol_and_dataset_layout(tmp_path, capsys, monkeypatch):
    data, results = tmp_path / "data", tmp_path / "res"
    pred_dir, mask_dir = write_case(tmp_path / "tmp")
    (data / "toy" / "test").mkdir(parents=True)
    (results / "toy").mkdir(parents=True)
    mask_dir.rename(data / "toy" / "test" / "masks")
    pred_dir.rename(results / "toy" / "mat")
    monkeypatch.chdir(tmp_path)                # the default report folder is eval/NAME, relative
    rc, stdout, _ = run(capsys, "--dataset", "toy", "--data-root", data, "--results-root", results,
                        "--protocol", "standard", "--json", "s.json")
    assert rc == 0
    scores = json.loads(Path("s.json").read_text())
    assert list(scores) == ["standard"]
    assert scores["standard"]["Pd"] == 1.0
    assert scores["standard"]["Fa"] == pytest.approx(2 / (2 * 32 * 32))
    assert (tmp_path / "eval" / "toy" / "summary.txt").is_file()
    assert not (tmp_path / "eval" / "toy" / "per_image_paper.csv").exists()


def test_dataset_falls_back_to_image_predictions(tmp_path, capsys):
    data, results = tmp_path / "data", tmp_path / "res"
    (data / "toy" / "test" / "masks").mkdir(parents=True)
    (results / "toy" / "img").mkdir(parents=True)
    mask = np.zeros((256, 256), dtype=np.uint8)   # the paper protocol's size: no resizing
    mask[5:8, 5:8] = 255
    cv2.imwrite(str(data / "toy" / "test" / "masks" / "x.png"), mask)
    probability = np.where(mask > 0, 230, 3).astype(np.uint8)   # sigmoid(T) x 255
    cv2.imwrite(str(results / "toy" / "img" / "x.png"), probability)
    rc, _, _ = run(capsys, "--dataset", "toy", "--data-root", data, "--results-root", results,
                   "--out", tmp_path / "r", "--json", tmp_path / "s.json")
    assert rc == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["standard"]["mIoU"] == scores["paper"]["mIoU"] == 1.0


def test_binary_png_predictions(tmp_path, capsys):
    pred_dir, mask_dir = tmp_path / "pred", tmp_path / "masks"
    pred_dir.mkdir()
    mask_dir.mkdir()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[5:8, 5:8] = 255
    cv2.imwrite(str(mask_dir / "x.png"), mask)
    cv2.imwrite(str(pred_dir / "x.png"), (mask > 0).astype(np.uint8))   # a 0/1 mask as prediction
    args = ("--pred-dir", pred_dir, "--mask-dir", mask_dir, "--protocol", "standard")
    assert run(capsys, *args, "--out", tmp_path / "r1", "--json", tmp_path / "p.json")[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "r2", "--json", tmp_path / "b.json", "--png-is-binary")[0] == 0
    assert json.loads((tmp_path / "p.json").read_text())["standard"]["Pd"] == 0.0   # read as p = 1/255
    assert json.loads((tmp_path / "b.json").read_text())["standard"]["Pd"] == 1.0


def test_png_probabilities_keep_their_thresholds():
    values = np.arange(256, dtype=np.float32) / 255
    logits = probability_to_logits(values)
    assert np.isfinite(logits).all()
    assert ((logits > 0) == (np.arange(256) >= 128)).all()
    p = special.expit(logits)
    assert p[0] == 0.0 and p[255] == 1.0
    assert ((p > 0.5) == (np.arange(256) >= 128)).all()
    assert np.abs(p.astype(np.float64) - values).max() < 1e-6


def test_mask_of_another_size_is_resized_and_reported_once(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path, stems=("a", "b", "c"), mask_size=64)
    rc, stdout, _ = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r",
                        "--json", tmp_path / "s.json", "--protocol", "standard")
    assert rc == 0
    warnings = [line for line in stdout.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "3 mask(s)" in warnings[0]
    assert json.loads((tmp_path / "s.json").read_text())["standard"]["Pd"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# User errors: status 2, a message, no traceback
# ----------------------------------------------------------------------------------------------------------

def test_unmatched_names_are_listed(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path, stems=("a", "b", "c"))
    (mask_dir / "b.png").unlink()
    (pred_dir / "c.mat").unlink()
    write_case(tmp_path / "extra", stems=("z",))
    (tmp_path / "extra" / "masks" / "z.png").rename(mask_dir / "z.png")
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r")
    assert rc == 2
    assert "1 prediction(s) without a mask: b" in err and "2 mask(s) without a prediction: c, z" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
    rc, stdout, _ = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r",
                        "--allow-missing")
    assert rc == 0 and "skipping 3 unmatched file(s)" in stdout
    assert len(list(csv.DictReader(open(tmp_path / "r" / "per_image_standard.csv")))) == 1


def test_missing_folder(tmp_path, capsys):
    rc, _, err = run(capsys, "--pred-dir", tmp_path / "nowhere", "--mask-dir", tmp_path, "--out", tmp_path / "r")
    assert rc == 2 and "nowhere" in err and "does not exist" in err
    rc, _, err = run(capsys, "--dataset", "absent", "--results-root", tmp_path, "--out", tmp_path / "r")
    assert rc == 2 and "no predictions for absent" in err
    rc, _, err = run(capsys, "--out", tmp_path / "r")
    assert rc == 2 and "--dataset" in err


def test_existing_report_is_not_overwritten(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path)
    out = tmp_path / "r"
    assert run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", out)[0] == 0
    (out / "summary.txt").write_text("keep me")
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", out)
    assert rc == 2 and "--overwrite" in err and "summary.txt" in err
    assert (out / "summary.txt").read_text() == "keep me"
    (tmp_path / "s.json").write_text("{}")
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r2",
                     "--json", tmp_path / "s.json")
    assert rc == 2 and "s.json" in err and (tmp_path / "s.json").read_text() == "{}"
    assert run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", out, "--overwrite")[0] == 0
    assert (out / "summary.txt").read_text() != "keep me"


def test_nan_prediction_names_the_file(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path)
    logits = np.zeros((32, 32), dtype=np.float32)
    logits[4, 4] = np.nan
    scipy.io.savemat(str(pred_dir / "b.mat"), {"T": logits})
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r")
    assert rc == 2 and "b.mat" in err and "NaN" in err and "Traceback" not in err


def test_mat_without_T_and_unreadable_mask(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path)
    scipy.io.savemat(str(pred_dir / "a.mat"), {"logits": np.zeros((32, 32))})
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r")
    assert rc == 2 and "a.mat" in err and "no variable T" in err
    write_case(tmp_path)
    (mask_dir / "b.png").write_bytes(b"not a png")
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r")
    assert rc == 2 and "b.png" in err


def test_score_folders_is_importable(tmp_path):
    pred_dir, mask_dir = write_case(tmp_path)
    lines = []
    evaluators = score_folders(pred_dir, mask_dir, ("paper",), log=lines.append)
    assert list(evaluators) == ["paper"] and len(evaluators["paper"]) == 2 and lines == []


def test_per_image_csv_marks_empty_images_and_lists_missed_targets(tmp_path, capsys):
    """An image with no target and no predicted pixel is marked as such (its IoU of 0 is only a convention);
    a missed target's centroid (x y) is listed."""
    pred_dir, mask_dir = write_case(tmp_path, stems=("hit", "empty", "missed"))
    scipy.io.savemat(str(pred_dir / "empty.mat"), {"T": np.full((32, 32), -6.0, np.float32)})
    cv2.imwrite(str(mask_dir / "empty.png"), np.zeros((32, 32), np.uint8))
    scipy.io.savemat(str(pred_dir / "missed.mat"), {"T": np.full((32, 32), -6.0, np.float32)})
    rc, stdout, _ = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "r",
                        "--protocol", "standard")
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "r" / "per_image_standard.csv"))}
    assert rows["empty"]["IoU"] == "" and rows["empty"]["note"] == "no target, no prediction"
    assert rows["missed"]["IoU"] == "0.000000" and rows["missed"]["note"] == ""
    assert rows["missed"]["missed_targets_xy"] == "10.5 10.5" and rows["hit"]["missed_targets_xy"] == ""
    assert (rows["hit"]["height"], rows["hit"]["width"]) == ("32", "32")


def test_a_report_is_never_written_into_an_input_folder(tmp_path, capsys):
    """A report in the predictions' folder would add roc_paper.mat to the maps scored next time."""
    pred_dir, mask_dir = write_case(tmp_path)
    before = sorted(p.name for p in pred_dir.iterdir())
    for out in (pred_dir, mask_dir):
        rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", out, "--overwrite")
        assert rc == 2 and "would be written into an input folder" in err and str(out) in err
    assert sorted(p.name for p in pred_dir.iterdir()) == before


# ----------------------------------------------------------------------------------------------------------
# Masks that are not masks
# ----------------------------------------------------------------------------------------------------------

def test_a_folder_of_images_given_as_masks_is_refused(tmp_path, capsys):
    from utils.data.synthetic_sets import write_dataset
    write_dataset(tmp_path, "tiny", n_trainval=2, n_test=3, size=32, seed=1)
    images = tmp_path / "tiny" / "test" / "images"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for path in sorted(images.iterdir()):
        scipy.io.savemat(str(pred_dir / f"{path.stem}.mat"), {"T": np.full((32, 32), -6.0, np.float32)})
    first = sorted(images.iterdir())[0]
    levels = len(np.unique(cv2.imread(str(first), cv2.IMREAD_UNCHANGED)))
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", images, "--out", tmp_path / "report")
    assert rc == 2 and "Traceback" not in err
    assert f"{first}: not a mask: it holds {levels} grey levels" in err and "--mask-dir" in err, err
    assert not (tmp_path / "report").exists()
    # the real masks of the same frames are scored
    assert run(capsys, "--pred-dir", pred_dir, "--mask-dir", images.parent / "masks", "--out",
               tmp_path / "report")[0] == 0


def test_masks_with_anti_aliased_edges_are_scored_as_before_and_images_are_not(tmp_path, capsys):
    pred_dir, mask_dir = write_case(tmp_path)
    binary = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "binary", "--json",
                 tmp_path / "binary.json")
    for path in mask_dir.iterdir():                        # a ring of 64 and 128 around the 255 target
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        mask[9:13, 9:13] = np.maximum(mask[9:13, 9:13], 64)
        mask[9, 9] = 128
        cv2.imwrite(str(path), mask)
    soft = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "soft", "--json",
               tmp_path / "soft.json")
    assert binary[0] == soft[0] == 0, soft[2]
    paper = [json.loads((tmp_path / f"{name}.json").read_text())["paper"] for name in ("binary", "soft")]
    assert paper[0] == paper[1]        # the paper protocol's targets are the pixels at the mask's maximum
    for path in mask_dir.iterdir():                        # the same masks over a textured background: images
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), np.maximum(mask, np.arange(32, dtype=np.uint8)[None, :] % 7 + 1))
    rc, _, err = run(capsys, "--pred-dir", pred_dir, "--mask-dir", mask_dir, "--out", tmp_path / "image")
    assert rc == 2 and "grey levels" in err and "0% of its pixels are 0" in err, err


def test_every_real_mask_passes_and_every_real_frame_is_refused():
    from utils.io.images import list_images, read_image
    from utils.score.folders import UserError, checked_mask
    for path in list_images(PORTABLE / "metric_case" / "masks"):
        checked_mask(read_image(path), path)
    nuaa = shared_path("data", "NUAA-SIRST")
    for split in ("trainval", "test"):
        for path in list_images(nuaa / split / "masks"):
            checked_mask(read_image(path), path)
        for path in list_images(nuaa / split / "images"):
            with pytest.raises(UserError, match="not a mask"):
                checked_mask(read_image(path), path)


