"""utils.score.metrics: the paper protocol against the release's printed numbers, the standard protocol on cases
small enough to count by hand, the edge cases (empty masks, empty predictions, all-target images) and bad input."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from skimage import measure

from conftest import release_printed, shared_path
from utils.io.images import read_mask
from utils.score.components import components, match_targets
from utils.score.metrics import Evaluator, resize_pair
from utils.score.protocols import METRIC_KEYS, PRESETS, InvalidPredictionError, MetricConfig
from utils.score.roc import count_at_or_above, roc_thresholds

PAPER, STANDARD = PRESETS["paper"], PRESETS["standard"]
HIGH, LOW = 8.0, -8.0  # logits far from every threshold


def logits_from(predicted: np.ndarray) -> np.ndarray:
    """Logits that every protocol reads as exactly ``predicted`` (HIGH where True, LOW elsewhere)."""
    return np.where(predicted, HIGH, LOW).astype(np.float32)


def blank(size: int = 256) -> np.ndarray:
    return np.zeros((size, size), dtype=bool)


def score(config: MetricConfig, *pairs: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    evaluator = Evaluator(config)
    for logits, mask in pairs:
        evaluator.update(logits, mask)
    return evaluator.compute()


# ----------------------------------------------------------------------------------------------------------
# The paper protocol reproduces the release
# ----------------------------------------------------------------------------------------------------------

def test_paper_preset_reproduces_release_numbers(metric_case):
    case, expected = metric_case
    evaluator = Evaluator(PAPER)
    mats = sorted((case / "mat").glob("*.mat"))
    for mat in mats:
        evaluator.update(scipy.io.loadmat(str(mat))["T"], read_mask(case / "masks" / f"{mat.stem}.png"), mat.stem)
    scores = evaluator.compute()
    assert len(evaluator) == len(mats) == expected.get("images", 12)
    assert set(scores) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert scores[key] == release_printed(expected, key), key


def independent_auc(pairs, dtype, strict: bool) -> float:
    """The paper AUC computed another way (sorted background, skimage target maxima), with the sigmoid in
    ``dtype`` and 'p/max(p) > t' when ``strict``, else '>='."""
    t = roc_thresholds(201)
    side = "right" if strict else "left"       # count of values > t, or >= t, from a sorted array
    detected, false_positives, targets, background = np.zeros(201), np.zeros(201), 0, 0
    for logits, mask in pairs:
        p = (1 / (1 + np.exp(-logits.astype(dtype)))).astype(dtype)
        q = (p / p.max()).astype(np.float64)
        peaks = np.array([r.intensity_max for r in measure.regionprops(measure.label(mask, connectivity=2), q)])
        for values, total in ((np.sort(q[~mask]), false_positives), (np.sort(peaks), detected)):
            total += len(values) - np.searchsorted(values, t, side=side)
        targets, background = targets + len(peaks), background + np.count_nonzero(~mask)
    return float(-np.trapezoid(detected / targets, false_positives / background))


def test_paper_auc_reading_float32_sigmoid_and_at_or_above():
    """Of the plausible readings only a float32 sigmoid with 'p/max(p) >= t' gives the release's AUC to 1e-9 (the
    full-precision case in ../shared: the portable case's 6 printed decimals cannot tell these readings apart)."""
    case = shared_path("reference", "metric_case")
    expected = json.loads((case / "expected_paper_protocol.json").read_text())
    pairs = [resize_pair(scipy.io.loadmat(str(mat))["T"], read_mask(case / "masks" / f"{mat.stem}.png"),
                         PAPER.size, PAPER.mask_rule)[:2]            # 256x256, as the release scores
             for mat in sorted((case / "mat").glob("*.mat"))]
    assert independent_auc(pairs, np.float32, strict=False) == release_printed(expected, "AUC")
    assert independent_auc(pairs, np.float64, strict=False) != release_printed(expected, "AUC")
    assert independent_auc(pairs, np.float32, strict=True) != release_printed(expected, "AUC")


