"""The GPU path: the reference parity (both --kernels settings), the deploy form, training that runs on the device
and learns, resume, mixed precision (fp16 with loss scaling and bf16), channels_last, --compile, the release
pipeline, and DistributedDataParallel with NCCL where two GPUs are present.

Every test runs on the CPU with the GPU's code paths forced (``forced_gpu_paths``: the kernels' GPU forms, fused
Adam, fp16 autocast with a GradScaler, pinned memory and persistent DataLoader workers, the GPU set-up's flags),
and again on CUDA where PyTorch sees a GPU, with the same assertions; only NCCL needs two GPUs. One test trains
between log lines with every wait of the host for the device an error (on CUDA the runtime's sync debug mode, on
the CPU every read of a tensor's value back to the host). ``benchmarks/gpu_check.sh`` runs
this module on a GPU machine (and, with ``--dry-run``, on the CPU). The parity tests run in strict float32
(``RuntimeOptions.strict_float32``: no TF32), so the CPU's tolerances apply.
"""
from __future__ import annotations

import copy
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
from conftest import CL_TRAIN_ATOL, EVAL_ATOL, GRAD_RTOL, REPO, TRAIN_ATOL, perturbed_model, shared_path
from model import DCONet, DCONetConfig, deploy, from_release_state_dict, load_checkpoint
from model.deploy import BF16_T_RTOL
from model.release import release_gradients
from run_0 import main as train_main
from utils.data.synthetic_sets import write_dataset
from utils.io.runtime import RuntimeOptions, forced_gpu_paths
from utils.train import engine
from utils.train.config import TrainConfig, parse_command_line
from utils.train.ema import WeightAverage
from utils.train.losses import dconet_loss
from utils.train.loop import Trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The pinned-memory request of the GPU paths, on a machine without an accelerator, is noted and dropped.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs on: the CPU taking the GPU's code paths, and CUDA where present."""
    if request.param == "cuda":
        yield torch.device("cuda")
        return
    with forced_gpu_paths():
        yield torch.device("cpu")


@pytest.fixture
def strict(device) -> torch.device:
    """``device``, set up in strict float32 for this test alone (no TF32, whatever ran before)."""
    device, _ = RuntimeOptions(device=device.type, strict_float32=True).setup()
    return device


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """16 training and 4 test images of 64x64. (At 32x32 the bottleneck holds one position: its BatchNorm then
    normalises 4 values a channel, which makes gradients ill-conditioned (2% apart between two layouts at the
    first step), and the CPU's float16 autocast, which unlike CUDA's leaves norms in float16, divides 0 by 0 in
    the attention there.)"""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, "tiny", n_trainval=16, n_test=4, size=64, seed=3)
    return root


class _StopBeforeEpoch4(Trainer):
    """Stops as an interrupted run would: after epoch 3's latest.pkl, before epoch 4's."""

    def validate(self, epoch: int, epoch_end: bool = False) -> dict:
        if epoch == 4:
            raise KeyboardInterrupt
        return super().validate(epoch, epoch_end)


def _arguments(data_root, out, device, *extra: str) -> list[str]:
    return ["--dataset", "tiny", "--data-root", str(data_root), "--out", str(out), "--batch-size", "4",
            "--base-size", "64", "--stage-num", "2", "--lr", "1e-3", "--log-every", "2", "--vis-images", "0",
            "--device", device.type, *extra]


def _trainer(data_root, out, device, *extra: str, kind: type = Trainer) -> Trainer:
    """A Trainer for a short run on ``device`` (TF32 convolutions on CUDA, the default), not yet fitted."""
    return kind(*parse_command_line(_arguments(data_root, out, device, *extra)))


def _train(data_root, out, device, *extra: str, kind: type = Trainer) -> Trainer:
    """A short run through the Trainer; returns it after fit."""
    trainer = _trainer(data_root, out, device, *extra, kind=kind)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def _epoch_losses(out) -> list[float]:
    return [float(m) for m in re.findall(r"epoch \d+/\d+ done - loss ([0-9.]+)", (out / "log.txt").read_text())]


def _assert_on(device: torch.device, *tensors: torch.Tensor) -> None:
    assert tensors and all(t.device.type == device.type for t in tensors), {t.device for t in tensors}


