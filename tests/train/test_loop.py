"""Training: recipe defaults, a short end-to-end run, resume after SIGKILL, non-finite loss, two gloo ranks."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import utils.train.engine as engine
from model import DCONet, DCONetConfig, deploy, load_checkpoint, load_model
from run_0 import main
from utils.train.config import DEMO_DEFAULTS, parse_command_line
from utils.data.datasets import build_datasets
from utils.train.losses import soft_iou_loss
from utils.train.run_dir import NonFiniteLoss, TrainingError
from utils.train.schedule import continue_schedule, poly_lr, poly_scheduler
from utils.data.synthetic_sets import write_dataset
import utils.train.loop as loop
from utils.train.loop import Trainer, fit, make_loader


def parse_config(argv):
    return parse_command_line(argv)[0]

REPO = Path(__file__).resolve().parents[2]


def _args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--batch-size", "4",
            "--base-size", "32", "--stage-num", "1", "--lr", "1e-3", "--vis-images", "2", "--device", "cpu", *extra]


def test_defaults_are_the_release_recipe():
    config = parse_config([])
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay, config.poly_power) == \
        (400, 8, 1e-4, 0, 0.9)
    assert (config.base_size, config.model.stage_num, config.model.channels, config.mse_weight, config.seed) == \
        (256, 5, 32, 0.1, 1)
    assert config.dataset == "IRSTD-1k" and not config.augment_enabled()
    assert config.save_iter_step == 100, "the release's run validates every 100 iterations"
    assert parse_config(["--dataset", "sirst_aug"]).augment_enabled()
    demo = parse_config(["--dataset", "demo", "--epochs", "3"])
    assert demo.epochs == 3 and demo.base_size == DEMO_DEFAULTS["base_size"]


def test_loss_and_schedule_follow_the_release():
    logits = torch.tensor([[[[10.0, -10.0], [-10.0, -10.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_iou_loss(logits, mask).item() == pytest.approx(0.0, abs=1e-4)
    # p = (0, 1, 1, 1): intersection 0, union 3 + 1 - 0 = 4, loss = 1 - (0 + 1) / (4 + 1)
    assert soft_iou_loss(-logits, mask).item() == pytest.approx(1 - 1 / 5, abs=1e-4)
    assert poly_lr(1e-4, 0, 100) == 1e-4 and poly_lr(1e-4, 100, 100) == 0
    assert poly_lr(1e-4, 50, 100) == pytest.approx(1e-4 * 0.5 ** 0.9)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-4)
    scheduler = poly_scheduler(optimizer, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(poly_lr(1e-4, 50, 100))


def test_short_run_writes_a_complete_run_folder(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "2")) == 0
    for name in ("best.pkl", "latest.pkl", "config.json", "log.txt"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["model"]["stage_num"] == 1
    latest = load_checkpoint(out / "latest.pkl")
    assert latest["train_state"]["epoch"] == 2 and latest["train_state"]["global_step"] == 4
    model, info = load_model(out / "best.pkl")
    assert info["kind"] == "project" and model.config.stage_num == 1
    assert set(load_checkpoint(out / "best.pkl")["meta"]["scores"]) >= {"mIoU", "nIoU", "Pd", "Fa", "F1"}
    log = (out / "log.txt").read_text()
    assert "validation epoch 2/2 iter 4" in log and "mIoU" in log
    assert load_checkpoint(out / "best.pkl")["meta"]["base_size"] == 32       # t_models.py exports at this size
    # an existing run is never overwritten silently
    assert main(_args(data_root, out, "--epochs", "2")) == 2
    assert load_checkpoint(out / "latest.pkl")["train_state"]["epoch"] == 2
    with pytest.raises(TrainingError, match="differ from the stored ones"):
        fit(parse_config(_args(data_root, out, "--resume", "--lr", "5e-4")), frozenset({"lr", "resume"}))


def test_validation_runs_the_folded_module_with_the_models_outputs(data_root):
    config = parse_config(_args(data_root, data_root / "unused"))
    assert config.memory_format == "contiguous" and not config.checkpointing
    test = build_datasets(data_root, "tiny", base_size=32, augment=False).test
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1)).set_channels_last(True)
    indices = list(range(len(test)))
    cpu = torch.device("cpu")
    deployed = engine.predict_logits(deploy(model), test, indices, device=cpu)
    plain = engine.predict_logits(model, test, indices, device=cpu)
    assert sorted(deployed) == indices
    for i in indices:
        assert deployed[i].shape == (32, 32) and np.allclose(deployed[i], plain[i], atol=1e-5), i


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_weights(data_root, tmp_path):
    epochs = "12"
    straight = tmp_path / "straight"
    assert main(_args(data_root, straight, "--epochs", epochs)) == 0

    broken = tmp_path / "broken"
    # the same number of threads as this process: float sums depend on it, and the weights must be bit-equal
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, str(REPO / "run_0.py"), *_args(data_root, broken, "--epochs", epochs)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if (broken / "latest.pkl").exists():
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed; give it more epochs"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    stopped_after = load_checkpoint(broken / "latest.pkl")["train_state"]["epoch"]
    assert 1 <= stopped_after < int(epochs)
    assert main(_args(data_root, broken, "--epochs", epochs, "--resume")) == 0

    a, b = load_checkpoint(straight / "latest.pkl"), load_checkpoint(broken / "latest.pkl")
    assert b["train_state"]["epoch"] == int(epochs)
    assert b["train_state"]["global_step"] == a["train_state"]["global_step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["meta"]["best_miou"] == b["meta"]["best_miou"]
    assert "resumed after epoch" in (broken / "log.txt").read_text()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    real_loss, calls = engine.dconet_loss, []

    def failing_loss(D, T, image, mask, *weights):
        calls.append(1)
        loss, parts = real_loss(D, T, image, mask, *weights)
        return (loss * float("nan"), parts) if len(calls) == 3 else (loss, parts)

    monkeypatch.setattr(engine, "dconet_loss", failing_loss)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="latest.pkl"):
        fit(parse_config(_args(data_root, out, "--epochs", "3")))
    state = load_checkpoint(out / "latest.pkl")["train_state"]
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "latest.pkl")["model"].values()
               if v.is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_weights(data_root, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(REPO / "tests" / "train" / "_ddp_worker.py"), *_args(data_root, out, "--epochs", "2", "--batch-size", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    for key, value in rank0.items():
        if "running" in key or "num_batches" in key:
            continue   # BatchNorm statistics are per process, as in DistributedDataParallel without SyncBN
        assert torch.equal(value, rank1[key]), key
    latest = load_checkpoint(out / "latest.pkl")
    assert latest["train_state"]["epoch"] == 2 and latest["train_state"]["global_step"] == 4  # 8 images / (2 x 2)
    for key, value in latest["model"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, rank0[key]), key
    log = (out / "log.txt").read_text()
    assert log.count("validation epoch 2/2 iter") == 1      # only rank 0 writes
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# The release's loop: last partial batch, validation every save_iter_step iterations
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    """10 trainval images: at batch 4, two full batches and one of 2."""
    root = tmp_path_factory.mktemp("odd")
    write_dataset(root, "tiny", n_trainval=10, n_test=2, size=32, seed=5)
    return root


def test_the_last_partial_batch_is_trained_and_counted(odd_root, tmp_path):
    config = parse_config(_args(odd_root, tmp_path / "run", "--epochs", "2"))
    splits = build_datasets(odd_root, "tiny", base_size=32)
    loader = make_loader(splits.train, config, train=True, epoch=0, info=engine.dist_utils.DistInfo(),
                         device=torch.device("cpu"))
    assert [len(batch["stem"]) for batch in loader] == [4, 4, 2]
    assert main(_args(odd_root, tmp_path / "run", "--epochs", "2")) == 0
    state = load_checkpoint(tmp_path / "run" / "latest.pkl")["train_state"]
    assert state["global_step"] == 6 and state["scheduler"]["last_epoch"] == 6     # the schedule counts all 6


@pytest.mark.slow
def test_compile_runs_the_full_and_the_last_smaller_batch_in_one_graph(odd_root, tmp_path, monkeypatch):
    # aot_eager: TorchDynamo and AOTAutograd as under inductor (the same graphs, guards and recompilations),
    # without inductor's code generation, which takes minutes on two CPU cores. --kernels plain: on the CPU the
    # speed kernels size their loops by the batch (one more graph for the last batch size, once per run); on GPUs
    # they do not.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    try:
        assert main(_args(odd_root, tmp_path / "run", "--epochs", "2", "--compile", "--kernels", "plain",
                          "--vis-images", "0")) == 0          # batches of 4, 4 and 2 in each epoch
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert graphs == 1 and not breaks, (graphs, breaks)


@pytest.mark.slow
def test_validation_every_save_iter_step_and_best_over_all(odd_root, tmp_path):
    out = tmp_path / "run"
    assert main(_args(odd_root, out, "--epochs", "2", "--save-iter-step", "2")) == 0
    log = (out / "log.txt").read_text()
    validated = [int(m) for m in re.findall(r"validation epoch \d/2 iter (\d+)", log)]
    assert validated == [2, 3, 4, 6]          # iterations 2 and 4 mid-epoch, 3 and 6 at the epochs' ends
    scores = [float(m) for m in re.findall(r"validation epoch \d/2 iter \d+ - mIoU ([\d.]+)", log)]
    best = load_checkpoint(out / "best.pkl")["meta"]
    assert best["best_step"] == validated[int(np.argmax(scores))]
    assert best["scores"]["mIoU"] == pytest.approx(max(scores), abs=5e-5)       # the log prints 4 decimals


def test_last_epoch_logs_the_learning_rate_it_used(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "1")) == 0
    line = next(l for l in (out / "log.txt").read_text().splitlines() if "epoch 1/1 done" in l)
    lr = float(line.split(" - lr ")[1].split()[0])
    assert lr > 0 and lr == pytest.approx(1e-3 * (1 - 1 / 2) ** 0.9, rel=1e-3)   # iteration 2 of 2 used lr(1)


class _GPUMemory:
    """torch.cuda's peak memory functions over allocations the test makes up (in GiB)."""

    def __init__(self):
        self.peak = 0

    def allocate(self, gib: float) -> None:
        self.peak = max(self.peak, int(gib * 2**30))

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = 0


