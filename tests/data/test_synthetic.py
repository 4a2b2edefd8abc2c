"""utils/synthetic.py and utils/synthetic_sets.py: seeded synthetic infrared frames with exact masks, and the demo
data set on disk."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.data import synthetic_sets
from utils.data.datasets import SirstDataset
from utils.io.images import read_gray, read_mask
from utils.data.synthetic import COMPLETE_MARKER, MAX_TARGET_AREA, make_sample, ring_around
from utils.data.synthetic_sets import ensure_demo_dataset, write_dataset


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_sample_other_seed_other_sample():
    image, mask = make_sample(123)
    again_image, again_mask = make_sample(np.random.default_rng(123))
    assert image.tobytes() == again_image.tobytes() and mask.tobytes() == again_mask.tobytes()
    other, _ = make_sample(124)
    assert other.tobytes() != image.tobytes()
    assert image.dtype == np.float32 and image.shape == (256, 256) and mask.dtype == bool
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(np.round(image * 255) / 255, image)  # 8-bit levels: what a PNG holds


@pytest.fixture(scope="module")
def samples():
    return [make_sample([11, i], 128) for i in range(60)]


def test_targets_are_small_separate_and_locally_brighter(samples):
    areas = []
    for index, (image, mask) in enumerate(samples):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        assert count - 1 <= 3, f"sample {index}: {count - 1} targets"
        for k in range(1, count):
            component = labels == k
            areas.append(int(stats[k, cv2.CC_STAT_AREA]))
            ring = ring_around(component)
            contrast = image[component].mean() - image[ring].mean()
            assert contrast > 0, f"sample {index}, target {k}: not brighter than its surroundings ({contrast:.4f})"
            peak = np.unravel_index(np.argmax(np.where(component, image, -1)), image.shape)
            assert component[peak] and image[peak] > np.median(image[ring]), f"sample {index}, target {k}"
    assert min(areas) >= 1 and max(areas) <= MAX_TARGET_AREA
    assert min(areas) <= 3 and max(areas) >= 20, f"target areas should span a range, got {sorted(areas)}"


def test_target_counts_mostly_one_to_three_some_empty(samples):
    counts = [cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1 for _, mask in samples]
    assert counts.count(0) >= 1, "no image without targets"
    assert sum(1 <= c <= 3 for c in counts) >= 0.7 * len(counts)
    assert len(set(counts)) >= 3


def test_clutter_beats_a_global_threshold(samples):
    # the brightest pixels of many images are clutter, not targets: a plain threshold is not enough
    fooled = sum(not mask[np.unravel_index(np.argmax(image), image.shape)] for image, mask in samples if mask.any())
    assert fooled >= 5


def test_write_dataset_layout_roundtrip_and_bytes(tmp_path):
    folder = write_dataset(tmp_path / "a", "demo", n_trainval=5, n_test=3, size=64, seed=4)
    assert folder == tmp_path / "a" / "demo"
    for split, stems in (("trainval", ["00000", "00001", "00002", "00003", "00004"]),
                         ("test", ["00005", "00006", "00007"])):
        for kind in ("images", "masks"):
            assert sorted(p.stem for p in (folder / split / kind).iterdir()) == stems
    image, mask = make_sample([4, 6], 64)
    np.testing.assert_array_equal(read_gray(folder / "test" / "images" / "00006.png"), image)
    np.testing.assert_array_equal(read_mask(folder / "test" / "masks" / "00006.png") > 0, mask)
    assert set(np.unique(cv2.imread(str(folder / "test" / "masks" / "00006.png"), cv2.IMREAD_UNCHANGED))) <= {0, 255}
    assert json.loads((folder / COMPLETE_MARKER).read_text())["seed"] == 4
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo"], "temporary folder left behind"

    same = write_dataset(tmp_path / "b", "demo", n_trainval=5, n_test=3, size=64, seed=4)
    assert _digest(same) == _digest(folder), "same seed should give byte-identical files"
    other = write_dataset(tmp_path / "c", "demo", n_trainval=5, n_test=3, size=64, seed=5)
    assert _digest(other) != _digest(folder)
    assert len(SirstDataset.from_folder(tmp_path / "a", "demo", "trainval", base_size=64)) == 5
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "a", "demo", n_trainval=5, n_test=3, size=64, seed=4)


def test_ensure_demo_dataset_writes_once_then_reuses(tmp_path):
    options = dict(n_trainval=4, n_test=2, size=64)
    folder = ensure_demo_dataset(tmp_path, **options)
    assert folder == tmp_path / "demo"
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    assert ensure_demo_dataset(tmp_path, **options) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == stamps, "a complete set was rewritten"
    bigger = ensure_demo_dataset(tmp_path, n_trainval=6, n_test=2, size=64)  # other parameters: replaced
    assert len(list((bigger / "trainval" / "images").iterdir())) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_interrupted_write_is_not_taken_for_a_complete_set(tmp_path, monkeypatch):
    calls = []

    def failing(rng, size=256):
        calls.append(size)
        if len(calls) > 3:
            raise KeyboardInterrupt("interrupted")
        return make_sample(rng, size)

    monkeypatch.setattr(synthetic_sets, "make_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path, n_trainval=8, n_test=2, size=64)
    assert list(tmp_path.iterdir()) == [], "a partial set was left behind"
    monkeypatch.undo()
    killed = tmp_path / ".demo.tmp-999999999-0000abcd" / "trainval" / "images"  # left by a killed process
    killed.mkdir(parents=True)
    folder = ensure_demo_dataset(tmp_path, n_trainval=8, n_test=2, size=64)
    assert len(list((folder / "trainval" / "masks").iterdir())) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "stale temporary folder not removed"


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "demo" / "trainval").mkdir(parents=True)
    (tmp_path / "demo" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=COMPLETE_MARKER):
        ensure_demo_dataset(tmp_path, n_trainval=2, n_test=1, size=64)
    assert (tmp_path / "demo" / "mine.txt").read_text() == "keep me"