def assert_gradients_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                           rtol: float = GRAD_RTOL, floor: float = 1e-3) -> None:
    """The whole gradient within ``rtol`` of its norm, and each tensor's within ``rtol`` of its own norm, taken as
    at least ``floor`` times the whole gradient's: the biases before a training-mode BatchNorm (about 50 tensors)
    have a true gradient of zero, and what both runs hold there is rounding noise (1e-11 to 1e-5), which a
    comparison relative to itself cannot judge."""
    whole = torch.cat([g.flatten() for g in expected.values()])
    difference = torch.cat([(got[name] - g).flatten() for name, g in expected.items()])
    assert difference.norm() < rtol * whole.norm(), f"whole gradient: {difference.norm() / whole.norm():.2e}"
    for name, g in expected.items():
        error, scale = (got[name] - g).norm(), torch.maximum(g.norm(), floor * whole.norm())
        assert error < rtol * scale, f"{name}: |difference| {error:.2e}, |gradient| {g.norm():.2e}, " \
                                     f"whole {whole.norm():.2e}"


# ----------------------------------------------------------------------------------------------------------
# Parity in strict float32
# ----------------------------------------------------------------------------------------------------------

def test_eval_outputs_match_the_release_on_the_gpu(reference, strict, kernels):
    model = from_release_state_dict(reference["state_dict"]).to(strict).eval().use_kernels(kernels)
    with torch.no_grad():
        D, T = model(reference["input"].to(strict))
    _assert_on(strict, D, T)
    assert (D.cpu() - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T.cpu() - reference["eval"]["T"]).abs().max() < EVAL_ATOL
    deployed = deploy(model)
    D2, T2 = deployed(reference["input"].to(strict))
    _assert_on(strict, D2, T2, *deployed.model.parameters())
    assert (T2 - T).abs().max() < 1e-4 and (D2 - D).abs().max() < 1e-4
    _, T3 = deploy(model, bf16=True)(reference["input"].to(strict))
    assert (T3.float() - T).abs().max() < BF16_T_RTOL * T.abs().max()


def test_training_forward_and_gradients_match_the_release_on_the_gpu(reference, strict, kernels):
    model = from_release_state_dict(reference["state_dict"]).to(strict).train().use_kernels(kernels)
    x = reference["input"].to(strict)
    D, T = model(x)
    assert (T.detach().cpu() - reference["train"]["T"]).abs().max() < TRAIN_ATOL
    loss = torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()
    loss.backward()
    grads = release_gradients(model)
    _assert_on(strict, D, T, *grads.values())
    for name, expected in reference["grads"].items():
        got = grads[name].cpu()
        assert ((got - expected).norm() / expected.norm()).item() < GRAD_RTOL, name


