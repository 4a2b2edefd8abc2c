"""The NUAA-SIRST model shipped in Weight/NUAA-SIRST/: it loads as float32 with its settings, runs at the export
default (its training size) and finds the targets of NUAA-SIRST test frames (../shared/data; skipped without)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, shared_path
from model import load_model
from utils.export.detections import Detector
from utils.export.writer import SHIPPED_WEIGHTS, default_weights
from utils.io.images import read_image, read_mask, resize_mask_centres
from utils.score.components import components, match_targets

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

# Test frames with one or two clear targets each, of several sizes (Misc_111: its mask is a scaled copy).
FRAMES = ("Misc_6", "Misc_15", "Misc_111", "Misc_153", "Misc_243")


def test_the_shipped_weights_are_the_default_and_load_as_float32_with_their_settings():
    assert SHIPPED_WEIGHTS == REPO / "Weight" / "NUAA-SIRST" / "best.pkl" and SHIPPED_WEIGHTS.is_file()
    assert default_weights(None) == SHIPPED_WEIGHTS
    model, info = load_model(SHIPPED_WEIGHTS)
    assert info["kind"] == "project" and info["config"]["stage_num"] == 2
    assert info["meta"]["base_size"] == 256 and info["meta"]["dataset"] == "NUAA-SIRST"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    payload = torch.load(SHIPPED_WEIGHTS, weights_only=True)
    assert "optimizer" not in str(sorted(payload)), "the shipped file holds weights and settings only"
    assert SHIPPED_WEIGHTS.stat().st_size < 25 * 2 ** 20
    for name in ("config.json", "log.txt", "curves.png", "README.md"):
        assert (SHIPPED_WEIGHTS.parent / name).is_file(), name


@pytest.mark.slow
def test_the_shipped_model_finds_the_targets_of_nuaa_sirst_test_frames():
    data = shared_path("data", "NUAA-SIRST", "test")
    detector = Detector()                                   # no path: the shipped model, at its training size
    missed, false_alarms = [], []
    for stem in FRAMES:
        image = read_image(data / "images" / f"{stem}.png")
        mask = read_mask(data / "masks" / f"{stem}.png")
        if mask.shape != image.shape:                        # Misc_111: the mask is a scaled copy of the image's
            mask = resize_mask_centres(mask, image.shape)
        _, detections = detector(image)
        truth = components(mask > 0).centroid                                     # (n, 2) as (row, col)
        found = np.array([(d.y, d.x) for d in detections]).reshape(-1, 2)
        matched = match_targets(truth, found, radius=3.0)
        missed += [stem] * int(np.count_nonzero(matched < 0))
        false_alarms += [stem] * (len(found) - int(np.count_nonzero(matched >= 0)))
    assert not missed and len(false_alarms) <= 1, (missed, false_alarms)


def test_t_models_without_weights_runs_the_shipped_model_and_says_so_first(tmp_path, capsys):
    import t_models
    from utils.io.images import write_png
    frame = tmp_path / "frames" / "f.png"
    write_png(frame, np.full((40, 48), 30, dtype=np.uint8))
    assert t_models.main(["--input", str(frame), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"weights: {SHIPPED_WEIGHTS} (the NUAA-SIRST model shipped with this project; --weights FILE "
                     f"runs another)")


def test_without_weights_and_without_the_shipped_model_the_message_names_weights(tmp_path, monkeypatch, capsys):
    import t_models
    import utils.export.writer as writer
    from utils.io.images import write_png
    monkeypatch.setattr(writer, "SHIPPED_WEIGHTS", tmp_path / "Weight" / "NUAA-SIRST" / "best.pkl")
    write_png(tmp_path / "f.png", np.zeros((8, 8), np.uint8))
    assert t_models.main(["--input", str(tmp_path / "f.png"), "--out", str(tmp_path / "out")]) == 2
    assert "--weights FILE" in capsys.readouterr().err
