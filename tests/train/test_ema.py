"""--ema: validation and best.pkl use the moving average of the weights; latest.pkl keeps it for resuming. The
average computes what AveragedModel does, without reading from the device and in a few multi-tensor operations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import utils.train.engine as engine
from model import DCONet, DCONetConfig, load_checkpoint
from run_0 import main
from utils.train.config import parse_command_line
from utils.train.ema import WeightAverage
from utils.train.loop import Trainer, fit
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

    def failing_loss(D, T, image, mask, *weights):
        calls.append(1)
        loss, parts = real_loss(D, T, image, mask, *weights)
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


# ---------------------------------------------------------------------------------------------------------
# The average itself: AveragedModel's arithmetic, in a few multi-tensor operations, nothing read from the device
# ---------------------------------------------------------------------------------------------------------

class _Ops(TorchDispatchMode):
    """Records the operators that run inside the block, with the devices of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.calls.append((str(func), devices))
        return func(*args, **kwargs)


def _trained_a_little(model: torch.nn.Module, seed: int) -> None:
    """One step's worth of change: new weights and BatchNorm statistics (as a training step would leave)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.add_(1)


def test_an_update_reads_nothing_from_the_device_in_a_few_operations(data_root, tmp_path):
    trainer = Trainer(parse_command_line(_args(data_root, tmp_path / "run", "--epochs", "1"))[0])
    try:
        update = trainer._after_update()        # what training runs after every optimizer step
        update()                                 # the first update copies the weights
        _trained_a_little(trainer.model, seed=0)
        with _Ops() as ops:
            update()
    finally:
        trainer.close()
    names = [name for name, _ in ops.calls]
    assert "aten._local_scalar_dense.default" not in names, "an update read a value back from the device"
    tensors = len(list(trainer.model.parameters())) + len(list(trainer.model.buffers()))
    assert len(names) <= 2 < tensors, f"{len(names)} operations for {tensors} tensors: {names[:8]}"


def test_an_update_runs_on_the_models_device_only():
    with torch.device("meta"):          # no data: any tensor that is not on "meta" shows up in the devices
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))
    average = WeightAverage(model, decay=0.9)
    with _Ops() as ops:
        for _ in range(3):
            average.update(model)
    assert ops.calls and all(devices == {"meta"} for _, devices in ops.calls), ops.calls


def test_the_average_is_averaged_models_and_loads_its_state():
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    average = WeightAverage(model, decay=0.9)
    for step in range(6):
        if step == 3:       # as a resumed run: the average continues from AveragedModel's state (latest.pkl)
            average = WeightAverage(model, decay=0.9)
            average.load_state_dict(reference.state_dict())
        reference.update_parameters(model)
        average.update(model)
        _trained_a_little(model, seed=step)
    assert average.updates == 6
    state, expected = average.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert any(not torch.equal(value, model.state_dict()[key]) for key, value in average.module.state_dict().items())
    back = AveragedModel(DCONet(DCONetConfig(stage_num=1)), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    back.load_state_dict(state)           # and the other way round: an older version reads this one's state
    with pytest.raises(ValueError, match="n_averaged"):
        average.load_state_dict({k: v for k, v in state.items() if k != "n_averaged"})