def test_each_log_line_reports_the_gpu_memory_peak_of_its_own_window(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(parse_config(_args(data_root, out, "--epochs", "1", "--log-every", "1", "--vis-images", "0")))
    memory = _GPUMemory()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", memory.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", memory.reset_peak_memory_stats)

    def evaluate(*args, **kwargs):           # a validation whose peak is the highest of all
        memory.allocate(5)
        return dict.fromkeys(("mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1", "AUC"), 0.5)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    trainer.device = torch.device("cuda", 0)          # the log's GPU branch; nothing here computes on it
    on_step = trainer._on_step(1, None, {"t0": time.perf_counter(), "step0": 0})
    parts = {"loss": 1.0, "soft_iou": 0.9, "mse": 0.1, "lr": 1e-3}
    try:
        memory.allocate(3)
        on_step(1, parts)
        memory.allocate(1)
        on_step(2, parts)
        trainer.validate(1)
        memory.allocate(2)
        on_step(3, parts)
    finally:
        trainer.log.close()
        trainer.close()
    peaks = re.findall(r"iter \d/2 .* - GPU memory peak ([\d.]+) GiB$", (out / "log.txt").read_text(), re.MULTILINE)
    assert peaks == ["3.00", "1.00", "2.00"]


# ---------------------------------------------------------------------------------------------------------
# Interruptions, logs a redirected run shows, settings given back
# ---------------------------------------------------------------------------------------------------------

