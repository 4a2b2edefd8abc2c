"""From frames to a table of targets: export() on a synthetic video, a folder of frames and a set of still images,
checked against the generator's truth; the one-frame Python call; and, on NUAA-SIRST with the release-layout
reference weights, detections.csv against the standard protocol's Pd count."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import cal_from_mask
import t_models
from conftest import shared_path
from model import StageOutput
from utils.score.components import components, match_targets
from utils.export.detection_table import read_table
from utils.export.detections import Detector
from utils.export.writer import ExportOptions, export
from utils.io.images import read_mask, resize_mask_centres, write_png
from utils.export.predict import Geometry, prepare_model
from utils.data.synthetic_sequence import make_sequence, write_sequence
from utils.io.video import FrameSource

GAIN, MARGIN = 200.0, 0.02  # MARGIN: above the 1/510 quantisation, below the smallest target amplitude (0.05)


class BackgroundSubtraction(nn.Module):
    """A stand-in for DCONet with its call signature: T = GAIN * (x - background - MARGIN), B = background, D = x.

    These tests check the path from frames to a table of targets (reading videos and folders, inference's
    padding and batching, thresholding, labelling, centroids, ids, frame indices, times, the table and the
    annotated output), so the network's predictions must not be in question: a trained DCONet finds most
    targets, not all, and which ones depends on training. The stand-in's output is a known function of the
    input instead. The sequences are made without temporal noise, so x - background is each rendered target
    profile times its amplitude (plus at most 1/510 of 8-bit rounding): T > 0 exactly on a superlevel set of
    each target's profile, one 8-connected component per target (their patches never meet), centred on it.
    Any target missed, split, duplicated, displaced or filed under the wrong frame is then a fault of the path.
    """

    def __init__(self, background: np.ndarray):
        super().__init__()
        self.register_buffer("background", torch.from_numpy(background)[None, None])   # (1, 1, H, W)

    def forward(self, x, return_stages=False):
        B = self.background.expand_as(x)
        T = GAIN * (x - B - MARGIN)
        return (x, T, [StageOutput(B, T, x)]) if return_stages else (x, T)


def assert_matches_truth(rows: list[dict], truths: dict, key: str) -> None:
    """Every target of every frame found once, centroid within 1 px; nothing else found."""
    by_frame = defaultdict(list)
    for row in rows:
        by_frame[row[key]].append(row)
    assert sorted(by_frame) == sorted(truths), "every frame has its targets"
    for name, truth in truths.items():
        found = by_frame[name]
        assert len(found) == len(truth.ids), f"{name}: {len(found)} detections for {len(truth.ids)} targets"
        assert sorted(row["id"] for row in found) == list(range(1, len(found) + 1))
        for x, y in truth.centroids:
            near = [row for row in found if np.hypot(row["x"] - x, row["y"] - y) < 1.0]
            assert len(near) == 1, f"{name}: target at ({x:.2f}, {y:.2f}) matched by {len(near)} detections"


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """24 frames of 128x128, 3 targets moving 1.5-2.5 px a frame (a frame mix-up would move them by more than
    the 1 px the checks allow), written as a lossless video and as a folder of frames."""
    sequence = make_sequence(21, n_frames=24, size=128, targets=3, noise_sigma=0.0, fps=12.5, speed=(1.5, 2.5))
    return sequence, write_sequence(sequence, tmp_path_factory.mktemp("sequence"))


@pytest.mark.parametrize("kind", ["video", "folder"])
def test_export_of_a_sequence_finds_every_target_in_every_frame(kind, sequence, tmp_path):
    sequence, files = sequence
    truths = {truth.index: truth for _, truth in sequence}
    path, fps = (files.video, None) if kind == "video" else (files.frames, sequence.fps)
    source = FrameSource(path, fps=fps)
    net = prepare_model(BackgroundSubtraction(sequence.background), "cpu", plain=True)
    out = tmp_path / "out"
    summary = export(net, source, out, Geometry(), ExportOptions(batch_size=4, json=True, fps=fps,
                                                                  annotate=tmp_path / "annotated.avi",
                                                                  progress=False))
    assert summary.written == 24 and not summary.skipped
    assert (out / "mat").is_dir() == (kind == "folder"), "maps: for images, not for a video"
    rows = read_table(out / "detections.csv")
    assert rows == read_table(out / "detections.jsonl")
    assert summary.detections == len(rows) == sum(len(t.ids) for t in truths.values())
    assert_matches_truth(rows, truths, "frame")
    for row in rows:
        assert row["time_s"] == pytest.approx(truths[row["frame"]].time, abs=1e-3)
        assert row["peak"] > 0.5 and row["threshold"] == 0.5
        assert row["source"] == (path.name if kind == "video" else f"frame{row['frame']}.png")
    replay = FrameSource(tmp_path / "annotated.avi")
    assert replay.frame_count == 24 and replay.size == (128, 128) and len(list(replay)) == 24


def test_export_of_still_images_and_the_one_frame_call(tmp_path):
    stills = make_sequence(22, n_frames=6, size=96, targets=2, noise_sigma=0.0, speed=(2.0, 3.0))
    truths = {}
    for (image, truth), name in zip(stills, "fedcba"):
        write_png(tmp_path / "stills" / f"{name}.png", np.round(image * 255).astype(np.uint8))
        truths[f"{name}.png"] = truth
    net = prepare_model(BackgroundSubtraction(stills.background), "cpu", plain=True)
    export(net, FrameSource(tmp_path / "stills"), tmp_path / "out", Geometry(),
           ExportOptions(save_masks=True, progress=False))
    rows = read_table(tmp_path / "out" / "detections.csv")
    assert_matches_truth(rows, truths, "source")
    assert all(row["frame"] is None and row["time_s"] is None for row in rows)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == sorted(truths)

    detector = Detector(BackgroundSubtraction(stills.background), device="cpu", plain=True)
    image = cv2.imread(str(tmp_path / "stills" / "a.png"), 0)
    probability, found = detector(image)
    assert probability.shape == image.shape and probability.dtype == np.float32
    assert [(d.id, round(d.x, 3), round(d.y, 3)) for d in found] == \
        [(r["id"], r["x"], r["y"]) for r in rows if r["source"] == "a.png"]


def test_resized_exports_report_targets_in_the_images_pixels(tmp_path):
    """With a resize geometry the targets are found on the exported map and given in the input's pixels."""
    stills = make_sequence(23, n_frames=2, size=128, targets=2, noise_sigma=0.0, speed=(2.0, 3.0))
    for index, (image, _) in enumerate(stills):
        write_png(tmp_path / "stills" / f"{index}.png", np.round(image * 255).astype(np.uint8))
    background = cv2.resize(stills.background, (64, 64), interpolation=cv2.INTER_LINEAR)
    net = prepare_model(BackgroundSubtraction(background), "cpu", plain=True)
    export(net, FrameSource(tmp_path / "stills"), tmp_path / "out", Geometry(resize=64), ExportOptions(progress=False))
    rows = read_table(tmp_path / "out" / "detections.csv")
    for index, (_, truth) in enumerate(stills):
        found = [r for r in rows if r["source"] == f"{index}.png"]
        assert len(found) == len(truth.ids)
        for x, y in truth.centroids:            # within 2 px of the truth after a 2x downsampling and back
            assert min(np.hypot(r["x"] - x, r["y"] - y) for r in found) < 2.0
            assert all(0 <= r["x0"] < r["x1"] <= 128 and 0 <= r["y0"] < r["y1"] <= 128 for r in found)