def test_paper_fa_reading_equal_area_quirk_and_2_px():
    """Without the equal-area quirk, or with a 3 px radius, the release's Fa / Pd are not reproduced (the
    full-precision case in ../shared, as above)."""
    case = shared_path("reference", "metric_case")
    expected = json.loads((case / "expected_paper_protocol.json").read_text())
    pairs = [(scipy.io.loadmat(str(mat))["T"], read_mask(case / "masks" / f"{mat.stem}.png") > 0)
             for mat in sorted((case / "mat").glob("*.mat"))]
    no_quirk = score(replace(PAPER, fa_skip_equal_area=False), *pairs)
    wider = score(replace(PAPER, match_radius=3.0), *pairs)
    assert no_quirk["Fa"] != release_printed(expected, "Fa")
    assert wider["Pd"] != release_printed(expected, "Pd")


# ----------------------------------------------------------------------------------------------------------
# Standard protocol, counted by hand
# ----------------------------------------------------------------------------------------------------------

def test_pixel_metrics_by_hand():
    mask1, pred1 = blank(32), blank(32)
    mask1[10:12, 10:12] = True                 # 4 target pixels
    pred1[10:12, 10] = True                    # 2 of them
    pred1[10, 11] = True                       # a third: tp = 3, fn = 1
    pred1[20, 20:22] = True                    # fp = 2
    mask2, pred2 = blank(16), blank(16)
    mask2[5, 5] = pred2[5, 5] = True           # tp = 1
    evaluator = Evaluator(STANDARD)
    evaluator.update(logits_from(pred1), mask1, "a")
    evaluator.update(logits_from(pred2), mask2, "b")
    scores = evaluator.compute()               # TP 4, FP 2, FN 1
    assert scores["mIoU"] == pytest.approx(4 / 7)
    assert scores["nIoU"] == pytest.approx((3 / 6 + 1) / 2)
    assert scores["Prec"] == pytest.approx(4 / 6)
    assert scores["Recall"] == pytest.approx(4 / 5)
    assert scores["F1"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert [r.IoU for r in evaluator.records] == pytest.approx([0.5, 1.0])
    assert [r.name for r in evaluator.records] == ["a", "b"]


def off_centre_case() -> tuple[np.ndarray, np.ndarray]:
    """One 1-pixel target at (100, 100); one predicted 2-pixel component centred 2.5 px to its right."""
    mask, pred = blank(), blank()
    mask[100, 100] = True
    pred[100, 102:104] = True                  # centroid (100, 102.5)
    return logits_from(pred), mask


def test_target_2_5_px_off_centre_counts_under_standard_not_paper():
    standard, paper = score(STANDARD, off_centre_case()), score(PAPER, off_centre_case())
    assert standard["Pd"] == 1.0 and standard["Fa"] == 0.0
    assert paper["Pd"] == 0.0 and paper["Fa"] == pytest.approx(2 / (512 * 512))


def test_match_radius_is_strict():
    target, pred = np.array([[0.0, 0.0]]), np.array([[0.0, 2.0], [0.0, 1.9]])
    assert match_targets(target, pred, radius=2.0).tolist() == [1]   # exactly 2 px is not closer than 2
    assert match_targets(target, pred[:1], radius=2.0).tolist() == [-1]


def test_matching_is_greedy_in_label_order():
    targets = np.array([[10.0, 10.0], [10.0, 11.0]])
    preds = np.array([[10.0, 10.5]])
    assert match_targets(targets, preds, radius=3.0).tolist() == [0, -1]  # one component serves one target


def test_fa_denominators():
    false_alarm = blank(64)
    false_alarm[5, 5:8] = True                 # 3 unmatched pixels, no target
    small = blank(32)
    standard = score(STANDARD, (logits_from(false_alarm), blank(64)), (logits_from(small), small))
    assert standard["Fa"] == pytest.approx(3 / (64 * 64 + 32 * 32))   # all pixels of the images scored
    big = blank()
    big[5, 5:8] = True
    paper = score(PAPER, (logits_from(big), blank()), (logits_from(blank()), blank()))
    assert paper["Fa"] == pytest.approx(3 / (2 * 512 * 512))          # 512*512 per image, though maps are 256x256


def test_paper_fa_skips_unmatched_component_of_a_matched_area():
    mask, pred = blank(), blank()
    mask[50:52, 50:52] = True
    pred[50:52, 50:52] = True                  # matched, area 4
    pred[150:152, 150:152] = True              # unmatched, area 4: not counted by the release
    pred[200, 10:13] = True                    # unmatched, area 3: counted
    paper = score(PAPER, (logits_from(pred), mask))
    no_quirk = score(replace(PAPER, fa_skip_equal_area=False), (logits_from(pred), mask))
    assert paper["Pd"] == no_quirk["Pd"] == 1.0
    assert paper["Fa"] * 512 * 512 == pytest.approx(3)
    assert no_quirk["Fa"] * 512 * 512 == pytest.approx(7)


def test_roc_by_hand():
    mask = blank(4)
    mask[0, 0] = True
    p = np.full((4, 4), 0.01)
    p[0, 0] = 0.8                              # the target
    p[3, 1:4] = 0.6                            # 3 of 15 background pixels
    logits = np.log(p / (1 - p)).astype(np.float32)
    evaluator = Evaluator(replace(STANDARD, roc_levels=3))   # t = 0, 0.5, 1
    evaluator.update(logits, mask)
    roc = evaluator.roc()
    assert roc.thresholds.tolist() == [0.0, 0.5, 1.0]
    assert roc.tpr.tolist() == [1.0, 1.0, 0.0]
    assert roc.fpr == pytest.approx([1.0, 3 / 15, 0.0])
    assert roc.auc == pytest.approx(0.2 * 0.5 + 0.8 * 1.0)
    assert evaluator.compute()["AUC"] == roc.auc


def test_paper_normalises_each_image_by_its_max():
    mask, logits = blank(), np.full((256, 256), -6.0, dtype=np.float32)
    mask[20, 20] = True
    logits[20, 20] = -3.0                      # sigmoid 0.047: below 0.5, but the image's max
    paper, standard = score(PAPER, (logits, mask)), score(STANDARD, (logits, mask))
    assert paper["mIoU"] == 1.0 and paper["Prec"] == 1.0
    assert standard["mIoU"] == 0.0 and standard["Prec"] == 0.0
    assert paper["Pd"] == standard["Pd"] == 0.0   # detection uses T > 0 / sigmoid > 0.5: nothing


# ----------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------

def test_empty_mask_and_empty_prediction():
    scores = score(STANDARD, (logits_from(blank(32)), blank(32)))
    assert scores["mIoU"] == scores["nIoU"] == 0.0          # toolkit rule: iou_if_empty = 0
    assert scores["Fa"] == 0.0 and scores["Prec"] == 0.0
    assert math.isnan(scores["Pd"]) and math.isnan(scores["Recall"]) and math.isnan(scores["AUC"])
    assert score(replace(STANDARD, iou_if_empty=1.0), (logits_from(blank(32)), blank(32)))["nIoU"] == 1.0


def test_empty_mask_with_false_alarm():
    pred = blank(32)
    pred[3:5, 3:5] = True
    evaluator = Evaluator(STANDARD)
    record = evaluator.update(logits_from(pred), blank(32))
    assert (record.IoU, record.targets, record.detected, record.false_alarm_pixels) == (0.0, 0, 0, 4)
    assert evaluator.compute()["Fa"] == pytest.approx(4 / 1024)


def test_empty_prediction():
    mask = blank(32)
    mask[8:10, 8:10] = True
    scores = score(STANDARD, (logits_from(blank(32)), mask))
    assert {k: scores[k] for k in ("mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1")} == dict.fromkeys(
        ("mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1"), 0.0)


def test_all_target_image():
    full = np.ones((32, 32), dtype=bool)
    evaluator = Evaluator(STANDARD)
    record = evaluator.update(logits_from(full), full)
    assert (record.IoU, record.targets, record.detected, record.false_alarm_pixels) == (1.0, 1, 1, 0)
    scores = evaluator.compute()
    assert scores["mIoU"] == scores["Pd"] == scores["Prec"] == scores["Recall"] == scores["F1"] == 1.0
    assert scores["Fa"] == 0.0
    assert math.isnan(scores["AUC"])           # no background pixel: no false-positive rate


def test_images_without_targets_leave_the_paper_roc_only():
    mask, pred = blank(), blank()
    mask[60, 60] = pred[60, 60] = True
    noisy = np.random.default_rng(0).normal(0, 3, (256, 256)).astype(np.float32)  # empty mask, many false alarms
    paper_alone = score(PAPER, (logits_from(pred), mask))
    paper_both = score(PAPER, (logits_from(pred), mask), (noisy, blank()))
    standard_alone = score(STANDARD, (logits_from(pred), mask))
    standard_both = score(STANDARD, (logits_from(pred), mask), (noisy, blank()))
    assert paper_both["AUC"] == paper_alone["AUC"]
    assert standard_both["AUC"] < standard_alone["AUC"]


def test_all_zero_sigmoid_stays_zero_when_normalised():
    logits = np.full((256, 256), -200.0, dtype=np.float32)   # sigmoid is exactly 0 in float32
    mask = blank()
    mask[9, 9] = True
    scores = score(PAPER, (logits, mask))
    assert scores["mIoU"] == 0.0 and scores["Prec"] == 0.0 and scores["Pd"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# Sizes, batches, building blocks, speed
# ----------------------------------------------------------------------------------------------------------

def test_standard_resizes_a_mask_of_another_size_nearest():
    mask, pred = blank(32), blank(32)
    mask[8:10, 8:10] = pred[8:10, 8:10] = True
    evaluator = Evaluator(STANDARD)
    evaluator.update(logits_from(pred), np.kron(mask, np.ones((2, 2), dtype=bool)))   # mask at 64x64
    assert evaluator.resized_masks == 1
    assert evaluator.compute()["mIoU"] == 1.0


def test_paper_resizes_prediction_bilinear_and_mask_nearest_to_256():
    rng = np.random.default_rng(3)
    logits = rng.normal(-2, 2, (512, 512)).astype(np.float32)
    mask = rng.random((512, 512)) > 0.99
    direct = Evaluator(PAPER)
    direct.update(logits, mask)
    resized = Evaluator(PAPER)
    resized.update(cv2.resize(logits, (256, 256), interpolation=cv2.INTER_LINEAR),
                   cv2.resize(mask.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST) > 0)
    assert direct.compute() == resized.compute()
    assert direct.resized_masks == 0


def test_standard_resizes_masks_at_pixel_centres():
    # Shrinking 4x: pixel centres (INTER_NEAREST_EXACT, PIL's NEAREST) sample rows/columns 2, 6, 10, ... (the
    # project's rule at native size); the release's INTER_NEAREST samples 0, 4, 8, ...
    mask = np.zeros((64, 64), dtype=bool)
    mask[10, 14] = True
    prediction = np.full((16, 16), -10.0, dtype=np.float32)
    prediction[2, 3] = 10.0
    evaluator = Evaluator(STANDARD)
    evaluator.update(prediction, mask)
    assert evaluator.compute()["mIoU"] == 1.0 and evaluator.resized_masks == 1


def test_paper_protocol_resizes_a_512_mask_with_inter_nearest():
    """A 3x3 target in a 512x512 mask (IRSTD-1k's size): the release's cv2.INTER_NEAREST keeps source rows and
    columns 0, 2, 4, ... (floor(2 i)), so a target starting at an even index keeps 2x2 = 4 pixels; pixel-centre
    sampling (INTER_NEAREST_EXACT, floor(2 i + 1)) would keep 1 pixel and give other Pd, nIoU and mIoU."""
    mask = np.zeros((512, 512), np.uint8)
    mask[100:103, 200:203] = 255
    kept = np.zeros((256, 256), bool)
    kept[50:52, 100:102] = True                                     # rows 100, 102 and columns 200, 202
    assert np.array_equal(cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST) > 0, kept)
    exact = cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    assert exact.sum() == 1 and exact[50, 100]                       # the other rule: a single pixel

    prediction = logits_from(kept)                                   # a prediction of exactly those 4 pixels
    scores = score(PAPER, (prediction, mask))
    assert scores["mIoU"] == scores["nIoU"] == 1.0 and scores["Pd"] == 1.0 and scores["Fa"] == 0.0
    single = score(PAPER, (logits_from(exact), mask))                # what the other rule would call perfect
    assert single["mIoU"] == pytest.approx(0.25) and single["Pd"] == 1.0


def test_paper_protocol_counts_only_pixels_at_the_mask_maximum():
    """(mask / max(mask)).astype(int64): a pixel below the maximum is background in the paper protocol, and
    target in the standard one (any non-zero pixel)."""
    mask = np.zeros((256, 256), np.uint8)
    mask[40:42, 40:42] = 255
    mask[42, 40:42] = 128                                            # a soft edge
    predicted = mask > 0
    paper, standard = score(PAPER, (logits_from(predicted), mask)), score(STANDARD, (logits_from(predicted), mask))
    assert paper["mIoU"] == pytest.approx(4 / 6) and standard["mIoU"] == 1.0
    empty = score(PAPER, (logits_from(blank()), np.zeros((256, 256), np.uint8)))   # no target, no NaN
    assert empty["Fa"] == 0.0 and math.isnan(empty["Pd"])


def test_update_batch_takes_torch_tensors():
    rng = np.random.default_rng(1)
    logits = rng.normal(-1, 2, (3, 1, 32, 32)).astype(np.float32)
    masks = rng.random((3, 1, 32, 32)) > 0.9
    one_by_one = Evaluator(STANDARD)
    for i in range(3):
        one_by_one.update(logits[i, 0], masks[i, 0], f"n{i}")
    batched = Evaluator(STANDARD)
    batched.update_batch(torch.from_numpy(logits).requires_grad_(), torch.from_numpy(masks), ["n0", "n1", "n2"])
    assert batched.compute() == one_by_one.compute()
    assert batched.records == one_by_one.records


def test_components_match_skimage_regionprops():
    rng = np.random.default_rng(2)
    for _ in range(5):
        binary = cv2.GaussianBlur(rng.random((64, 80)), (0, 0), 1.5) > 0.55
        found = components(binary)
        props = measure.regionprops(measure.label(binary, connectivity=2))
        assert found.n == len(props) > 0
        assert found.area.tolist() == [p.area for p in props]
        assert np.array_equal(found.centroid, np.array([p.centroid for p in props]))


def test_count_at_or_above_is_exact_at_thresholds():
    t = roc_thresholds(201)
    values = np.concatenate([t, np.nextafter(t, -1), np.nextafter(t, 2), t.astype(np.float32),
                             np.random.default_rng(0).random(1000), [-0.5, 1.5]])
    assert count_at_or_above(values, 201).tolist() == [int(np.count_nonzero(values >= x)) for x in t]


def test_nan_or_inf_prediction_names_the_file():
    logits = np.zeros((16, 16), dtype=np.float32)
    logits[3, 3] = np.nan
    with pytest.raises(ValueError, match="scene_007.mat"):
        Evaluator(STANDARD).update(logits, blank(16), name="scene_007.mat")
    logits[3, 3] = np.inf
    with pytest.raises(InvalidPredictionError, match="image 0"):
        Evaluator(PAPER).update(logits, blank(16))


def test_wrong_shape_is_refused():
    with pytest.raises(InvalidPredictionError, match="update_batch"):
        Evaluator(STANDARD).update(np.zeros((1, 16, 16)), blank(16), "x")


def test_config_rejects_unknown_score():
    with pytest.raises(ValueError, match="seg_score"):
        MetricConfig(seg_score="probability")
    with pytest.raises(ValueError, match="mask_rule"):
        MetricConfig(mask_rule="half")


def test_each_protocol_states_the_size_it_scores_at():
    """The standard protocol scores each map at its own size (128x128 for maps exported at the trained size),
    which "native size" misstated."""
    assert STANDARD.describe().startswith("standard: each prediction's own size (its mask brought to it);")
    assert PAPER.describe().startswith("paper: resized to 256x256;")