def test_the_kernels_on_the_gpu_compute_the_plain_forward_and_gradients(strict):
    model = perturbed_model(2).to(strict).train()
    x = torch.rand(2, 1, 64, 64, device=strict)
    results = []
    for kernels in (False, True):
        model.use_kernels(kernels).zero_grad()
        D, T = model(x)
        (torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()).backward()
        results.append((T.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (T0, g0), (T1, g1) = results
    _assert_on(strict, T0, T1, *g1.values())
    assert (T1 - T0).abs().max() < TRAIN_ATOL
    assert_gradients_close(g1, g0)


def test_the_model_moves_between_devices(strict):
    assert not (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32), "not strict float32"
    torch.manual_seed(0)
    model = DCONet().eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        T_cpu = model(x)[1]
        T_device = model.to(strict)(x.to(strict))[1]
    _assert_on(strict, T_device, *model.parameters(), *model.buffers())
    assert (T_cpu - T_device.cpu()).abs().max() < 1e-3 * max(1.0, T_cpu.abs().max().item())
    model.cpu()
    _assert_on(torch.device("cpu"), *model.parameters(), *model.buffers())


# ----------------------------------------------------------------------------------------------------------
# Training (TF32 convolutions on CUDA, the default)
# ----------------------------------------------------------------------------------------------------------

def test_training_runs_on_the_gpu_learns_and_resumes(data_root, tmp_path, device):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _train(data_root, out, device, "--epochs", "5", kind=_StopBeforeEpoch4)
    assert load_checkpoint(out / "latest.pkl")["train_state"]["epoch"] == 3
    trainer = _train(data_root, out, device, "--epochs", "5", "--resume")
    _assert_on(device, *trainer.model.parameters(), *trainer.model.buffers(),
               *(s["exp_avg"] for s in trainer.optimizer.state.values()))
    assert trainer.optimizer.param_groups[0]["fused"]
    assert trainer.loader.pin_memory and trainer.loader.num_workers == 2 and trainer.loader.persistent_workers
    losses = _epoch_losses(out)            # epochs 1-4, then 4-5 after the resume
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    log = (out / "log.txt").read_text()
    assert "resumed after epoch 3" in log and "epoch 5/5 done" in log
    assert ("GPU memory peak" in log) == (device.type == "cuda")
    assert load_checkpoint(out / "latest.pkl")["train_state"]["epoch"] == 5


@pytest.mark.parametrize("dtype", [pytest.param("fp16", marks=pytest.mark.slow), "bf16"])    # CPUs: slow float16
def test_mixed_precision_steps(data_root, tmp_path, device, dtype):
    if device.type == "cuda" and dtype == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 is emulated on this GPU")
    out = tmp_path / dtype
    trainer = _trainer(data_root, out, device, "--epochs", "2", "--amp", "--amp-dtype", dtype, "--stage-num", "1")
    computed = set()            # the dtypes that the convolutions called as modules computed in, in training

    def hook(module, inputs, output):
        if module.training:
            computed.add(output.dtype)
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(hook)
    scales = []                 # the loss scale after each step: a step skipped for overflow halves it
    update = trainer.scaler.update
    trainer.scaler.update = lambda *args: (update(*args), scales.append(trainer.scaler.get_scale()))
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert computed == {torch.float16 if dtype == "fp16" else torch.bfloat16}
    steps = trainer.progress["global_step"]
    taken = int(next(iter(trainer.optimizer.state.values()))["step"])      # Adam counts the steps it took
    assert trainer.scaler.is_enabled() == (dtype == "fp16")
    if dtype == "fp16":
        assert len(scales) == steps == 8
        assert steps - taken == sum(b < a for a, b in zip([65536.0] + scales, scales)), scales   # each halved it
        assert all(b >= a for a, b in zip(scales[3:], scales[4:])), scales     # no step skipped after the 4th
    else:
        assert taken == steps == 8 and not scales
    losses = _epoch_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    stats = [b for n, b in trainer.model.named_buffers() if n.endswith("running_mean")]
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in stats)


def _first_step(trainer: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T and the gradients of a training step on the first four training images, taken on a copy of the
    trainer's model (the run itself is left as it was)."""
    model = copy.deepcopy(trainer.model).train()
    images = torch.stack([trainer.data.train[i]["image"] for i in range(4)]).to(trainer.device)
    masks = torch.stack([trainer.data.train[i]["mask"] for i in range(4)]).to(trainer.device)
    D, T = model(images)
    dconet_loss(D, T, images, masks)[0].backward()
    return T.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_channels_last_trains_as_the_contiguous_layout_does(data_root, tmp_path, device):
    runs = {}
    for layout in ("contiguous", "channels_last"):
        trainer = _trainer(data_root, tmp_path / layout, device, "--epochs", "2", "--memory-format", layout,
                           "--strict-float32")
        first = _first_step(trainer)
        held = []           # per training activation of several channels and pixels: stored (N, H, W, C)?

        def hook(module, inputs, output):
            if module.training and output.shape[1] > 1 and output.shape[-2:].numel() > 1:
                held.append(output.is_contiguous(memory_format=torch.channels_last))
        for module in trainer.model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                module.register_forward_hook(hook)
        try:
            trainer.fit()
        finally:
            trainer.close()
        assert held and all(held) == any(held) == (layout == "channels_last"), layout
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in trainer.model.parameters()
                   if p.dim() == 4) == (layout == "channels_last")
        runs[layout] = first, _epoch_losses(tmp_path / layout)
    ((T, grads), losses), ((T_cl, grads_cl), losses_cl) = runs["contiguous"], runs["channels_last"]
    _assert_on(device, T_cl, *grads_cl.values())
    assert (T_cl - T).abs().max() < CL_TRAIN_ATOL * max(1.0, T.abs().max().item())
    assert_gradients_close(grads_cl, grads, floor=1e-2)   # channels_last BatchNorm: ~10x the rounding
    assert len(losses_cl) == 2 and losses_cl[-1] < losses_cl[0], losses_cl
    assert losses_cl[0] == pytest.approx(losses[0], rel=2e-3)       # later, the runs' rounding has grown apart


@pytest.mark.slow
def test_the_compiled_step_equals_eager(data_root, tmp_path, device):
    results = []
    for compiled in (False, True):
        # one step of 16 images: no partial batch, so the compiled graph serves the whole run
        # strict float32: on CUDA the two runs' TF32 roundings would differ more than compiling changes
        trainer = _train(data_root, tmp_path / str(compiled), device, "--epochs", "1", "--batch-size", "16",
                         "--stage-num", "1", "--strict-float32", *(["--compile"] if compiled else []))  # K = 1: faster
        assert trainer.progress["global_step"] == 1 and len(_epoch_losses(tmp_path / str(compiled))) == 1
        assert (trainer.net is not trainer.model) == compiled
        results.append((_epoch_losses(tmp_path / str(compiled))[0],
                        {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}))
    (loss, grads), (loss_compiled, grads_compiled) = results
    _assert_on(device, *grads_compiled.values())
    assert loss_compiled == pytest.approx(loss, rel=1e-4)
    assert_gradients_close(grads_compiled, grads)


def test_run_0_on_the_gpu_exits_0(data_root, tmp_path, device):
    out = tmp_path / "script"
    assert train_main(_arguments(data_root, out, device, "--epochs", "1")) == 0
    log = (out / "log.txt").read_text()
    assert "done: best mIoU" in log and f"\"device\": \"{device.type}\"" in log


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")   # what waits for a GPU


class HostReads:
    """Refuses, while ``refuse(True)`` holds, every operation that makes the host wait for the device: on CUDA
    the runtime's own check (sync debug mode "error"); on the CPU, taking the GPU's paths, the tensor methods that
    read a value back to the host (``HOST_READS``), each of which would wait for a GPU."""

    def __init__(self, device: torch.device, monkeypatch):
        self.device, self.refusing = device, False
        if device.type != "cuda":
            for name in HOST_READS:
                monkeypatch.setattr(torch.Tensor, name, self._guarded(name, getattr(torch.Tensor, name)))

    def _guarded(self, name: str, method):
        def read(*args, **kwargs):
            if self.refusing:
                raise AssertionError(f"Tensor.{name} between log lines: the host would wait for the GPU")
            return method(*args, **kwargs)
        return read

    def refuse(self, on: bool) -> None:
        self.refusing = on
        if self.device.type == "cuda":        # put back after the test by conftest's restore_torch_flags too
            torch.cuda.set_sync_debug_mode("error" if on else 0)


def test_training_between_log_lines_does_not_wait_for_the_gpu(device, monkeypatch):
    """Between the steps that read the loss (log lines, the epoch's end), no operation of a training step, the
    moving average of the weights included, may synchronise the host with the GPU; the reads themselves may."""
    device, _ = RuntimeOptions(device=device.type).setup(fixed_sizes=True)
    config = TrainConfig(model=DCONetConfig(stage_num=2), lr=1e-3, ema=0.99)
    model, optimizer, scaler = engine.training_parts(config, device)
    average = WeightAverage(model, config.ema)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x = torch.rand(4, 1, 64, 64, device=device)
    batches = [{"image": x, "mask": (x > 0.99).float()}] * 5
    read, guard = engine.read_parts, HostReads(device, monkeypatch)

    def read_allowed(*args):              # a log line: here the host waits, as it must
        guard.refuse(False)
        try:
            return read(*args)
        finally:
            guard.refuse(True)

    read_steps = []
    options = dict(device=device, scaler=scaler, read_at=lambda step: step == 3,
                   on_step=lambda step, parts: read_steps.append(step), after_update=lambda: average.update(model))
    engine.train_one_epoch(model, batches[:1], optimizer, scheduler, **options)   # warm-up: allocator, cuDNN
    monkeypatch.setattr(engine, "read_parts", read_allowed)
    guard.refuse(True)
    try:
        stats = engine.train_one_epoch(model, batches, optimizer, scheduler, **options)
    finally:
        guard.refuse(False)
    assert read_steps == [1, 1, 2, 3, 4, 5] and stats["iterations"] == 5 and np.isfinite(stats["loss"])


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


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), *DEVICES[1:]], indirect=True)
def test_the_release_pipeline_on_the_gpu(tmp_path, capsys, device):
    case = shared_path("reference", "pipeline_nuaa")
    split = shared_path("data", "NUAA-SIRST", "test")
    expected = json.loads((case / "expected.json").read_text())
    out = tmp_path / "results"
    assert t_models.main(["--input", str(split / "images"), "--weights", str(case / "weights_release.pkl"),
                          "--out", str(out), "--device", device.type, "--strict-float32", "--no-progress"]) == 0
    if (case / "release_T.npz").is_file():         # (a machine that holds the maps too; the numbers suffice)
        release_T = np.load(case / "release_T.npz")
        worst = max(float(np.abs(scipy.io.loadmat(str(out / "mat" / f"{s}.mat"))["T"] - release_T[s]).max())
                    for s in release_T.files)
        print(f"max |T - T_release| on {device.type}: {worst:.2e}")
        assert worst <= 2e-4
    assert cal_from_mask.main(["--pred-dir", str(out / "mat"), "--mask-dir", str(split / "masks"), "--protocol",
                               "paper", "--out", str(tmp_path / "eval")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("paper, as the release prints:"))
    for key, value in expected["expected_paper_protocol"].items():
        printed = float(line.split(f" {key} ")[1].split()[0])
        assert printed == pytest.approx(value, abs=5e-9 if key == "Fa" else 5e-7), (key, line)
