"""Which weights a run's files give: best.pkl holds the best validation's (the release) or, with --keep last,
the last one's; a latest.pkl of a run with --ema loads (load_model, so t_models.py and --init) as the moving
average that its validation scored, while --resume reads the trained weights."""
from __future__ import annotations

import pytest
import torch

import utils.train.loop as loop
from model import load_checkpoint, load_model
from run_0 import main

SMALL = ["--epochs", "2", "--batch-size", "4", "--base-size", "32", "--stage-num", "1", "--channels", "8",
         "--vis-images", "0", "--device", "cpu", "--log-every", "0", "--save-iter-step", "0"]


def _falling_scores(monkeypatch):
    """Validation scores whose mIoU falls with every call, so that the best validation is the first."""
    real, calls = loop.evaluate, []

    def evaluate(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append(1)
        return {**scores, "mIoU": 1.0 / len(calls)}

    monkeypatch.setattr(loop, "evaluate", evaluate)


@pytest.mark.parametrize("keep, epoch", [("best", 1), ("last", 2)])
def test_best_pkl_holds_the_best_or_the_last_validations_weights(data_root, tmp_path, monkeypatch, keep, epoch):
    _falling_scores(monkeypatch)
    out = tmp_path / "run"
    assert main(["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), *SMALL, "--keep", keep]) == 0
    best = load_checkpoint(out / "best.pkl")
    assert best["meta"]["epoch"] == epoch and best["meta"]["scores"]["mIoU"] == pytest.approx(1.0 / epoch)
    assert best["meta"]["best_epoch"] == 1                      # the log's best mIoU is still the best one
    log = (out / "log.txt").read_text()
    assert ("best.pkl holds the last validation's weights (--keep last)" in log) == (keep == "last")


def test_a_latest_pkl_with_ema_loads_as_the_average_that_validation_scored(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), *SMALL, "--ema", "0.9",
                 "--keep", "last"]) == 0
    latest, info = load_model(out / "latest.pkl")
    best, best_info = load_model(out / "best.pkl")
    assert info["weights"] == "moving average" and best_info["weights"] == "as saved"
    for key, value in best.state_dict().items():                 # the last validation's weights, every tensor
        assert torch.equal(latest.state_dict()[key], value), key
    trained = load_checkpoint(out / "latest.pkl")["model"]        # what --resume continues from
    assert any(not torch.equal(trained[k], v) for k, v in latest.state_dict().items())


def test_a_latest_pkl_without_ema_loads_as_saved(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), *SMALL, "--epochs", "1"]) == 0
    model, info = load_model(out / "latest.pkl")
    assert info["weights"] == "as saved"
    trained = load_checkpoint(out / "latest.pkl")["model"]
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
