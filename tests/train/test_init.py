"""--init: a run that starts from saved weights (this project's checkpoint or an authors' best.pkl) instead of a
random initialisation, taking the file's K and width; a resumed run keeps its own weights."""
from __future__ import annotations

import pytest
import torch

from model import DCONet, DCONetConfig, load_checkpoint, save_checkpoint
from model.release import to_release_state_dict
from run_0 import main
from utils.train.config import parse_command_line
from utils.train.loop import Trainer

SMALL = ["--epochs", "1", "--batch-size", "4", "--base-size", "32", "--vis-images", "0", "--device", "cpu",
         "--log-every", "0", "--save-iter-step", "0"]


def _model(seed: int, stage_num: int = 1, channels: int = 8) -> DCONet:
    torch.manual_seed(seed)
    model = DCONet(DCONetConfig(stage_num=stage_num, channels=channels))
    with torch.no_grad():                      # BatchNorm statistics away from their defaults, so that they count
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return model


def _trainer(data_root, tmp_path, *extra: str) -> Trainer:
    config, given = parse_command_line(["--dataset", "tiny", "--data-root", str(data_root),
                                        "--out", str(tmp_path / "run"), *SMALL, *extra])
    return Trainer(config, given)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("kind", ["project", "release"])
def test_a_run_with_init_starts_from_the_files_weights_and_model(data_root, tmp_path, kind):
    source = _model(seed=4, stage_num=1, channels=8)
    path = tmp_path / "start.pkl"
    if kind == "project":
        save_checkpoint(path, source)
    else:
        torch.save(to_release_state_dict(source), path)
    trainer = _trainer(data_root, tmp_path, "--init", str(path))      # K and width not given: the file's
    try:
        assert trainer.config.model == DCONetConfig(stage_num=1, channels=8)
        assert _same_weights(trainer.model.state_dict(), source.state_dict())
        assert any(note.startswith(f"--init: starting from the weights of {path} ({kind} checkpoint")
                   for note in trainer.notes)
    finally:
        trainer.close()


def test_without_init_the_weights_are_drawn_afresh(data_root, tmp_path):
    source = _model(seed=4, stage_num=1, channels=8)
    trainer = _trainer(data_root, tmp_path, "--stage-num", "1", "--channels", "8")
    try:
        assert not _same_weights(trainer.model.state_dict(), source.state_dict())
    finally:
        trainer.close()


def test_a_k_or_width_that_contradicts_the_init_file_is_refused(data_root, tmp_path):
    path = save_checkpoint(tmp_path / "start.pkl", _model(seed=4, stage_num=1, channels=8))
    with pytest.raises(ValueError, match=r"--init .*start\.pkl holds a DCONet with K = 1 and width 8, but the "
                                         r"command line asks for stage_num = 2: drop --stage-num/--channels"):
        _trainer(data_root, tmp_path, "--init", str(path), "--stage-num", "2")
    assert not (tmp_path / "run").exists()                     # the folder made for the run is removed again


def test_a_file_that_is_not_a_model_is_refused_by_name(data_root, tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(Exception, match=r"other\.pkl.*not DCONet's"):
        _trainer(data_root, tmp_path, "--init", str(path))


def test_a_fine_tuned_run_trains_from_the_file_and_resumes_from_its_own_weights(data_root, tmp_path):
    start = save_checkpoint(tmp_path / "start.pkl", _model(seed=4, stage_num=1, channels=8))
    out = tmp_path / "run"
    args = ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), *SMALL, "--init", str(start),
            "--ema", "0.9"]
    assert main(args) == 0
    first = load_checkpoint(out / "latest.pkl")
    assert first["train_state"]["config"]["init"] == str(start)
    assert first["config"] == {"stage_num": 1, "channels": 8}
    assert not _same_weights(first["model"], load_checkpoint(start)["model"])     # it trained
    assert "--init: starting from the weights of" in (out / "log.txt").read_text()

    # resumed: the weights are latest.pkl's, not the --init file's (which may even be gone by then)
    start.unlink()
    resumed = _trainer(data_root, tmp_path, "--resume", "--epochs", "2")
    try:
        assert _same_weights(resumed.model.state_dict(), first["model"])
    finally:
        resumed.close()
