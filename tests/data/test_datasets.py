"""utils/splits.py and utils/data.py: finding, checking and loading (image, mask) pairs."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import shared_path
from utils.data.datasets import SirstDataset, build_datasets, target_pixels
from utils.data.splits import (DatasetError, DatasetWarning, locate_split, read_split_file, split_train_val,
                          validate_split)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), f"could not write {path}"
    return path


def _square_mask(shape: tuple[int, int], y: int = 5, x: int = 7, side: int = 3) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[y:y + side, x:x + side] = 255
    return mask


def _make_set(root: Path, name: str = "toy", sizes: dict[str, int] | None = None,
              shape: tuple[int, int] = (24, 40), seed: int = 0) -> Path:
    """A small data set in the folder layout: 8-bit gray images, 0/255 masks with one 3x3 target each."""
    rng = np.random.default_rng(seed)
    for split, count in (sizes or {"trainval": 6, "test": 3}).items():
        for i in range(count):
            stem = f"{split}_{i:02d}"
            _write(root / name / split / "images" / f"{stem}.png", rng.integers(0, 200, shape, dtype=np.uint8))
            _write(root / name / split / "masks" / f"{stem}.png", _square_mask(shape, y=2 + i, x=3 + i))
    return root / name


# ---------------------------------------------------------------- image kinds

_RNG = np.random.default_rng(7)
_GRAY8 = _RNG.integers(0, 256, (20, 30), dtype=np.uint8)
_GRAY16 = _RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
_BGR = _RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
_BGRA = np.dstack([_BGR, _RNG.integers(0, 256, (20, 30), dtype=np.uint8)])
_SMOOTH = cv2.GaussianBlur(_GRAY8, (0, 0), 3)  # JPEG keeps smooth content close to the original

RELEASE_READ = None  # expected gray: what the release's cv2.imread(path, 0) reads from the file, / 255

KINDS = {  # name: (suffix, array written, expected gray in [0, 1], tolerance)
    "gray8_png": (".png", _GRAY8, _GRAY8 / 255.0, 0.0),
    "gray16_png": (".png", _GRAY16, _GRAY16 / 65535.0, 1e-6),        # 16 bits kept (the release cuts to 8)
    "rgb_png": (".png", _BGR, RELEASE_READ, 0.0),
    "rgba_png": (".png", _BGRA, RELEASE_READ, 0.0),
    "bmp": (".bmp", _BGR, RELEASE_READ, 0.0),
    "jpg": (".jpg", _SMOOTH, _SMOOTH / 255.0, 6 / 255),
    "tiff16": (".tif", _GRAY16, _GRAY16 / 65535.0, 1e-6),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_image_kind_reads_as_one_gray_channel(tmp_path, kind):
    suffix, array, expected, tolerance = KINDS[kind]
    path = _write(tmp_path / "set" / "test" / "images" / f"a{suffix}", array)
    _write(tmp_path / "set" / "test" / "masks" / "a.png", _square_mask(array.shape[:2]))  # other suffix: fine
    if expected is RELEASE_READ:
        expected = cv2.imread(str(path), 0) / 255.0
        luma = cv2.cvtColor(array[..., :3], cv2.COLOR_BGR2GRAY) / 255.0
        assert np.abs(expected - luma).max() <= 1 / 255 + 1e-9          # the decoder's own colour conversion
    item = SirstDataset.from_folder(tmp_path, "set", "test", mode="native")[0]
    assert item["image"].shape == (1, 20, 30) and item["image"].dtype == torch.float32
    assert item["stem"] == "a" and item["size"].tolist() == [20, 30]
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=tolerance + 1e-7)


def test_labels_are_mask_over_its_maximum_and_empty_masks_are_valid(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[2, 3], mask[4, 5], mask[6, 7] = 51, 102, 204
    _write(tmp_path / "set" / "test" / "images" / "full.png", np.full((16, 16), 90, np.uint8))
    _write(tmp_path / "set" / "test" / "masks" / "full.bmp", mask)
    _write(tmp_path / "set" / "test" / "images" / "none.png", np.full((16, 16), 90, np.uint8))
    _write(tmp_path / "set" / "test" / "masks" / "none.png", np.zeros((16, 16), np.uint8))
    data = SirstDataset.from_folder(tmp_path, "set", "test", mode="native")
    full, none = data[0], data[1]
    assert full["mask"].dtype == torch.float32
    assert torch.nonzero(full["mask"][0]).tolist() == [[2, 3], [4, 5], [6, 7]]
    assert full["mask"][0, [2, 4, 6], [3, 5, 7]].tolist() == pytest.approx([0.25, 0.5, 1.0])   # soft, as the release
    assert torch.nonzero(target_pixels(full["mask"][0])).tolist() == [[6, 7]]               # its validation labels
    assert none["stem"] == "none" and none["mask"].sum() == 0


def test_paper_mode_resizes_to_base_size(tmp_path):
    _write(tmp_path / "set" / "test" / "images" / "wide.png", np.full((30, 70), 100, np.uint8))
    _write(tmp_path / "set" / "test" / "masks" / "wide.png", _square_mask((30, 70), 10, 30, 10))
    _write(tmp_path / "set" / "test" / "images" / "tall.png", np.full((90, 20), 200, np.uint8))
    _write(tmp_path / "set" / "test" / "masks" / "tall.png", _square_mask((90, 20)))
    for base in (256, 64):
        data = SirstDataset.from_folder(tmp_path, "set", "test", base_size=base)
        for item in data:
            assert item["image"].shape == item["mask"].shape == (1, base, base)
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
            assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert data[1]["size"].tolist() == [30, 70]  # sorted by stem: tall, wide
    # the release's INTER_NEAREST: output pixel i reads input floor(i * in / out)
    rows, cols = (np.arange(64) * 30 / 64).astype(int), (np.arange(64) * 70 / 64).astype(int)
    expected = _square_mask((30, 70), 10, 30, 10)[rows][:, cols] > 0
    np.testing.assert_array_equal(data[1]["mask"][0].numpy(), expected)


def test_paper_mode_is_the_release_geometry_on_8_bit_images(tmp_path):
    """The 8-bit image is resized as 8 bits (INTER_LINEAR), then / 255; resizing the float image instead
    differs by up to 0.5 / 255. The mask is resized with INTER_NEAREST, then divided by its maximum."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    mask = np.zeros((37, 53), np.uint8)
    mask[11:14, 20:23] = 200
    _write(tmp_path / "set" / "trainval" / "images" / "a.png", image)
    _write(tmp_path / "set" / "trainval" / "masks" / "a.png", mask)
    item = SirstDataset.from_folder(tmp_path, "set", "trainval", base_size=32)[0]
    release = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR) / 255.0
    np.testing.assert_allclose(item["image"][0].numpy(), release, atol=1e-7)
    from_float = cv2.resize(image.astype(np.float32) / 255, (32, 32), interpolation=cv2.INTER_LINEAR)
    assert np.abs(from_float - release).max() > 0.2 / 255              # the rule this test tells apart
    labels = cv2.resize(mask, (32, 32), interpolation=cv2.INTER_NEAREST) / 200.0
    np.testing.assert_array_equal(item["mask"][0].numpy(), labels.astype(np.float32))


