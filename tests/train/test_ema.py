"""--ema: validation and best.pkl use the moving average of the weights; latest.pkl keeps it for resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import utils.train.engine as engine
from model import load_checkpoint
from run_0 import main
from utils.train.config import parse_command_line
from utils.train.loop import fit
from utils.train.run_dir import NonFiniteLoss


def _args(data_root: Path, out: Path, *extra: str) -> list[str]:
    # 8 training images in batches of 4: two steps per epoch
    return ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--batch-size", "4",
            "--base-size", "32", "--stage-num", "1", "--lr", "1e-3", "--vis-images", "0", "--device", "cpu",
            "--save-iter-step", "0", "--ema", "0.5", *extra]


def test_ema_is_off_by_default_and_checked():
    assert parse_command_line([])[0].ema == 0.0
    with pytest.raises(ValueError, match="ema must lie in"):
        parse_command_line(["--ema", "1"])


def test_best_pkl_holds_the_moving_average(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "1")) == 0     # one validation: best.pkl is written then
    best, latest = load_checkpoint(out / "best.pkl"), load_checkpoint(out / "latest.pkl")
    average = latest["train_state"]["ema"]
    assert average["n_averaged"].item() == 2
    moved = 0
    for key, value in best["model"].items():
        assert torch.equal(value, average["module." + key]), key
        if value.is_floating_point() and not torch.equal(value, latest["model"][key]):
            moved += 1
    assert moved > 0, "the average should differ from the last weights"


def test_a_resumed_run_continues_the_average(data_root, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(_args(data_root, straight, "--epochs", "2")) == 0

    real_loss, calls = engine.dconet_loss, []

    def failing_loss(D, T, image, mask, mse_weight):
        calls.append(1)
        loss, parts = real_loss(D, T, image, mask, mse_weight)
        return (loss * float("nan"), parts) if len(calls) == 3 else (loss, parts)    # epoch 2's first step

    broken = tmp_path / "broken"
    monkeypatch.setattr(engine, "dconet_loss", failing_loss)
    with pytest.raises(NonFiniteLoss):
        fit(parse_command_line(_args(data_root, broken, "--epochs", "2"))[0])
    monkeypatch.undo()
    assert load_checkpoint(broken / "latest.pkl")["train_state"]["ema"]["n_averaged"].item() == 2
    assert main(_args(data_root, broken, "--epochs", "2", "--resume")) == 0

    a, b = load_checkpoint(straight / "latest.pkl"), load_checkpoint(broken / "latest.pkl")
    assert b["train_state"]["ema"]["n_averaged"].item() == 4
    assert json.loads((broken / "config.json").read_text())["resume"] is False       # the recipe, to give back
    assert load_checkpoint(broken / "best.pkl")["train_config"]["resume"] is False
    for key, value in a["train_state"]["ema"].items():
        assert torch.equal(value, b["train_state"]["ema"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_the_average_leaves_training_unchanged(data_root, tmp_path):
    with_ema, without = tmp_path / "with", tmp_path / "without"
    assert main(_args(data_root, with_ema, "--epochs", "2")) == 0
    assert main([*_args(data_root, without, "--epochs", "2"), "--ema", "0"]) == 0
    a, b = load_checkpoint(with_ema / "latest.pkl"), load_checkpoint(without / "latest.pkl")
    assert "ema" not in b["train_state"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
