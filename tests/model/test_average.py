"""Weight averages (model.average_models, average_weights.py): the arithmetic, what the file records, refusals."""
from __future__ import annotations

import re

import pytest
import torch

import average_weights
from model import CheckpointError, DCONet, DCONetConfig, average_models, load_model, save_checkpoint


def _saved(tmp_path, name: str, seed: int, stage_num: int = 2, **extra):
    torch.manual_seed(seed)
    model = DCONet(DCONetConfig(stage_num=stage_num))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))     # BatchNorm statistics too
            else:
                tensor.fill_(seed)                       # batch counters tell the inputs apart
    meta = {"base_size": 128 * seed, "dataset": f"set{seed}"}
    return save_checkpoint(tmp_path / name, model, meta=meta, **extra), model.state_dict()


def test_the_average_is_the_weighted_sum_of_every_float_tensor(tmp_path):
    (a, state_a), (b, state_b) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2)
    model, info = average_models([a, b], [0.25, 0.75])
    averaged = model.state_dict()
    assert set(averaged) == set(state_a)
    for key, tensor in averaged.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, 0.25 * state_a[key] + 0.75 * state_b[key], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(tensor, state_a[key]), key                 # the first input's counters
    assert info["meta"]["average_of"] == [{"file": str(a), "share": 0.25, "weights": "as saved"},
                                          {"file": str(b), "share": 0.75, "weights": "as saved"}]
    assert info["meta"]["base_size"] == 128 and info["meta"]["dataset"] == "set1"     # the first input's


def test_shares_one_and_zero_give_the_first_model_exactly(tmp_path):
    (a, state_a), (b, _) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2)
    model, _ = average_models([a, b], [1, 0])
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in state_a.items())


def test_a_latest_pkl_with_a_moving_average_is_averaged_as_that_average(tmp_path):
    (a, _), (_, state_b) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2)
    ema = {f"module.{key}": 2 * tensor for key, tensor in state_b.items()}
    torch.manual_seed(3)
    trained = DCONet(DCONetConfig(stage_num=2))
    latest = save_checkpoint(tmp_path / "latest.pkl", trained, train_state={"ema": ema, "config": {"lr": 1e-4}})
    model, info = average_models([latest, a], [1, 0])
    assert info["meta"]["average_of"][0]["weights"] == "moving average"
    assert all(torch.equal(tensor, 2 * state_b[key]) for key, tensor in model.state_dict().items())
    assert info["train_config"] == {"lr": 1e-4}


@pytest.mark.parametrize("shares, words", [([0.5], "1 share(s) for 2"), ([0.5, 0.6], "add up to 1.1"),
                                            ([1.5, -0.5], "at least 0"), ([float("nan"), 1], "at least 0")])
def test_shares_that_are_not_a_proper_average_are_refused(tmp_path, shares, words):
    (a, _), (b, _) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2)
    with pytest.raises(ValueError, match=re.escape(words)):
        average_models([a, b], shares)


def test_models_of_different_structure_are_refused_naming_both_files(tmp_path):
    (a, _), (b, _) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2, stage_num=3)
    with pytest.raises(CheckpointError) as caught:
        average_models([a, b], [0.5, 0.5])
    assert str(b) in str(caught.value) and str(a) in str(caught.value) and "K = 3" in str(caught.value)


def test_the_script_writes_a_checkpoint_that_loads_and_never_replaces_a_file_silently(tmp_path, capsys):
    (a, state_a), (b, state_b) = _saved(tmp_path, "a.pkl", 1), _saved(tmp_path, "b.pkl", 2)
    out = tmp_path / "avg.pkl"
    assert average_weights.main([str(a), str(b), "--shares", "0.5", "0.5", "--out", str(out)]) == 0
    model, info = load_model(out)
    key = next(k for k, v in state_a.items() if v.is_floating_point())
    torch.testing.assert_close(model.state_dict()[key], (state_a[key] + state_b[key]) / 2)
    assert [item["file"] for item in info["meta"]["average_of"]] == [str(a), str(b)]
    assert f"wrote {out}" in capsys.readouterr().out
    before = out.read_bytes()
    assert average_weights.main([str(b), str(a), "--shares", "0.5", "0.5", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert average_weights.main([str(a), str(b), "--shares", "0.5", "0.5", "--out", str(a),
                                 "--overwrite"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert average_weights.main([str(a), str(tmp_path / "missing.pkl"), "--shares", "0.5", "0.5",
                                 "--out", str(tmp_path / "other.pkl")]) == 2
    err = capsys.readouterr().err
    assert "missing.pkl" in err and not (tmp_path / "other.pkl").exists()