def test_cached_and_uncached_items_are_identical(tmp_path):
    _make_set(tmp_path)
    kwargs = dict(base_size=32, augment=True, crop_size=20, seed=3)
    cached = SirstDataset.from_folder(tmp_path, "toy", "trainval", cache=True, **kwargs)
    plain = SirstDataset.from_folder(tmp_path, "toy", "trainval", cache=False, **kwargs)
    for i in range(len(plain)):
        assert torch.equal(cached[i]["image"], plain[i]["image"]) and torch.equal(cached[i]["mask"], plain[i]["mask"])


# ---------------------------------------------------------------- bad data: one error naming every file

def test_all_problems_of_a_split_are_reported_together(tmp_path):
    base = _make_set(tmp_path, sizes={"test": 4})
    (base / "test" / "masks" / "test_00.png").unlink()                                  # image without mask
    _write(base / "test" / "masks" / "orphan.png", _square_mask((24, 40)))               # mask without image
    data = (base / "test" / "images" / "test_01.png").read_bytes()
    (base / "test" / "images" / "test_01.png").write_bytes(data[: len(data) // 2])       # truncated image
    (base / "test" / "masks" / "test_02.png").write_bytes(b"not an image at all")        # unreadable mask
    _write(base / "test" / "masks" / "test_03.png", _square_mask((40, 40)))              # size mismatch
    with pytest.raises(DatasetError) as caught:
        SirstDataset.from_folder(tmp_path, "toy", "test")
    message = str(caught.value)
    for name in ("test_00.png", "orphan.png", "test_01.png", "test_02.png", "test_03.png"):
        assert name in message, f"{name} missing from:\n{message}"
    assert "5 problem(s)" in message


@pytest.mark.parametrize("missing", ["dataset", "split", "images", "masks"])
def test_missing_folders_are_named(tmp_path, missing):
    base = _make_set(tmp_path, sizes={"trainval": 2})
    target = {"dataset": base, "split": base / "trainval", "images": base / "trainval" / "images",
              "masks": base / "trainval" / "masks"}[missing]
    shutil.rmtree(target)
    with pytest.raises(DatasetError, match="missing folder") as caught:
        SirstDataset.from_folder(tmp_path, "toy", "trainval")
    assert str(target) in str(caught.value)


def test_empty_folder_is_reported(tmp_path):
    base = _make_set(tmp_path, sizes={"test": 2})
    for path in (base / "test" / "masks").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="empty folder") as caught:
        SirstDataset.from_folder(tmp_path, "toy", "test")
    assert str(base / "test" / "masks") in str(caught.value)


def test_missing_dataset_fails_once_before_anything_is_built(tmp_path):
    _make_set(tmp_path, name="other")
    with pytest.raises(DatasetError) as caught:
        build_datasets(tmp_path, "NUDT-SIRST")
    message = str(caught.value)
    assert "NUDT-SIRST" in message and "other" in message and message.count("missing folder") == 1


def _mismatched_set(root: Path) -> Path:
    base = _make_set(root, sizes={"test": 2}, shape=(20, 30))
    _write(base / "test" / "masks" / "test_01.png", _square_mask((40, 60), 10, 14, 6))  # a 2x scaled copy
    return base


def test_scaled_mask_native_mode_needs_explicit_opt_in(tmp_path):
    _mismatched_set(tmp_path)
    with pytest.raises(DatasetError, match="allow_mask_resize=True") as caught:
        SirstDataset.from_folder(tmp_path, "toy", "test", mode="native")
    assert "test_01.png" in str(caught.value) and "20x30" in str(caught.value) and "40x60" in str(caught.value)
    with pytest.warns(DatasetWarning, match="test_01.png"):
        data = SirstDataset.from_folder(tmp_path, "toy", "test", mode="native", allow_mask_resize=True)
    item = data[1]
    assert item["mask"].shape == (1, 20, 30)
    assert torch.nonzero(item["mask"][0]).tolist() == [[y, x] for y in range(5, 8) for x in range(7, 10)]
    assert len(data.notes) == 1


def test_scaled_mask_paper_mode_is_tolerated_with_a_warning_unless_refused(tmp_path):
    _mismatched_set(tmp_path)
    with pytest.warns(DatasetWarning, match="test_01.png"):
        item = SirstDataset.from_folder(tmp_path, "toy", "test", base_size=60)[1]
    assert item["mask"].shape == (1, 60, 60) and item["mask"].sum() > 0
    with pytest.raises(DatasetError, match="test_01.png"):
        SirstDataset.from_folder(tmp_path, "toy", "test", allow_mask_resize=False)


def test_mask_of_another_aspect_ratio_is_always_rejected(tmp_path):
    base = _make_set(tmp_path, sizes={"test": 1}, shape=(20, 30))
    _write(base / "test" / "masks" / "test_00.png", _square_mask((30, 30)))
    with pytest.raises(DatasetError, match="aspect ratio"):
        SirstDataset.from_folder(tmp_path, "toy", "test", mode="native", allow_mask_resize=True)


def test_validate_split_without_reading_checks_pairing_only(tmp_path):
    base = _make_set(tmp_path, sizes={"test": 2})
    (base / "test" / "images" / "test_00.png").write_bytes(b"broken")
    notes, kept = validate_split(locate_split(tmp_path, "toy", "test"), read=False)
    assert notes == [] and kept is None
    with pytest.raises(DatasetError, match="test_00.png"):
        validate_split(locate_split(tmp_path, "toy", "test"))
    data = SirstDataset.from_folder(tmp_path, "toy", "test", validate=False)
    with pytest.raises(DatasetError, match="test_00.png"):
        data[0]


# ---------------------------------------------------------------- split files

def _flat_set(root: Path, stems: list[str]) -> Path:
    base = root / "flat"
    for i, stem in enumerate(stems):
        _write(base / "images" / f"{stem}.png", np.full((16, 16), 10 * i, np.uint8))
        _write(base / "masks" / f"{stem}.bmp", _square_mask((16, 16)))
    return base


def test_split_files_select_stems_from_flat_folders(tmp_path):
    base = _flat_set(tmp_path, ["a", "b", "c", "d"])
    (base / "trainval.txt").write_text("a\nb.png\n\n# comment\nc  \n")
    (base / "test.txt").write_text("d\n")
    assert read_split_file(base / "trainval.txt") == ["a", "b", "c"]
    assert SirstDataset.from_folder(tmp_path, "flat", "trainval").stems == ["a", "b", "c"]
    assert SirstDataset.from_folder(tmp_path, "flat", "test").stems == ["d"]
    explicit = tmp_path / "elsewhere.txt"
    explicit.write_text("d\nb\n")
    assert SirstDataset.from_folder(tmp_path, "flat", "any", split_file=explicit).stems == ["b", "d"]


def test_split_file_naming_a_missing_image_is_an_error(tmp_path):
    base = _flat_set(tmp_path, ["a", "b"])
    (base / "test.txt").write_text("a\nzz_missing\na\n")
    with pytest.raises(DatasetError) as caught:
        SirstDataset.from_folder(tmp_path, "flat", "test")
    assert "zz_missing" in str(caught.value) and "listed twice" in str(caught.value)


def test_mask_suffix_matches_original_sirst_names(tmp_path):
    _write(tmp_path / "s" / "test" / "images" / "Misc_1.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "s" / "test" / "masks" / "Misc_1_pixels0.png", _square_mask((8, 8), 1, 1, 2))
    data = SirstDataset.from_folder(tmp_path, "s", "test", mask_suffix="_pixels0", mode="native")
    assert data.stems == ["Misc_1"] and data[0]["mask"].sum() == 4


# ---------------------------------------------------------------- val split, augmentation, build_datasets

def test_val_split_is_deterministic_disjoint_and_complete(tmp_path):
    _make_set(tmp_path, sizes={"trainval": 20})
    files = locate_split(tmp_path, "toy", "trainval")
    train, val = split_train_val(files, 0.25, seed=1)
    again_train, again_val = split_train_val(files, 0.25, seed=1)
    assert (train.stems, val.stems) == (again_train.stems, again_val.stems)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train.stems + val.stems) == files.stems
    assert split_train_val(files, 0.25, seed=2)[1].stems != val.stems
    shuffled = locate_split(tmp_path, "toy", "trainval")
    shuffled.pairs.reverse()  # the listing order does not matter
    assert split_train_val(shuffled, 0.25, seed=1)[1].stems == val.stems
    with pytest.raises(ValueError):
        split_train_val(files, 1.0)


def _pattern_set(root: Path) -> None:
    """Asymmetric images whose mask is exactly (image > 0.5), so image and mask transforms can be compared."""
    for i in range(4):
        image = np.zeros((32, 32), np.uint8)
        image[3 + i:9 + i, 20:23] = 255
        image[25, 2 + i] = 255
        image[10:12, 5:9] = 100
        _write(root / "aug" / "trainval" / "images" / f"{i}.png", image)
        _write(root / "aug" / "trainval" / "masks" / f"{i}.png", (image > 128).astype(np.uint8) * 255)


def test_augmentation_is_reproducible_and_keeps_image_and_mask_aligned(tmp_path):
    _pattern_set(tmp_path)
    make = lambda seed: SirstDataset.from_folder(tmp_path, "aug", "trainval", base_size=32, augment=True, seed=seed)
    first, second = make(5), make(5)
    seen = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for i in range(len(first)):
            a, b = first[i], second[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert torch.equal(a["mask"], (a["image"] > 0.5).float()), "mask not transformed like its image"
            seen.add(a["image"].numpy().tobytes())
    assert len(seen) > 8, "augmentation draws do not change across epochs"
    other = make(6)
    assert any(not torch.equal(other[i]["image"], first[i]["image"]) for i in range(len(first)))
    plain = SirstDataset.from_folder(tmp_path, "aug", "trainval", base_size=32)
    again = SirstDataset.from_folder(tmp_path, "aug", "trainval", base_size=32)
    assert torch.equal(plain[0]["image"], again[0]["image"])


def test_random_crop_pads_small_images_and_keeps_alignment(tmp_path):
    _pattern_set(tmp_path)
    data = SirstDataset.from_folder(tmp_path, "aug", "trainval", mode="native", crop_size=48, augment=True)
    item = data[0]
    assert item["image"].shape == item["mask"].shape == (1, 48, 48)
    assert torch.equal(item["mask"], (item["image"] > 0.5).float())
    plain = SirstDataset.from_folder(tmp_path, "aug", "trainval", mode="native", crop_size=48)[0]
    whole = SirstDataset.from_folder(tmp_path, "aug", "trainval", mode="native")[0]
    assert torch.equal(plain["image"][:, :32, :32], whole["image"])       # the frame whole, at the top left
    assert torch.equal(plain["image"][:, 32:, :32], whole["image"].flip(1)[:, 1:17])  # reflected below, as export pads
    small = SirstDataset.from_folder(tmp_path, "aug", "trainval", base_size=32, crop_size=16, seed=2)
    crops = {small[i]["image"].shape for i in range(len(small))}
    assert crops == {(1, 16, 16)}


def test_build_datasets_with_val_split_and_dataloader(tmp_path):
    _make_set(tmp_path, name="sirst_aug", sizes={"trainval": 10, "test": 4})
    splits = build_datasets(tmp_path, "sirst_aug", base_size=32, val_split=0.2, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert splits.train.augment and not splits.val.augment  # the release's default: augment sirst_aug only
    assert set(splits.train.stems).isdisjoint(splits.val.stems)
    batch = next(iter(DataLoader(splits.train, batch_size=4, shuffle=False)))
    assert batch["image"].shape == batch["mask"].shape == (4, 1, 32, 32) and len(batch["stem"]) == 4
    plain = build_datasets(tmp_path, "sirst_aug", base_size=32, augment=False)
    assert plain.val is plain.test and len(plain.train) == 10 and not plain.train.augment


def test_build_datasets_gathers_problems_of_both_splits(tmp_path):
    base = _make_set(tmp_path, sizes={"trainval": 3, "test": 2})
    (base / "trainval" / "masks" / "trainval_01.png").unlink()
    (base / "test" / "images" / "test_01.png").write_bytes(b"")
    with pytest.raises(DatasetError) as caught:
        build_datasets(tmp_path, "toy", base_size=32)
    assert "trainval_01.png" in str(caught.value) and "test_01.png" in str(caught.value)


def test_build_datasets_writes_the_demo_set_once_and_keeps_an_existing_one(tmp_path, monkeypatch):
    from utils.data import synthetic_sets
    written = []

    def small_demo(root):
        written.append(root)
        return synthetic_sets.write_dataset(root, "demo", n_trainval=4, n_test=2, size=64)

    monkeypatch.setattr(synthetic_sets, "ensure_demo_dataset", small_demo)
    first = build_datasets(tmp_path, "demo", base_size=64)
    assert written == [tmp_path] and (len(first.train), len(first.test)) == (4, 2)
    build_datasets(tmp_path, "demo", base_size=64)
    assert written == [tmp_path], "an existing demo set was written again"


# ---------------------------------------------------------------- real data

def test_nuaa_sirst_test_split_reads_including_misc_111():
    root = shared_path("data", "NUAA-SIRST").parent
    with pytest.warns(DatasetWarning, match="Misc_111"):
        paper = SirstDataset.from_folder(root, "NUAA-SIRST", "test")
    assert len(paper) == 86 and "Misc_111" in paper.stems
    for stem in ("Misc_111", paper.stems[0], paper.stems[-1]):
        item = paper[paper.stems.index(stem)]
        assert item["image"].shape == item["mask"].shape == (1, 256, 256)
        assert item["mask"].sum() > 0, f"{stem}: a NUAA-SIRST test image has at least one target"
    with pytest.raises(DatasetError, match="Misc_111"):
        SirstDataset.from_folder(root, "NUAA-SIRST", "test", mode="native")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        native = SirstDataset.from_folder(root, "NUAA-SIRST", "test", mode="native", allow_mask_resize=True)
    item = native[native.stems.index("Misc_111")]
    assert item["image"].shape == item["mask"].shape == (1, 220, 325) and item["size"].tolist() == [220, 325]
    assert item["mask"].sum() > 0


def test_centre_resampling_keeps_small_targets_aligned_with_the_image(tmp_path):
    """mask_resampling="centres" (this project's option) samples masks at pixel centres; "release" is
    cv2.INTER_NEAREST (floor(i * in / out)). Shrinking 4x: rows/columns 2, 6, 10, ... against 0, 4, 8, ..."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10, 14] = 255                                        # kept by centres (row 10 = 2 + 4 * 2)
    mask[0, 0] = 255                                          # kept by release only
    _write(tmp_path / "set" / "test" / "images" / "a.png", np.full((64, 64), 50, np.uint8))
    _write(tmp_path / "set" / "test" / "masks" / "a.png", mask)
    centres = SirstDataset.from_folder(tmp_path, "set", "test", base_size=16, mask_resampling="centres")[0]
    release = SirstDataset.from_folder(tmp_path, "set", "test", base_size=16)[0]
    assert torch.nonzero(centres["mask"][0]).tolist() == [[2, 3]]
    assert torch.nonzero(release["mask"][0]).tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="mask_resampling"):
        SirstDataset.from_folder(tmp_path, "set", "test", mask_resampling="linear")
