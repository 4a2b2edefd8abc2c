"""--bce-weight: binary cross-entropy added to the release's loss, off by default; its gradient reaches frames
whose logits saturate on the wrong side, where SoftIoU's vanishes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import utils.train.engine as engine
from model import DCONet, DCONetConfig, load_checkpoint
from run_0 import main
from utils.train.config import parse_command_line
from utils.train.curves import read_curves
from utils.train.losses import dconet_loss, soft_iou_loss
from utils.train.schedule import poly_scheduler
from tests.train.test_loop import _args


def _tensors():
    g = torch.Generator().manual_seed(0)
    D, image = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    T = torch.randn(2, 1, 8, 8, generator=g) * 4
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    return D, T, image, mask


def test_off_by_default_the_loss_is_the_release_one():
    D, T, image, mask = _tensors()
    release = soft_iou_loss(T, mask) + 0.1 * F.mse_loss(D, image)
    assert parse_command_line([])[0].bce_weight == 0.0
    assert dconet_loss(D, T, image, mask)[0].item() == release.item()
    assert dconet_loss(D, T, image, mask, 0.1, 0.0)[0].item() == release.item()


def test_it_adds_the_weighted_pixel_mean_cross_entropy():
    D, T, image, mask = _tensors()
    p = torch.sigmoid(T.double())
    bce = -(mask * torch.log(p) + (1 - mask) * torch.log(1 - p)).mean()
    loss, parts = dconet_loss(D, T, image, mask, 0.1, 0.5)
    release = dconet_loss(D, T, image, mask, 0.1)[0]
    assert loss.item() == pytest.approx(release.item() + 0.5 * bce.item(), rel=1e-6)
    assert parts["soft_iou"].item() == soft_iou_loss(T, mask).item() and parts["loss"].item() == loss.item()
    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-6)              # unweighted, for the log
    assert "bce" not in dconet_loss(D, T, image, mask, 0.1)[1]                    # the release's parts alone


def test_it_pulls_back_a_frame_saturated_on_the_wrong_side():
    """A target-free frame marked whole with logits near +27 (seen in training with background frames): SoftIoU
    gives it no gradient to speak of, the cross-entropy about 1 / (pixels) per pixel, towards lower logits."""
    image = D = torch.zeros(1, 1, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    grads = []
    for bce_weight in (0.0, 1.0):
        T = torch.full((1, 1, 16, 16), 27.0, requires_grad=True)
        dconet_loss(D, T, image, mask, 0.1, bce_weight)[0].backward()
        grads.append(T.grad)
    assert grads[0].abs().max().item() < 1e-12
    assert torch.allclose(grads[1], torch.full_like(grads[1], 1 / 256), rtol=1e-6)


def test_the_engine_passes_the_weight_to_the_loss(monkeypatch):
    seen = []

    def recording_loss(D, T, image, mask, *weights):
        seen.append(weights)
        return dconet_loss(D, T, image, mask, *weights)

    monkeypatch.setattr(engine, "dconet_loss", recording_loss)
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(2, 1, 32, 32)
    engine.train_one_epoch(model, [{"image": x, "mask": (x > 0.99).float()}] * 2, optimizer,
                           poly_scheduler(optimizer, 10, 0.9), device=torch.device("cpu"), bce_weight=0.25)
    assert seen == [(0.1, 0.25)] * 2


def test_the_engine_reports_the_cross_entropy_beside_the_release_parts():
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(2, 1, 32, 32)
    steps = []
    stats = engine.train_one_epoch(model, [{"image": x, "mask": (x > 0.99).float()}] * 2, optimizer,
                                   poly_scheduler(optimizer, 10, 0.9), device=torch.device("cpu"), bce_weight=0.5,
                                   on_step=lambda step, parts: steps.append(parts))
    assert engine.loss_parts(0.5) == ("loss", "soft_iou", "mse", "bce") and engine.loss_parts(0) == engine.PARTS
    assert [set(parts) for parts in steps] == [{"loss", "soft_iou", "mse", "bce", "lr"}] * 2
    for parts in steps:           # the total is the parts, weighted
        assert parts["loss"] == pytest.approx(parts["soft_iou"] + 0.1 * parts["mse"] + 0.5 * parts["bce"], rel=1e-5)
    assert stats["bce"] == pytest.approx(sum(parts["bce"] for parts in steps) / 2, rel=1e-6)
    assert engine.describe_parts(steps[0]).endswith(f", bce {steps[0]['bce']:.5f})")
    assert engine.describe_parts({"loss": 1.01, "soft_iou": 0.9993, "mse": 0.10777}) == \
        "loss 1.0100 (soft_iou 0.9993, mse 0.10777)"


def test_a_run_records_it_and_refuses_another_on_resume(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "1", "--bce-weight", "0.5")) == 0
    assert json.loads((out / "config.json").read_text())["bce_weight"] == 0.5
    assert load_checkpoint(out / "latest.pkl")["train_state"]["config"]["bce_weight"] == 0.5
    lines = [line for line in (out / "log.txt").read_text().splitlines() if " iter " in line and "total" in line]
    assert lines and all(", bce " in line for line in lines)
    curves = read_curves(out)                     # the curves still read lines that carry the cross-entropy
    assert len(curves.train_iter) == len(lines) and curves.train["soft_iou"]
    assert main(_args(data_root, out, "--epochs", "2", "--resume", "--bce-weight", "0.25")) != 0
    assert "bce" in capsys.readouterr().err


def test_a_negative_weight_is_refused():
    with pytest.raises((ValueError, SystemExit)):
        parse_command_line(["--bce-weight", "-1"])
