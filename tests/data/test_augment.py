"""Native-scale training windows: random rescales whose labels keep small targets, windows that hold a target,
reflect padding as the export pads; negative frames, their held-out groups, and their mix with target frames."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.data.augment import draw_scale, native_view, rescale_labels
from utils.data.datasets import SirstDataset
from utils.data.negatives import (MixedDataset, NegativeFrames, find_negatives, frame_group, split_negatives)
from utils.data.splits import DatasetError
from utils.score.components import components


def _labels(shape, targets) -> np.ndarray:
    labels = np.zeros(shape, np.float32)
    for r, c, h, w in targets:
        labels[r:r + h, c:c + w] = 1.0
    return labels


def test_rescaled_labels_keep_every_target_that_a_plain_threshold_would_lose():
    labels = _labels((60, 80), [(11, 11, 1, 2), (31, 41, 2, 1), (40, 60, 6, 6)])    # two tiny targets, one 6x6
    half = rescale_labels(labels, (30, 40))
    area = cv2.resize(labels, (40, 30), interpolation=cv2.INTER_AREA)
    assert components(area >= 0.5).n == 1                     # what thresholding the area average would keep
    assert components(half > 0).n == 3                         # every target still there
    assert set(np.unique(half)) <= {0.0, 1.0}
    big = components(half > 0).area.max()
    assert big == 9                                            # the 6x6 target is 3x3, not swollen
    double = rescale_labels(labels, (120, 160))
    assert components(double > 0).n == 3 and double.sum() == pytest.approx(4 * labels.sum(), rel=0.2)


def test_native_windows_hold_a_target_at_the_drawn_scale_and_reflect_small_frames():
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    labels = _labels(image.shape, [(30, 44, 2, 2)])
    for seed in range(20):
        window, hard = native_view(image, labels, np.random.default_rng(seed), size=32, scale=(0.5, 2.0))
        assert window.shape == hard.shape == (32, 32) and hard.sum() >= 1
    whole, _ = native_view(image[:20, :20], labels[:20, :20], np.random.default_rng(1), size=32)
    assert np.array_equal(whole[:20, :20], image[:20, :20])                   # scale 1: the frame as it is
    assert np.array_equal(whole[20:, :20], image[:20, :20][::-1][1:13])       # reflected below it
    scales = [draw_scale(np.random.default_rng(s), (0.5, 2.0)) for s in range(400)]
    assert 0.5 <= min(scales) and max(scales) <= 2.0
    assert np.mean(np.array(scales) < 1.0) == pytest.approx(0.5, abs=0.08)   # log-uniform: as many below 1 as above


def test_scale_in_native_mode_needs_windows(tmp_path):
    _write_set(tmp_path)
    with pytest.raises(ValueError, match="in native mode needs a crop size"):
        SirstDataset.from_folder(tmp_path, "set", "trainval", base_size=32, scale=(0.5, 2.0), mode="native")


def test_resized_frames_are_zoomed_into_windows_of_the_training_size(tmp_path):
    _write_set(tmp_path)
    plain = SirstDataset.from_folder(tmp_path, "set", "trainval", base_size=32)
    half = SirstDataset.from_folder(tmp_path, "set", "trainval", base_size=32, scale=(0.5, 0.5))
    for i in range(len(plain)):
        frame, labels = plain[i]["image"][0].numpy(), plain[i]["mask"][0].numpy()
        image, mask = half[i]["image"][0].numpy(), half[i]["mask"][0].numpy()
        assert image.shape == mask.shape == (32, 32)
        # the frame at half its size in the corner, reflected into the rest of the window; its target kept
        small = cv2.resize(frame, (16, 16), interpolation=cv2.INTER_AREA)
        assert np.array_equal(image, np.pad(small, ((0, 16), (0, 16)), mode="reflect"))
        assert components(mask[:16, :16] > 0).n == components(labels > 0).n == 1
        assert components(mask > 0).n >= 2                           # the target's reflections are labelled
    zoomed = SirstDataset.from_folder(tmp_path, "set", "trainval", base_size=32, scale=(2.0, 2.0))
    for i in range(len(zoomed)):
        assert zoomed[i]["image"].shape == (1, 32, 32) and zoomed[i]["mask"].sum() >= 4   # a window on the target


def test_resized_negatives_are_zoomed_as_the_target_frames(tmp_path):
    files = find_negatives(_write_negatives(tmp_path / "neg"))
    plain = NegativeFrames(files, mode="paper", base_size=32)
    half = NegativeFrames(files, mode="paper", base_size=32, scale=(0.5, 0.5))
    frame, image = plain[0]["image"][0].numpy(), half[0]["image"][0].numpy()
    assert image.shape == (32, 32) and not half[0]["mask"].any()
    assert np.array_equal(image[:16, :16], cv2.resize(frame, (16, 16), interpolation=cv2.INTER_AREA))
    assert "at scales 0.5-0.5 in windows of 32" in half.describe()
    whole = NegativeFrames(files, mode="paper", base_size=32, scale=(0.5, 0.5), whole=True)
    assert np.array_equal(whole[0]["image"][0].numpy(), frame)      # held-out frames stay whole


def _write_set(root: Path) -> None:
    for i in range(3):
        image = np.full((48, 64), 40, np.uint8)
        image[10 + i:13 + i, 20:23] = 250
        for split in ("trainval", "test"):
            (root / "set" / split / "images").mkdir(parents=True, exist_ok=True)
            (root / "set" / split / "masks").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "set" / split / "images" / f"{i}.png"), image)
            cv2.imwrite(str(root / "set" / split / "masks" / f"{i}.png"), (image > 128).astype(np.uint8) * 255)


def _write_negatives(folder: Path, groups=("S7", "TH", "cam-A"), per_group=3, with_masks=False) -> Path:
    rng = np.random.default_rng(0)
    for group in groups:
        for i in range(per_group):
            name = f"{group}_{i + 1}.png"
            (folder / "trainval" / "images").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "trainval" / "images" / name), rng.integers(0, 255, (40, 56), dtype=np.uint8))
            if with_masks:
                (folder / "trainval" / "masks").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "trainval" / "masks" / name), np.zeros((40, 56), np.uint8))
    return folder


def test_negatives_are_held_out_by_whole_groups(tmp_path):
    assert [frame_group(s) for s in ("S7_12", "20210725-S4-1001", "iraytek-104", "TH0517_3", "0042")] == \
        ["S7", "20210725-S4", "iraytek", "TH0517", "0042"]
    files = find_negatives(_write_negatives(tmp_path / "bg", with_masks=True))
    train, held = split_negatives(files, 0.3, seed=1)
    assert len(train) + len(held) == 9 and len(held) >= 3
    assert not set(train.groups()) & set(held.groups())                     # no group on both sides
    assert split_negatives(files, 0.3, seed=1) == (train, held)               # the seed decides
    again, none = split_negatives(files, 0.0, seed=1)
    assert again == files and len(none) == 0


def test_negatives_with_a_target_in_a_mask_or_no_images_are_refused(tmp_path):
    folder = _write_negatives(tmp_path / "bg", with_masks=True)
    mask = np.zeros((40, 56), np.uint8)
    mask[5, 5] = 255
    cv2.imwrite(str(folder / "trainval" / "masks" / "TH_2.png"), mask)
    with pytest.raises(DatasetError, match=r"TH_2\.png marks a target"):
        find_negatives(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        find_negatives(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such folder"):
        find_negatives(tmp_path / "missing")


def test_epochs_mix_negatives_at_the_stated_rate_and_cycle_through_them(tmp_path):
    _write_set(tmp_path)
    positives = SirstDataset.from_folder(tmp_path, "set", "trainval", mode="native", crop_size=32,
                                         scale=(0.5, 2.0))
    frames = NegativeFrames(find_negatives(_write_negatives(tmp_path / "bg")), mode="native", crop_size=32,
                            scale=(0.5, 2.0), augment=True)
    mixed = MixedDataset(positives, frames, rate=0.5, seed=1)
    assert len(mixed) == 6 and mixed.n_negative == 3
    seen = []
    for epoch in range(3):
        mixed.set_epoch(epoch)
        items = [mixed[i] for i in range(len(mixed))]
        assert all(item["image"].shape == (1, 32, 32) for item in items)
        assert all(item["mask"].sum() > 0 for item in items[:3])               # target windows hold one
        assert all(item["mask"].sum() == 0 for item in items[3:])
        seen += [item["stem"] for item in items[3:]]
    assert sorted(seen) == sorted(p.stem for p in frames.files.paths)      # 9 negatives over 3 epochs: each once
    mixed.set_epoch(1)
    assert torch.equal(mixed[4]["image"], mixed[4]["image"])                 # reproducible draws
    whole = NegativeFrames(frames.files, mode="native", whole=True)
    assert whole[0]["image"].shape == (1, 40, 56)
    resized = NegativeFrames(frames.files, mode="paper", base_size=32)
    assert resized[0]["image"].shape == (1, 32, 32) and resized[0]["mask"].sum() == 0