def test_a_start_stopped_before_any_checkpoint_restarts_in_place(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text("2026-01-01 00:00:00 start: {}\n")
    (out / "config.json").write_text("{}")
    assert main(_args(data_root, out, "--epochs", "1", "--resume")) == 2
    assert "without --resume" in capsys.readouterr().err
    assert main(_args(data_root, out, "--epochs", "1")) == 0
    log = (out / "log.txt").read_text()
    assert log.startswith("2026-01-01 00:00:00 start: {}\n") and "done: best mIoU" in log   # the old log kept

    (out / "latest.pkl").unlink()              # now: a best.pkl without latest.pkl, nothing to resume from
    assert main(_args(data_root, out, "--epochs", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(_args(data_root, out, "--epochs", "1", "--resume")) == 2
    assert "--overwrite instead of --resume" in capsys.readouterr().err
    assert main(_args(data_root, out, "--epochs", "1", "--overwrite")) == 0


def test_a_failed_start_leaves_no_empty_run_folder(data_root, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--dataset", "absent", "--data-root", str(data_root), "--out", str(out)]) == 2
    assert "absent" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_a_redirected_run_logs_progress_lines(data_root, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(tmp_path / "stdout.txt", "w") as stdout:
        result = subprocess.run([sys.executable, str(REPO / "run_0.py"),
                                 *_args(data_root, out, "--epochs", "1", "--log-every", "1")],
                                cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = (tmp_path / "stdout.txt").read_text()
    for text in (printed, (out / "log.txt").read_text()):
        assert "epoch 1/1 iter 1/2 (total 1/2) - loss" in text and "it/s - left: epoch" in text
        # each line time-stamped, on the console as in log.txt; Fa as a plain fraction ("Fa 3.30e-04")
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch 1/1 iter 1/2", text, re.MULTILINE), text[:300]
        assert re.search(r"validation epoch 1/1 iter 2 - .*, Fa \d\.\d\de[-+]\d\d,", text), text[-600:]
    assert "\r" not in printed + result.stderr, "a progress bar was drawn into redirected output"


def test_a_run_config_can_be_given_back(data_root, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "1", "--lr", "2e-3")) == 0
    again = parse_config(["--config", str(out / "config.json"), "--out", str(tmp_path / "again")])
    stored = parse_config(_args(data_root, out, "--epochs", "1", "--lr", "2e-3"))
    assert again.lr == 2e-3 and again.model == stored.model and again.out == str(tmp_path / "again")
    assert again.to_dict() | {"out": stored.out} == stored.to_dict()
    assert main(["--config", str(tmp_path / "missing.json")]) == 2


def test_extended_schedule_continues_over_the_new_total():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = poly_scheduler(optimizer, 10, 0.9)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0                     # a finished run: the lr has reached 0
    state, saved = scheduler.state_dict(), optimizer.state_dict()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(saved)
    scheduler = poly_scheduler(optimizer, 25, 0.9)                    # the same run, given more epochs
    scheduler.load_state_dict(state)
    assert continue_schedule(scheduler) == optimizer.param_groups[0]["lr"] == poly_lr(1e-3, 10, 25, 0.9)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(poly_lr(1e-3, 11, 25, 0.9), rel=1e-12)


@pytest.mark.slow
def test_resume_with_only_out_uses_the_recorded_settings_and_epochs_extend(data_root, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    assert main(_args(data_root, out, "--epochs", "2")) == 0
    monkeypatch.chdir(tmp_path)                       # no ./datasets here: the recorded --data-root must be used
    assert main(["--out", str(out), "--resume"]) == 0                                  # finished: nothing to do
    assert load_checkpoint(out / "latest.pkl")["train_state"]["global_step"] == 4
    assert main(["--out", str(out), "--resume", "--epochs", "3"]) == 0
    latest = load_checkpoint(out / "latest.pkl")
    assert (latest["train_state"]["epoch"], latest["train_state"]["global_step"]) == (3, 6)
    assert latest["train_state"]["config"]["epochs"] == 3
    assert latest["train_state"]["config"]["data_root"] == str(data_root)
    log = (out / "log.txt").read_text()
    lr = poly_lr(1e-3, 4, 6, 0.9)
    assert f"epochs 2 -> 3: the poly schedule continues over 6 iterations from iteration 4 (lr {lr:.3e} now)" in log
    capsys.readouterr()
    assert main(["--out", str(out), "--resume", "--epochs", "2"]) == 2
    assert f"--epochs 2: {out} has already trained 3 epochs; give a total of 3 or more" in capsys.readouterr().err
    assert main(["--out", str(out), "--resume", "--lr", "5e-4"]) == 2
    assert "lr=0.0005 (run: 0.001)" in capsys.readouterr().err
