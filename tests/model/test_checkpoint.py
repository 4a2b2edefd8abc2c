"""Release-layout conversion, the project's checkpoint format and safe loading."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import reference_loss, shared_path
from model import (CheckpointError, DCONet, DCONetConfig, from_release_state_dict, load_checkpoint, load_model,
                   save_checkpoint, to_release_state_dict)
from model.release import _dead_release_shapes


@pytest.fixture(scope="module")
def release_state(reference):
    return reference["state_dict"]


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


def test_release_pipeline_weights_load_and_round_trip():
    path = shared_path("reference", "pipeline_nuaa", "weights_release.pkl")
    model, info = load_model(path)
    assert info["kind"] == "release" and model.config.stage_num == 3
    state = torch.load(path, weights_only=True)
    back = to_release_state_dict(model)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key       # dead weights are zeros in this file, as written back


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
    with pytest.raises(CheckpointError, match="other.pkl: holds the state_dict of another network"):
        load_model(tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project's format"):
        load_checkpoint(tmp_path / "other.pkl")


def _truncated(path: Path) -> None:
    torch.save(_small_model(stage_num=1).state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])


def _image(path: Path) -> None:
    import cv2
    import numpy as np
    cv2.imwrite(str(path.with_suffix(".png")), np.zeros((8, 8), np.uint8))
    path.with_suffix(".png").rename(path)


@pytest.mark.parametrize("name, make, words", [
    ("empty.pkl", lambda p: p.write_bytes(b""), ["empty (0 bytes)", "fetch or copy it again"]),
    ("cut.pkl", _truncated, ["truncated or damaged", "fetch or copy it again"]),
    ("notes.pkl", lambda p: p.write_text("trained on NUAA-SIRST\n"), ["a text file, not a PyTorch weights file"]),
    ("config.json", lambda p: p.write_text('{"epochs": 3}'), ["a text file in JSON", "not a PyTorch weights file"]),
    ("photo.pkl", _image, ["a PNG image, not a PyTorch weights file"]),
    ("linear.pkl", lambda p: torch.save(torch.nn.Linear(3, 2).state_dict(), p),
     ["holds the state_dict of another network (2 tensors, keys bias, weight", "not DCONet's"]),
])
def test_wrong_weights_files_say_what_they_are(tmp_path, name, make, words):
    """Each message names the file, says what it is and what was expected; none speaks of arbitrary code."""
    path = tmp_path / name
    make(path)
    for loader in (load_model, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        message = str(info.value)
        if loader is load_model or "holds" not in words[0]:
            assert message.startswith(f"{path}: ") and "\n" not in message
            assert "arbitrary code" not in message
            for word in words:
                assert word in message, message
            assert "expected a checkpoint written by run_0.py or an authors' best.pkl" in message


def _as_format_1(state: dict, optimizer_state: dict) -> tuple[dict, dict]:
    """A model and optimizer state_dict as format 1 held them: each BSGU's four gate convolutions as one,
    "bsgu.gates", their blocks stacked in the order forget, input, output, cell candidate."""
    gates = ("conv_f", "conv_i", "conv_o", "conv_g")
    params = [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    fused, fused_params, sources = {}, [], []          # sources: format-1 parameter -> format-2 positions
    for key, tensor in state.items():
        if ".bsgu.conv_" in key and key.split(".")[-2] in gates:
            if key.split(".")[-2] != "conv_f":
                continue
            parts = [key.replace(".conv_f.", f".{gate}.") for gate in gates]
            key = key.replace(".conv_f.", ".gates.")
            tensor = torch.cat([state[p] for p in parts])
        else:
            parts = [key]
        fused[key] = tensor
        if key.split(".")[-1] in ("weight", "bias", "epsilon", "cell_bias"):
            fused_params.append(key)
            sources.append([params.index(p) for p in parts])
    per_param = {}
    for old, new in enumerate(sources):
        entries = [optimizer_state["state"][i] for i in new]
        per_param[old] = {name: torch.cat([e[name] for e in entries]) if value.dim() else value
                          for name, value in entries[0].items()}
    groups = [{**group, "params": list(range(len(fused_params)))} for group in optimizer_state["param_groups"]]
    assert len(fused_params) == len(params) - 6 * len([k for k in state if k.endswith("bsgu.conv_f.weight")])
    return fused, {"state": per_param, "param_groups": groups}


def test_format_1_checkpoints_load(tmp_path):
    model = _small_model(seed=6).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(2, 1, 32, 32)
    reference_loss(*model(x), x).backward()
    optimizer.step()
    model.eval()
    weights, optimizer_state = _as_format_1(model.state_dict(), optimizer.state_dict())
    assert "stages.1.bsgu.gates.weight" in weights and "stages.1.bsgu.conv_i.weight" not in weights
    torch.save({"format": "dconet", "format_version": 1, "config": model.config.to_dict(), "model": weights,
                "meta": {"epoch": 1}, "train_state": {"optimizer": optimizer_state}}, tmp_path / "v1.pkl")

    payload = load_checkpoint(tmp_path / "v1.pkl")
    assert payload["format_version"] == 2 and payload["meta"] == {"epoch": 1}
    assert list(payload["model"]) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(payload["model"][key], value), key
    resumed = torch.optim.Adam(_small_model(seed=7).parameters(), lr=1e-3)
    resumed.load_state_dict(payload["train_state"]["optimizer"])       # each state where its parameter is
    got, expected = resumed.state_dict()["state"], optimizer.state_dict()["state"]
    assert sorted(got) == sorted(expected)
    for i, entry in expected.items():
        assert got[i].keys() == entry.keys() and all(torch.equal(got[i][k], entry[k]) for k in entry), i

    loaded, info = load_model(tmp_path / "v1.pkl")
    assert info["kind"] == "project"
    with torch.no_grad():
        assert torch.equal(loaded(x)[1], model(x)[1])
