"""Shared test helpers: paths into ../shared (skipped with a reason when it is absent), the reference vectors and
their tolerances, a model without trivial parameters, and both ways the model's forward can run (``kernels``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tolerances for this project against ../shared/reference/dconet_k2_seed0.pt (its README): eval-mode D and T,
# train-mode D and T, BatchNorm running statistics (absolute), gradients (relative norm of the difference).
EVAL_ATOL, TRAIN_ATOL, STATS_ATOL, GRAD_RTOL = 1e-4, 1e-4, 1e-5, 2e-2


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: where other work shares a small CPU, contending OpenMP threads make small
    forward passes many times slower. The thread count is put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test is skipped when it does not exist (a user's fresh clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (reference data lives beside the repository, in ../shared)")
    return path


@pytest.fixture(params=[False, True], ids=["plain", "fast"])
def kernels(request) -> bool:
    """Each test that takes this runs twice, as ``--kernels plain`` and ``--kernels fast`` train: False for the
    paper's forward, True for the model's speed kernels (``DCONet.use_kernels``)."""
    return request.param


@pytest.fixture(scope="session")
def reference() -> dict:
    """The release's outputs, running statistics and gradients for a K = 2 model (../shared/reference)."""
    return torch.load(shared_path("reference", "dconet_k2_seed0.pt"), weights_only=True)


def reference_loss(D: torch.Tensor, T: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The loss the reference gradients were taken of."""
    return torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()


def perturbed_model(stage_num: int, seed: int = 0):
    """A DCONet with no trivially zero or one parameter and non-trivial BatchNorm running statistics."""
    from model import DCONet, DCONetConfig

    torch.manual_seed(seed)
    model = DCONet(DCONetConfig(stage_num=stage_num))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic of ``module`` random (no trivially zero or one value)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module
