"""Release-layout conversion, the project's checkpoint format and safe loading."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from model import (CheckpointError, DCONet, DCONetConfig, from_release_state_dict, load_checkpoint, load_model,
                   save_checkpoint, to_release_state_dict)
from model.checkpoint import _dead_release_shapes


@pytest.fixture(scope="module")
def release_state():
    return torch.load(shared_path("reference", "dconet_k2_seed0.pt"), weights_only=True)["state_dict"]


def _small_model(seed: int = 0, stage_num: int = 2) -> DCONet:
    torch.manual_seed(seed)
    model = DCONet(DCONetConfig(stage_num=stage_num))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))   # no trivially zero tensors
    return model.eval()


def test_release_round_trip_is_exact(release_state):
    back = to_release_state_dict(from_release_state_dict(release_state))
    assert set(back) == set(release_state)
    dead = {k for s in range(2) for k in _dead_release_shapes(s, 32)}
    assert dead < set(release_state)
    for key, tensor in release_state.items():
        assert back[key].shape == tensor.shape, key
        if key in dead:
            assert not back[key].any(), key
        else:
            assert torch.equal(back[key], tensor), key


def test_model_to_release_and_back_is_exact():
    model = _small_model()
    again = from_release_state_dict(to_release_state_dict(model))
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_module_prefix_and_stage_count_are_handled():
    model = _small_model(stage_num=3)
    prefixed = {"module." + k: v for k, v in to_release_state_dict(model).items()}
    loaded = from_release_state_dict(prefixed)
    assert loaded.config.stage_num == 3
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[1], loaded.eval()(x)[1])


def test_release_without_dead_weights_loads():
    state = to_release_state_dict(_small_model())
    live = {k: v for k, v in state.items() if k not in {d for s in range(2) for d in _dead_release_shapes(s, 32)}}
    assert len(live) < len(state)
    from_release_state_dict(live)


def test_release_errors_name_the_keys_and_shapes():
    state = to_release_state_dict(_small_model())
    broken = dict(state)
    del broken["decos.1.sparse.conv_f.weight"]
    broken["decos.0.extra.weight"] = torch.zeros(3)
    broken["decos.0.merge.mapping.0.weight"] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(CheckpointError) as info:
        from_release_state_dict(broken, source="best.pkl")
    message = str(info.value)
    for word in ("best.pkl", "missing keys", "decos.1.sparse.conv_f.weight", "unexpected keys",
                 "decos.0.extra.weight", "shape mismatches", "decos.0.merge.mapping.0.weight (16, 1, 3, 3)"):
        assert word in message
    with pytest.raises(CheckpointError, match="not a DCONet release"):
        from_release_state_dict({"conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="without gaps"):
        from_release_state_dict({k.replace("decos.1.", "decos.2."): v for k, v in state.items()})


def test_project_checkpoint_round_trip_is_atomic(tmp_path):
    model = _small_model(seed=4)
    path = save_checkpoint(tmp_path / "run" / "best.pkl", model, meta={"epoch": 3}, extra_state={"step": 7})
    assert sorted(os.listdir(path.parent)) == ["best.pkl"]       # no temporary file left behind
    payload = load_checkpoint(path)
    assert payload["config"] == {"stage_num": 2, "channels": 32}
    assert payload["meta"] == {"epoch": 3} and payload["extra_state"] == {"step": 7}
    loaded, info = load_model(path)
    assert info["kind"] == "project" and info["config"]["stage_num"] == 2
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[1], loaded(x)[1])


def test_load_model_detects_release_files(tmp_path):
    model = _small_model(seed=5)
    torch.save(to_release_state_dict(model), tmp_path / "best.pkl")
    torch.save({"state_dict": {"module." + k: v for k, v in to_release_state_dict(model).items()}},
               tmp_path / "wrapped.pkl")
    x = torch.rand(1, 1, 32, 64)
    for name in ("best.pkl", "wrapped.pkl"):
        loaded, info = load_model(tmp_path / name)
        assert info["kind"] == "release" and not loaded.training
        with torch.no_grad():
            assert torch.equal(model(x)[1], loaded(x)[1])


class _Payload:
    """An object whose unpickling would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code-was-run"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pkl")
    assert not marker.exists()
    for loader in (load_model, load_checkpoint):
        with pytest.raises(CheckpointError, match="refused"):
            loader(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_unreadable_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_model(tmp_path / "absent.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pkl"):
        load_model(tmp_path / "junk.pkl")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="neither a checkpoint of this project nor a DCONet release"):
        load_model(tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project's format"):
        load_checkpoint(tmp_path / "other.pkl")
