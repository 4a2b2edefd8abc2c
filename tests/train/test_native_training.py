"""Training for frames from other cameras: native-scale windows, negatives mixed in with false targets counted on
held-out ones, the memory-format probe, and the export geometry such a checkpoint asks for."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model import DCONet, DCONetConfig, load_model
from utils.export.predict import trained_geometry
from utils.train.config import parse_command_line
from utils.train.engine import false_targets
from utils.train.layout import choose_memory_format, probe_memory_format
from utils.train.loop import fit


def _negatives(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    for group in ("camA", "camB", "camC"):
        for i in range(2):
            (folder / "images").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "images" / f"{group}_{i}.png"), rng.integers(0, 80, (40, 72), dtype=np.uint8))
    return folder / "images"


@pytest.mark.slow
def test_a_native_run_with_negatives_counts_false_targets_and_exports_at_its_training_size(data_root, tmp_path):
    out = tmp_path / "run"
    config, given = parse_command_line(
        ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--batch-size", "4", "--base-size",
         "32", "--stage-num", "1", "--epochs", "2", "--device", "cpu", "--geometry", "native", "--scale-min", "0.5",
         "--scale-max", "2", "--negatives", str(_negatives(tmp_path / "bg")), "--negative-rate", "0.5",
         "--negative-val-split", "0.3", "--negative-val-every", "2", "--memory-format", "auto"])
    fit(config, given)
    log = (out / "log.txt").read_text()
    assert re.search(r"note: memory format auto: (contiguous|channels_last) \(a training pass", log)
    assert "iter 4/4 " in log                               # 8 target frames + 8 negatives at batch 4
    validations = re.findall(r"validation epoch (\d)/2 .*", log)
    assert validations == ["1", "2"]
    lines = [l for l in log.splitlines() if "validation epoch" in l]
    assert "FT/frame" not in lines[0] and re.search(r"FT/frame \d+\.\d+, FT-frames \d+\.\d+", lines[1])
    model, info = load_model(out / "best.pkl")
    assert info["train_config"]["geometry"] == "native"
    geometry, why = trained_geometry(info)                  # resized, as held-out frames chose (docs/training.md)
    assert geometry.resize == 32 and "the size this checkpoint was trained at" in why
    assert trained_geometry(info, native=True)[0].resize is None          # --native still runs at native size


def test_false_targets_count_the_components_raised_on_empty_frames():
    class Marks(torch.nn.Module):
        """T > 0 where the frame is bright."""
        def forward(self, x):
            return x, torch.where(x > 0.5, 3.0, -5.0)

    first = torch.zeros(1, 40, 56)
    first[0, 2:4, 2:4] = first[0, 20, 30] = 1.0            # two separate blobs
    frames = [{"image": first}, {"image": torch.zeros(1, 30, 30)}]
    scores = false_targets(Marks(), frames, device=torch.device("cpu"))
    assert scores == {"FT/frame": 1.0, "FT-frames": 0.5}


def test_the_memory_format_probe_keeps_the_faster_layout_and_touches_nothing(monkeypatch):
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    choice, seconds = probe_memory_format(model, (2, 1, 32, 32), torch.device("cpu"), steps=1)
    assert choice == min(seconds, key=seconds.get) and set(seconds) == {"contiguous", "channels_last"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng_before, torch.random.get_rng_state())
    import utils.train.layout as layout
    def nhwc(module):
        weight = next(p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(layout, "_step_seconds", lambda trial, x: 1.0 if nhwc(trial) else 2.0)
    assert choose_memory_format("auto", model, (2, 1, 32, 32), torch.device("cpu"))[0] == "channels_last"
    assert choose_memory_format("contiguous", model, (2, 1, 32, 32), torch.device("cpu")) == ("contiguous", "")
