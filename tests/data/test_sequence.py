"""utils/synthetic.py sequences: a fixed background, fresh noise per frame, targets moving in straight lines."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from utils.io.images import read_gray, read_mask, to_unit
from utils.score.components import components
from utils.data.synthetic import MAX_TARGET_AREA, PATCH_RADIUS, ring_around
from utils.data.synthetic_sequence import make_sequence, write_sequence
from utils.io.video import FrameSource


@pytest.fixture(scope="module")
def sequence():
    return make_sequence(5, n_frames=12, size=96, targets=3)


def test_same_seed_same_sequence(sequence):
    again = make_sequence(5, n_frames=12, size=96, targets=3)
    other = make_sequence(6, n_frames=12, size=96, targets=3)
    for t in (0, 7, 11):
        assert sequence.frame(t)[0].tobytes() == again.frame(t)[0].tobytes()
        assert sequence.frame(t)[0].tobytes() != other.frame(t)[0].tobytes()
    image, truth = sequence.frame(3)
    assert image.dtype == np.float32 and image.shape == (96, 96) and len(sequence) == 12
    np.testing.assert_array_equal(np.round(image * 255) / 255, image)   # 8-bit levels
    with pytest.raises(IndexError):
        sequence.frame(12)


def test_background_is_fixed_and_noise_is_fresh(sequence):
    (first, truth_first), (last, truth_last) = sequence.frame(0), sequence.frame(11)
    far = np.ones(first.shape, bool)
    for truth in (truth_first, truth_last):
        for x, y in truth.centroids:                                      # leave out the targets' patches
            r = PATCH_RADIUS + 1
            far[max(int(y) - r, 0):int(y) + r + 2, max(int(x) - r, 0):int(x) + r + 2] = False
    difference = (last - first)[far]
    assert sequence.noise_sigma > 0
    assert difference.std() == pytest.approx(np.sqrt(2) * sequence.noise_sigma, rel=0.15), "noise in every frame"
    assert abs(difference.mean()) < 0.2 * sequence.noise_sigma, "the background stays where it is"

    quiet = make_sequence(5, n_frames=12, size=96, targets=3, noise_sigma=0.0)
    np.testing.assert_array_equal(quiet.background, sequence.background)
    a, b = quiet.frame(0)[0], quiet.frame(11)[0]
    np.testing.assert_array_equal(a[far], b[far])
    assert np.abs(a[far] - quiet.background[far]).max() <= 0.5 / 255 + 1e-6, "without noise: quantisation only"


def test_targets_move_in_straight_lines_as_one_component_each(sequence):
    assert [t.id for t in sequence.tracks] == [1, 2, 3]
    speeds = [np.hypot(t.vx, t.vy) for t in sequence.tracks]
    assert all(0.2 <= s <= 1.0 for s in speeds), speeds
    for t in range(len(sequence)):
        image, truth = sequence.frame(t)
        assert truth.time == pytest.approx(t / 25.0) and truth.index == t
        np.testing.assert_array_equal(truth.ids, [1, 2, 3])
        for track, (x, y) in zip(sequence.tracks, truth.centroids):
            assert (x, y) == pytest.approx((track.x + track.vx * t, track.y + track.vy * t))
        found = components(truth.mask)
        assert found.n == 3, f"frame {t}: {found.n} mask components for 3 targets"
        for target_id, (x, y) in zip(truth.ids, truth.centroids):
            target = truth.labels == target_id
            assert 1 <= target.sum() <= MAX_TARGET_AREA
            rows, cols = np.nonzero(target)
            assert np.hypot(cols.mean() - x, rows.mean() - y) < 1.0, "the mask is centred on the target"
            assert image[target].mean() > image[ring_around(target)].mean(), "every target is locally brighter"


def test_long_fast_sequence_in_a_small_frame_is_refused():
    with pytest.raises(ValueError, match="larger frames"):
        make_sequence(0, n_frames=200, size=64, targets=3, speed=(1.0, 1.0))


def test_write_sequence_video_frames_masks_truth(tmp_path):
    sequence = make_sequence(9, n_frames=11, size=64, targets=1, fps=10.0)
    files = write_sequence(sequence, tmp_path / "seq")
    names = sorted(p.name for p in files.frames.iterdir())
    assert len(names) == 11 and "frame10.png" in names and "frame2.png" in names
    source = FrameSource(files.video)
    assert source.frame_count == 11 and source.fps == pytest.approx(10.0)
    for frame, (image, truth) in zip(source, sequence):
        np.testing.assert_array_equal(to_unit(frame.image), image)        # lossless video
        np.testing.assert_array_equal(read_gray(files.frames / f"frame{truth.index}.png"), image)
        np.testing.assert_array_equal(read_mask(files.masks / f"frame{truth.index}.png") > 0, truth.mask)
        assert frame.time == pytest.approx(truth.time, abs=1e-3)
    assert source.summary.read == 11 and source.summary.failed == 0
    with open(files.truth, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 11 and rows[10]["frame"] == "10" and rows[10]["id"] == "1"
    x, y = sequence.frame(10)[1].centroids[0]
    assert float(rows[10]["x"]) == pytest.approx(x, abs=1e-3) and float(rows[10]["y"]) == pytest.approx(y, abs=1e-3)
    assert int(rows[10]["area"]) == sequence.frame(10)[1].mask.sum()
    with pytest.raises(FileExistsError, match="seq"):
        write_sequence(sequence, tmp_path / "seq")
