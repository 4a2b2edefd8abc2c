"""Run folders as a user meets them: the shipped model is never one, and an interrupted run says where it
stopped (in its log), prints the whole command that goes on, and keeps its TensorBoard files with a purge at the
iteration each attempt starts from."""
from __future__ import annotations

import hashlib
import shlex
import shutil
from pathlib import Path

import pytest

import utils.train.engine as engine
import utils.train.run_dir as run_dir
from model import SHIPPED_MODEL
from run_0 import main
from utils.data.synthetic_sets import write_dataset
from utils.train.config import parse_command_line
from utils.train.losses import dconet_loss
from utils.train.run_dir import TrainingError, refuse_shipped_model

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--epochs", "1", "--batch-size", "4", "--base-size", "32", "--stage-num", "1", "--vis-images", "0",
         "--device", "cpu"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_shipped_model_folder_is_refused_as_a_run_folder():
    assert SHIPPED_MODEL == REPO / "Weight" / "NUAA-SIRST" and (SHIPPED_MODEL / "best.pkl").is_file()
    for out in (str(SHIPPED_MODEL), str(REPO / "Weight" / ".." / "Weight" / "NUAA-SIRST")):
        config = parse_command_line(["--dataset", "NUAA-SIRST", "--out", out])[0]
        with pytest.raises(TrainingError, match="is the NUAA-SIRST model shipped with this project"):
            refuse_shipped_model(config)


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch) -> Path:
    """A working folder whose Weight/NUAA-SIRST is a copy of the shipped model, standing for it, and a small
    NUAA-SIRST-named data set: a run that were allowed into the folder would train and write there."""
    copy = tmp_path / "clone" / "Weight" / "NUAA-SIRST"
    shutil.copytree(SHIPPED_MODEL, copy)
    monkeypatch.setattr(run_dir, "SHIPPED_MODEL", copy, raising=False)
    monkeypatch.chdir(tmp_path / "clone")
    write_dataset(tmp_path / "data", "NUAA-SIRST", n_trainval=4, n_test=2, size=32, seed=3)
    return copy


@pytest.mark.parametrize("how", [[], ["--overwrite"], ["--resume"], ["--out", "Weight/NUAA-SIRST", "--overwrite"],
                                 ["--out", "Weight/../Weight/NUAA-SIRST", "--resume"]],
                         ids=["default-out", "overwrite", "resume", "out-overwrite", "out-resume"])
def test_training_never_writes_into_the_shipped_model(shipped_copy, tmp_path, how, capsys):
    before = _digests(shipped_copy)
    code = main(["--dataset", "NUAA-SIRST", "--data-root", str(tmp_path / "data"), *SMALL, *how])
    err = capsys.readouterr().err
    assert code == 2, err
    assert _digests(shipped_copy) == before
    assert "is the NUAA-SIRST model shipped with this project" in err and "--out runs/NUAA-SIRST" in err, err
    assert "--overwrite" not in err, "the message never suggests replacing the shipped model"


def _stop_at_call(n: int):
    """dconet_loss that raises KeyboardInterrupt (a Ctrl-C) at its n-th call, counted afresh for each run."""
    real, calls = engine.dconet_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return loss


def _purges(path: Path) -> list[int]:
    """The iterations at which an event file tells TensorBoard to drop what earlier files logged."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    return [e.step for e in EventFileLoader(str(path)).Load()
            if e.HasField("session_log") and e.session_log.status == e.session_log.START]


def _train_steps(path: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    return [e.step for e in EventFileLoader(str(path)).Load()
            if any(v.tag == "train/loss" for v in e.summary.value)]


def _first_time(path: Path) -> float:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    return next(iter(EventFileLoader(str(path)).Load())).wall_time


def test_an_interrupted_run_logs_where_and_prints_the_command_that_goes_on(data_root, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    args = ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), *SMALL, "--epochs", "2", "--log-every", "1"]

    monkeypatch.setattr(engine, "dconet_loss", _stop_at_call(2))     # 2 iterations per epoch: in the first one
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith(f"no checkpoint was written; start again (in the same folder) with: python run_0.py "
                                f"--config {out / 'config.json'}"), err
    assert "interrupted in epoch 1/2 (iteration 1 read last); no epoch had finished" in (out / "log.txt").read_text()

    monkeypatch.setattr(engine, "dconet_loss", _stop_at_call(4))     # started again in place; stopped in epoch 2
    assert main(args) == 130
    err = capsys.readouterr().err
    command = f"python run_0.py --out {out} --data-root {data_root} --resume"
    assert err.strip().endswith(f"{out / 'latest.pkl'} holds the last finished epoch; continue with: {command}"), err
    log = (out / "log.txt").read_text()
    assert "interrupted in epoch 2/2 (iteration 3 read last); latest.pkl holds epoch 1" in log

    monkeypatch.setattr(engine, "dconet_loss", dconet_loss)
    assert main(shlex.split(command)[2:]) == 0                      # the printed command, as printed
    assert "done: best mIoU" in (out / "log.txt").read_text()

    # every attempt's event file is kept, and begins with a purge at the iteration the attempt started from
    files = sorted(out.glob("events.out.tfevents.*"), key=_first_time)
    assert [_purges(f) for f in files] == [[0], [0], [2]]
    assert [_train_steps(f) for f in files] == [[1], [1, 2, 3], [3, 4]]   # iteration 3 twice: the last one counts