@pytest.mark.slow
def test_nuaa_detections_agree_with_the_standard_protocols_pd(tmp_path, capsys, one_thread):
    """detections.csv of a real export holds exactly the predicted targets the standard protocol matches:
    matching its rows to the masks' targets by the protocol's rule gives cal_from_mask.py's Pd count."""
    weights = shared_path("reference", "pipeline_nuaa", "weights_release.pkl")
    split = shared_path("data", "NUAA-SIRST", "test")
    out = tmp_path / "res"
    assert t_models.main(["--input", str(split / "images"), "--weights", str(weights), "--out", str(out),
                          "--no-progress", "--device", "cpu"]) in (0,)
    assert cal_from_mask.main(["--pred-dir", str(out / "mat"), "--mask-dir", str(split / "masks"), "--protocol",
                               "standard", "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    per_image = list(csv.DictReader(open(tmp_path / "eval" / "per_image_standard.csv")))
    rows = defaultdict(list)
    for row in read_table(out / "detections.csv"):
        rows[Path(row["source"]).stem].append(row)
    detected = 0
    for record in per_image:
        mask = read_mask(split / "masks" / f"{record['name']}.png")
        image_shape = cv2.imread(str(split / "images" / f"{record['name']}.png"), 0).shape
        targets = components(resize_mask_centres(mask > 0, (256, 256)))        # as the standard protocol scores
        (H, W), found = image_shape, rows[record["name"]]
        centroids = np.array([[(r["y"] + 0.5) * 256 / H - 0.5, (r["x"] + 0.5) * 256 / W - 0.5] for r in found])
        detected += int((match_targets(targets.centroid, centroids.reshape(-1, 2), 3.0) >= 0).sum())
    assert detected == sum(int(r["detected"]) for r in per_image)
