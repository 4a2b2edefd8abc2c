"""torchrun and the devices: LOCAL_RANK against the GPUs, validation of one model over ranks, the logged loss as
the mean over ranks, resuming a run saved with any number of GPUs or processes (the schedule continuous),
--sync-bn, and several nodes that share no folder."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import DCONet, DCONetConfig, deploy, load_checkpoint
from run_0 import main
from utils.data.datasets import build_datasets
from utils.data.synthetic_sets import read_marker, write_dataset
from utils.train import distributed as dist_utils
from utils.train.engine import evaluate
from utils.train.run_dir import rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[2]


def test_a_local_rank_beyond_the_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 but this machine has 1 GPU.*--nproc_per_node 1"):
        dist_utils.init_distributed("cuda")


class _OneGPU:
    """torch.cuda's RNG functions as on a machine with one GPU: ordinal 1 and up is invalid."""

    def __init__(self):
        self.restored = {}

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.restored[index] = state.clone()

    def set_rng_state_all(self, states):
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


def test_a_run_saved_on_eight_gpus_resumes_on_one_and_on_the_cpu(monkeypatch):
    random.seed(3)
    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]   # as saved by 8 GPUs
    expected = random.random()

    gpu = _OneGPU()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", gpu.set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", gpu.set_rng_state_all)
    set_rng_state(state)                                   # one GPU: it takes rank 0's state back
    assert random.random() == expected
    assert list(gpu.restored) == [0] and torch.equal(gpu.restored[0], state["cuda"][0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    set_rng_state(state)                                   # the CPU: the CUDA states are not needed
    assert random.random() == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _torchrun(script: str, *args: str) -> None:
    """``torchrun --nproc_per_node 2 tests/train/SCRIPT ARGS`` on this machine (two gloo ranks on the CPU); it must
    end well."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(REPO / "tests" / "train" / script),
               *args]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _tiny_run(tmp_path: Path, n_test: int) -> tuple[Path, Path, list[str]]:
    """A set of 8 training and ``n_test`` test images of 32x32 under tmp_path/data, and the arguments of a K = 1
    run on it at batch 2 into tmp_path/run: (data root, run folder, arguments)."""
    root, out = tmp_path / "data", tmp_path / "run"
    write_dataset(root, "tiny", n_trainval=8, n_test=n_test, size=32, seed=3)
    return root, out, ["--dataset", "tiny", "--data-root", str(root), "--out", str(out), "--batch-size", "2",
                       "--base-size", "32", "--stage-num", "1", "--vis-images", "0", "--device", "cpu"]


@pytest.mark.slow
def test_validation_under_two_ranks_scores_rank_0s_model_and_logs_the_mean_loss(tmp_path):
    root, out, args = _tiny_run(tmp_path, n_test=6)
    _torchrun("_ddp_validation_worker.py", *args)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    model = DCONet(DCONetConfig(stage_num=1))
    model.load_state_dict(torch.load(out / "rank0.pt", weights_only=True))
    val = build_datasets(root, "tiny", base_size=32, augment=False).val
    alone = evaluate(deploy(model), val, device=torch.device("cpu"))
    assert ranks[0]["scores"] == ranks[1]["scores"] == pytest.approx(alone, rel=1e-6, abs=1e-9)

    for rank in ranks:            # rank r's parts were (1, 2, 4) * (r + 1): the mean over ranks is 1.5x
        step, parts = rank["parts"][0]
        assert step == 7 and parts == {"loss": 1.5, "soft_iou": 3.0, "mse": 6.0, "lr": 0.5}


_TRAIN_LINE = re.compile(r"epoch (\d+)/(\d+) iter (\d+)/(\d+) \(total \d+/\d+\) - .* - lr (\S+) - ")


@pytest.mark.slow
def test_a_run_resumed_with_another_number_of_ranks_continues_its_schedule(tmp_path):
    _, out, args = _tiny_run(tmp_path, n_test=2)
    args += ["--lr", "1e-3", "--epochs", "4", "--log-every", "1", "--save-iter-step", "0"]
    # two ranks train 2 of the 4 epochs at 2 iterations each, then one process the other 2 at 4 iterations each
    _torchrun("_ddp_worker.py", "--stop-after", "2", *args)
    assert main([*args, "--resume"]) == 0

    log = (out / "log.txt").read_text()
    lines = [[float(v) for v in m.groups()] for m in _TRAIN_LINE.finditer(log)]
    epochs_seen = [(epoch, per_epoch) for epoch, _, _, per_epoch, _ in lines]
    assert epochs_seen == [(1, 2)] * 2 + [(2, 2)] * 2 + [(3, 4)] * 4 + [(4, 4)] * 4
    for epoch, epochs, step, per_epoch, lr in lines:          # each step used lr(fraction of the run done before it)
        done = (epoch - 1 + (step - 1) / per_epoch) / epochs
        assert lr == pytest.approx(1e-3 * (1 - done) ** 0.9, rel=1e-3), (epoch, step)
    assert "2 -> 4 iterations per epoch (saved by 2 process(es), resumed by 1)" in log
    assert "count rescaled 4 -> 8 of 16" in log
    state = load_checkpoint(out / "latest.pkl")["train_state"]
    assert state["global_step"] == 4 + 8 and state["scheduler"]["last_epoch"] == 16
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0          # the run ends at lr 0


# ---------------------------------------------------------------------------------------------------------
# --sync-bn: the statistics of every rank's batch, for every BatchNorm, MDCR's shared one included
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_synchronised_batch_norm_computes_that_of_the_whole_batch(tmp_path):
    _torchrun("_sync_bn_worker.py", str(tmp_path))
    sys.path.insert(0, str(REPO / "tests" / "train"))
    try:
        from _sync_bn_worker import SHARES, batch
    finally:
        sys.path.remove(str(REPO / "tests" / "train"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    whole = batch()                      # one process over the whole batch, as nn.BatchNorm2d in training
    x = whole["x"].clone().requires_grad_(True)
    weight, bias = whole["weight"].clone().requires_grad_(True), whole["bias"].clone().requires_grad_(True)
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    (y * whole["r"]).sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    for rank, share in zip(ranks, SHARES):
        torch.testing.assert_close(rank["y"], y[share].detach(), **close)
        torch.testing.assert_close(rank["grad_x"], x.grad[share], **close)
        torch.testing.assert_close(rank["mean"], whole["x"].mean(dim=(0, 2, 3)), **close)
        torch.testing.assert_close(rank["var"], whole["x"].var(dim=(0, 2, 3)), **close)      # unbiased
    # weight and bias: each rank's share; DistributedDataParallel sums them (and divides by the ranks)
    torch.testing.assert_close(ranks[0]["grad_weight"] + ranks[1]["grad_weight"], weight.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_bias"] + ranks[1]["grad_bias"], bias.grad, **close)


@pytest.mark.slow
def test_sync_bn_under_two_ranks_takes_every_batchnorms_statistics_over_the_whole_batch(data_root, tmp_path):
    args = ["--dataset", "tiny", "--data-root", str(data_root), "--base-size", "32", "--stage-num", "2",
            "--epochs", "1", "--save-iter-step", "0", "--vis-images", "0", "--device", "cpu"]
    # one step over the 8 images: two ranks of 4 each, and one process with all 8
    _torchrun("_ddp_worker.py", *args, "--out", str(tmp_path / "ranks"), "--batch-size", "4", "--sync-bn")
    assert main([*args, "--out", str(tmp_path / "alone"), "--batch-size", "8"]) == 0
    ranks, alone = (load_checkpoint(tmp_path / name / "latest.pkl")["model"] for name in ("ranks", "alone"))
    statistics = [key for key in alone if "running_" in key]
    assert any(".mix.norm." in key for key in statistics) and len(statistics) > 20
    for key in statistics:
        torch.testing.assert_close(ranks[key], alone[key], rtol=1e-4, atol=1e-5, msg=lambda text: f"{key}: {text}")


# ---------------------------------------------------------------------------------------------------------
# Several machines: two torchrun agents ("nodes") on this one, each in its own folder, nothing shared
# ---------------------------------------------------------------------------------------------------------

def _two_nodes(tmp_path: Path, *args: str) -> None:
    """run_0.py under two torchrun agents (--nnodes 2, one process each, rendezvous on localhost), each started in
    its own folder with the same relative --data-root and --out: nothing on disk is shared between them."""
    port = str(_free_port())
    agents = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir(exist_ok=True)
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
             str(node), "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "run_0.py"), *args],
            cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_two_nodes_without_a_shared_folder_train_and_resume(tmp_path):
    args = ["--dataset", "demo", "--data-root", "datasets", "--out", "run", "--base-size", "32", "--stage-num", "1",
            "--batch-size", "32", "--lr", "1e-3", "--save-iter-step", "0", "--vis-images", "0", "--device", "cpu"]
    _two_nodes(tmp_path, *args, "--epochs", "1")
    for node in (0, 1):                                      # each node wrote the demo set for itself
        assert read_marker(tmp_path / f"node{node}" / "datasets" / "demo") is not None, node
    run = tmp_path / "node0" / "run"
    assert load_checkpoint(run / "latest.pkl")["train_state"]["global_step"] == 4      # 256 images / (2 x 32)
    assert not (tmp_path / "node1" / "run").exists()      # the run folder is rank 0's, on node 0

    _two_nodes(tmp_path, *args, "--epochs", "2", "--resume")      # node 1 has no latest.pkl: rank 0 sends it
    state = load_checkpoint(run / "latest.pkl")["train_state"]
    assert (state["epoch"], state["global_step"], state["world_size"]) == (2, 8, 2)
    assert "resumed after epoch 1 (iteration 4)" in (run / "log.txt").read_text()
    assert not (tmp_path / "node1" / "run").exists()
