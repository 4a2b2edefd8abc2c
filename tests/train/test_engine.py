"""The engine's reads of the loss: between reads nothing goes back to the host (as on a GPU), every step's parts
reach on_step in order at the next read, and a non-finite loss stops the epoch there, naming its step."""
from __future__ import annotations

import sys

import pytest
import torch

import utils.train.engine as engine
from model import DCONet, DCONetConfig
from utils.train.run_dir import NonFiniteLoss
from utils.train.schedule import poly_scheduler


def _setup(monkeypatch, nan_at: int | None = None):
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = poly_scheduler(optimizer, 100, 0.9)
    x = torch.rand(2, 1, 32, 32)
    batches = [{"image": x, "mask": (x > 0.99).float()}] * 7
    reads, items, calls = [], [], []
    real_mean, real_item, real_loss = engine.dist_utils.mean_over_ranks, torch.Tensor.item, engine.dconet_loss

    def counted_mean(info, rows):
        reads.append(rows.shape[0])
        return real_mean(info, rows)

    def counted_item(tensor):         # reads by the engine or the loss (Adam reads its CPU-side step count)
        caller = sys._getframe(1).f_code.co_filename
        if caller.endswith(("engine.py", "losses.py")):
            items.append(caller)
        return real_item(tensor)

    def loss_with_nan(D, T, image, mask, *weights):
        calls.append(1)
        loss, parts = real_loss(D, T, image, mask, *weights)
        if len(calls) == nan_at:
            loss, parts = loss * float("nan"), {k: v * float("nan") for k, v in parts.items()}
        return loss, parts

    monkeypatch.setattr(engine.dist_utils, "mean_over_ranks", counted_mean)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(engine, "dconet_loss", loss_with_nan)
    return model, optimizer, scheduler, batches, reads, items


def test_the_loss_is_read_only_at_the_named_steps_and_the_epochs_end(monkeypatch):
    model, optimizer, scheduler, batches, reads, items = _setup(monkeypatch)
    seen = []
    stats = engine.train_one_epoch(model, batches, optimizer, scheduler, device=torch.device("cpu"),
                                   on_step=lambda step, parts: seen.append((step, parts["loss"])),
                                   read_at=lambda step: step % 3 == 0, check_each_step=False)
    assert reads == [3, 3, 1] and not items         # three reads for seven steps, no .item() in between
    assert [step for step, _ in seen] == list(range(1, 8)) and stats["iterations"] == 7
    assert stats["loss"] == pytest.approx(sum(loss for _, loss in seen) / 7)


def test_a_non_finite_loss_stops_the_epoch_at_the_next_read_naming_its_step(monkeypatch):
    model, optimizer, scheduler, batches, reads, _ = _setup(monkeypatch, nan_at=2)
    seen = []
    with pytest.raises(NonFiniteLoss, match="iteration 2 of the epoch"):
        engine.train_one_epoch(model, batches, optimizer, scheduler, device=torch.device("cpu"),
                               on_step=lambda step, parts: seen.append(step),
                               read_at=lambda step: step % 3 == 0, check_each_step=False)
    assert reads == [3] and seen == []             # read after step 3; no step of that read reached on_step
