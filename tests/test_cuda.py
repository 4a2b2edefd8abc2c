"""On a CUDA GPU: the reference parity, the deploy form, a training run and the release pipeline, on the GPU.

Skipped where PyTorch sees no GPU (CI); ``benchmarks/gpu_check.sh`` runs them on a machine that has one. float32
means float32 there too (``RuntimeOptions.tf32`` off), so the CPU's tolerances apply.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
import torch

import cal_from_mask
import t_models
from conftest import EVAL_ATOL, GRAD_RTOL, TRAIN_ATOL, shared_path
from model import DCONet, deploy, from_release_state_dict
from model.deploy import BF16_T_RTOL
from model.release import release_gradients
from run_0 import main as train_main
from utils.io.runtime import RuntimeOptions
from utils.data.synthetic_sets import write_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU")


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    device, _ = RuntimeOptions(device="cuda").setup()       # TF32 off
    return device


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


def test_a_short_training_run_on_the_gpu(tmp_path, cuda):
    write_dataset(tmp_path, "tiny", n_trainval=8, n_test=4, size=64, seed=3)
    for extra in ([], ["--amp"]):
        out = tmp_path / ("run" + "".join(extra))
        assert train_main(["--dataset", "tiny", "--data-root", str(tmp_path), "--out", str(out), "--epochs", "2",
                           "--batch-size", "4", "--base-size", "64", "--stage-num", "2", "--lr", "1e-3",
                           "--device", "cuda", *extra]) == 0
        assert "done: best mIoU" in (out / "log.txt").read_text()


def test_the_release_pipeline_on_the_gpu(tmp_path, capsys):
    case = shared_path("reference", "pipeline_nuaa")
    split = shared_path("data", "NUAA-SIRST", "test")
    expected = json.loads((case / "expected.json").read_text())
    out = tmp_path / "results"
    assert t_models.main(["--input", str(split / "images"), "--weights", str(case / "weights_release.pkl"),
                          "--out", str(out), "--device", "cuda", "--no-progress"]) == 0
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
