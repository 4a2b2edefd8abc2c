"""On a CUDA GPU: the reference parity (both --kernels settings), the deploy form, training that runs on the GPU
and learns, resume, mixed precision (fp16 with loss scaling and bf16), channels_last, --compile, the release
pipeline, and DistributedDataParallel with NCCL where two GPUs are present.

Skipped where PyTorch sees no GPU (CI); ``benchmarks/gpu_check.sh`` runs them on a machine that has one. The parity
tests run in strict float32 (``RuntimeOptions.strict_float32``: no TF32), so the CPU's tolerances apply.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch

import cal_from_mask
import t_models
from conftest import EVAL_ATOL, GRAD_RTOL, REPO, TRAIN_ATOL, perturbed_model, shared_path
from model import DCONet, deploy, from_release_state_dict, load_checkpoint
from model.deploy import BF16_T_RTOL
from model.release import release_gradients
from run_0 import main as train_main
from utils.io.runtime import RuntimeOptions
from utils.data.synthetic_sets import write_dataset
from utils.train.config import parse_command_line
from utils.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU")


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    device, _ = RuntimeOptions(device="cuda", strict_float32=True).setup()
    yield device
    RuntimeOptions(device="cuda").setup()       # the default again (TF32 convolutions) for the training tests


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, "tiny", n_trainval=16, n_test=4, size=64, seed=3)
    return root


class _StopBeforeEpoch4(Trainer):
    """Stops as an interrupted run would: after epoch 3's latest.pkl, before epoch 4's."""

    def validate(self, epoch: int) -> dict:
        if epoch == 4:
            raise KeyboardInterrupt
        return super().validate(epoch)


def _train(data_root, out, *extra: str, kind: type = Trainer) -> Trainer:
    """A short run on the GPU (TF32 convolutions, the default) through the Trainer; returns it after fit."""
    config, given = parse_command_line(["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out),
                                        "--batch-size", "4", "--base-size", "64", "--stage-num", "2", "--lr",
                                        "1e-3", "--log-every", "2", "--device", "cuda", *extra])
    trainer = kind(config, given)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def _epoch_losses(out) -> list[float]:
    return [float(m) for m in re.findall(r"epoch \d+/\d+ done - loss ([0-9.]+)", (out / "log.txt").read_text())]


def test_eval_outputs_match_the_release_on_the_gpu(reference, cuda, kernels):
    model = from_release_state_dict(reference["state_dict"]).to(cuda).eval().use_kernels(kernels)
    with torch.no_grad():
        D, T = model(reference["input"].to(cuda))
    assert (D.cpu() - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T.cpu() - reference["eval"]["T"]).abs().max() < EVAL_ATOL
    deployed = deploy(model)
    D2, T2 = deployed(reference["input"].to(cuda))
    assert (T2 - T).abs().max() < 1e-4 and (D2 - D).abs().max() < 1e-4
    _, T3 = deploy(model, bf16=True)(reference["input"].to(cuda))
    assert (T3.float() - T).abs().max() < BF16_T_RTOL * T.abs().max()


def test_training_forward_and_gradients_match_the_release_on_the_gpu(reference, cuda, kernels):
    model = from_release_state_dict(reference["state_dict"]).to(cuda).train().use_kernels(kernels)
    x = reference["input"].to(cuda)
    D, T = model(x)
    assert (T.detach().cpu() - reference["train"]["T"]).abs().max() < TRAIN_ATOL
    loss = torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()
    loss.backward()
    grads = release_gradients(model)
    for name, expected in reference["grads"].items():
        got = grads[name].cpu()
        assert ((got - expected).norm() / expected.norm()).item() < GRAD_RTOL, name


def test_the_kernels_on_the_gpu_compute_the_plain_forward_and_gradients(cuda):
    model = perturbed_model(2).to(cuda).train()
    x = torch.rand(2, 1, 64, 64, device=cuda)
    results = []
    for kernels in (False, True):
        model.use_kernels(kernels).zero_grad()
        D, T = model(x)
        (torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()).backward()
        results.append((T.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (T0, g0), (T1, g1) = results
    assert (T1 - T0).abs().max() < TRAIN_ATOL
    for name, grad in g0.items():
        assert ((g1[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item() < GRAD_RTOL, name


def test_training_runs_on_the_gpu_learns_and_resumes(data_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(data_root, out, "--epochs", "5", kind=_StopBeforeEpoch4)
    assert load_checkpoint(out / "latest.pkl")["train_state"]["epoch"] == 3
    trainer = _train(data_root, out, "--epochs", "5", "--resume")
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert all(b.is_cuda for b in trainer.model.buffers())
    assert trainer.optimizer.param_groups[0]["fused"]
    assert all(s["exp_avg"].is_cuda for s in trainer.optimizer.state.values())
    losses = _epoch_losses(out)            # epochs 1-4, then 4-5 after the resume
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    log = (out / "log.txt").read_text()
    assert "GPU memory peak" in log and "resumed after epoch 3" in log and "epoch 5/5 done" in log
    assert load_checkpoint(out / "latest.pkl")["train_state"]["epoch"] == 5


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mixed_precision_steps(data_root, tmp_path, dtype):
    if dtype == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is emulated on this GPU")
    out = tmp_path / dtype
    trainer = _train(data_root, out, "--epochs", "2", "--amp", "--amp-dtype", dtype)
    assert trainer.scaler.is_enabled() == (dtype == "fp16")
    if dtype == "fp16":
        assert trainer.scaler.get_scale() > 0
    losses = _epoch_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses))
    stats = [b for n, b in trainer.model.named_buffers() if n.endswith("running_mean")]
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in stats)


def test_channels_last_trains(data_root, tmp_path):
    out = tmp_path / "cl"
    _train(data_root, out, "--epochs", "2", "--memory-format", "channels_last")
    losses = _epoch_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_compile_takes_a_step(data_root, tmp_path):
    out = tmp_path / "compiled"
    trainer = _train(data_root, out, "--epochs", "1", "--batch-size", "16", "--compile")
    assert trainer.progress["global_step"] == 1 and len(_epoch_losses(out)) == 1


def test_run_0_on_the_gpu_exits_0(data_root, tmp_path):
    out = tmp_path / "script"
    assert train_main(["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--epochs", "1",
                       "--batch-size", "8", "--base-size", "64", "--stage-num", "2", "--device", "cuda"]) == 0
    assert "done: best mIoU" in (out / "log.txt").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DistributedDataParallel with NCCL needs two GPUs")
def test_two_nccl_ranks_hold_identical_weights(data_root, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "tests" / "train" / "_ddp_worker.py"),
               "--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--epochs", "2",
               "--batch-size", "4", "--base-size", "64", "--stage-num", "2", "--device", "cuda", "--sync-bn"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in (0, 1))
    for key, value in rank0.items():
        if "num_batches" in key or (".mix.norm." in key and "running" in key):
            continue    # MDCR's shared BatchNorm takes its statistics functionally, per rank
        assert torch.allclose(value, rank1[key], atol=1e-6), key    # SyncBatchNorm: the other statistics too
    assert load_checkpoint(out / "latest.pkl")["train_state"]["global_step"] == 4     # 16 images / (2 x 4)


def test_the_release_pipeline_on_the_gpu(tmp_path, capsys):
    case = shared_path("reference", "pipeline_nuaa")
    split = shared_path("data", "NUAA-SIRST", "test")
    expected = json.loads((case / "expected.json").read_text())
    out = tmp_path / "results"
    assert t_models.main(["--input", str(split / "images"), "--weights", str(case / "weights_release.pkl"),
                          "--out", str(out), "--device", "cuda", "--strict-float32", "--no-progress"]) == 0
    if (case / "release_T.npz").is_file():         # (a machine that holds the maps too; the numbers suffice)
        release_T = np.load(case / "release_T.npz")
        worst = max(float(np.abs(scipy.io.loadmat(str(out / "mat" / f"{s}.mat"))["T"] - release_T[s]).max())
                    for s in release_T.files)
        print(f"max |T - T_release| on the GPU: {worst:.2e}")
        assert worst <= 2e-4
    assert cal_from_mask.main(["--pred-dir", str(out / "mat"), "--mask-dir", str(split / "masks"), "--protocol",
                               "paper", "--out", str(tmp_path / "eval")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("paper, as the release prints:"))
    for key, value in expected["expected_paper_protocol"].items():
        printed = float(line.split(f" {key} ")[1].split()[0])
        assert printed == pytest.approx(value, abs=5e-9 if key == "Fa" else 5e-7), (key, line)


def test_the_model_moves_between_devices(cuda):
    torch.manual_seed(0)
    model = DCONet().eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        T_cpu = model(x)[1]
        T_gpu = model.to(cuda)(x.to(cuda))[1].cpu()
    assert (T_cpu - T_gpu).abs().max() < 1e-3 * max(1.0, T_cpu.abs().max().item())
