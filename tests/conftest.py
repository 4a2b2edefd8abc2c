"""Shared test helpers: paths into ../shared (skipped with a reason when it is absent), the reference vectors and
their tolerances, a model without trivial parameters, and both ways the model's forward can run (``kernels``).

The release's vectors come in two kinds: the portable ones in tests/reference/ (a K = 2 model whose weights are
rebuilt from a seed, and a 12-map metric case), which every clone has, and the larger ones in
../shared/reference/, which add coverage where they are present and are skipped otherwise."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from utils.io.runtime import GPU_PATHS_VARIABLE

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PORTABLE = REPO / "tests" / "reference"

# Tolerances for this project against ../shared/reference/dconet_k2_seed0.pt (its README): eval-mode D and T,
# train-mode D and T, BatchNorm running statistics (absolute), gradients (relative norm of the difference).
EVAL_ATOL, TRAIN_ATOL, STATS_ATOL, GRAD_RTOL = 1e-4, 1e-4, 1e-5, 2e-2
# Train-mode outputs in channels_last layout: PyTorch's channels_last BatchNorm sums the batch statistics less
# exactly than its NCHW kernel, hence a wider bound (benchmarks/README.md, "Precision of the deploy form and the
# training switches").
CL_TRAIN_ATOL = 2.5e-4


def _attribute(owner, name: str) -> tuple:
    return lambda: getattr(owner, name), lambda value: setattr(owner, name, value)


def _environment(variable: str) -> tuple:
    def write(value: str | None) -> None:
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    return lambda: os.environ.get(variable), write


# The process-wide settings that tests, or the code they run, change (the scripts' set-up turns TF32 and
# cudnn.benchmark on for GPUs): name -> (read, write), written back in this order. The matrix-product precision
# and cuda.matmul.allow_tf32 are one setting seen two ways: the precision goes first, as it also sets the CPU's
# (oneDNN's) matrix products. (PyTorch 2.9 and later also offer per-operator ``fp32_precision`` settings; the
# flags here are views of them, and reading a view after a mix of both kinds of setter raises.)
TORCH_FLAGS = {
    "cudnn.allow_tf32": _attribute(torch.backends.cudnn, "allow_tf32"),
    "cudnn.benchmark": _attribute(torch.backends.cudnn, "benchmark"),
    "cudnn.deterministic": _attribute(torch.backends.cudnn, "deterministic"),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "cuda.matmul.allow_tf32": _attribute(torch.backends.cuda.matmul, "allow_tf32"),
    "deterministic_algorithms": (lambda: (torch.are_deterministic_algorithms_enabled(),
                                          torch.is_deterministic_algorithms_warn_only_enabled()),
                                 lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])),
    "num_threads": (torch.get_num_threads, torch.set_num_threads),
    GPU_PATHS_VARIABLE: _environment(GPU_PATHS_VARIABLE),
}


def _differs(read, value) -> bool:
    try:
        return read() != value
    except RuntimeError:        # a view that the settings left inconsistent: written back all the same
        return True


@contextmanager
def kept_torch_flags():
    """Each of ``TORCH_FLAGS``, and on CUDA the synchronisation debug mode, read on entry and written back on exit
    where it changed, by torch's own getters and setters."""
    saved = {name: read() for name, (read, _) in TORCH_FLAGS.items()}
    sync_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_initialized() else 0
    try:
        yield
    finally:
        for name, (read, write) in TORCH_FLAGS.items():
            if _differs(read, saved[name]):
                write(saved[name])
        if torch.cuda.is_initialized() and torch.cuda.get_sync_debug_mode() != sync_mode:
            torch.cuda.set_sync_debug_mode(sync_mode)


@pytest.fixture(autouse=True)
def restore_torch_flags():
    """Every test starts from the flags the one before it started from (``kept_torch_flags``)."""
    with kept_torch_flags():
        yield


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
        pytest.skip(f"needs {path}: the NUAA-SIRST data and the release's larger reference outputs live beside the "
                    f"repository, in ../shared (a clone without it runs the portable vectors of tests/reference)")
    return path


@pytest.fixture(params=[False, True], ids=["plain", "fast"])
def kernels(request) -> bool:
    """Each test that takes this runs twice, as ``--kernels plain`` and ``--kernels fast`` train: False for the
    paper's forward, True for the model's speed kernels (``DCONet.use_kernels``)."""
    return request.param


def _with_shared(*parts: str) -> list[str]:
    """The kinds of a reference case to run: the portable one always, ../shared's where it is present (on a clone
    without it, that variant is not collected rather than listed as skipped: the portable one covers it)."""
    return ["portable"] + (["shared"] if SHARED.joinpath(*parts).exists() else [])


@pytest.fixture(scope="session", params=_with_shared("reference", "dconet_k2_seed0.pt"))
def reference(request) -> dict:
    """The release's outputs, running statistics and gradients for a K = 2 model, from tests/reference (its
    weights rebuilt from the recipe) and from ../shared/reference (skipped where absent), in one layout:
    stage_num, state_dict, input, eval {D, T}, train {D, T, state_dict_after}, loss, grads."""
    if request.param == "shared":
        return torch.load(shared_path("reference", "dconet_k2_seed0.pt"), weights_only=True)
    return portable_reference()


def recipe_state_dict(stage_num: int, seed: int) -> dict[str, torch.Tensor]:
    """The release-layout weights of tests/reference/README.md's recipe: one draw per key, keys in sorted order."""
    from model import DCONet, DCONetConfig, to_release_state_dict

    shapes = {k: v.shape for k, v in to_release_state_dict(DCONet(DCONetConfig(stage_num=stage_num))).items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        last, shape = key.rsplit(".", 1)[-1], shapes[key]
        if last == "num_batches_tracked":
            state[key] = torch.tensor(3)
        elif last == "running_mean":
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif last == "running_var":
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif last == "epsilon_per_channel":
            state[key] = 0.01 + 0.01 * torch.rand(shape, generator=g)
        elif last == "weight" and len(shape) >= 2:
            state[key] = 0.5 * torch.randn(shape, generator=g) * shape[1:].numel() ** -0.5
        elif last == "weight":
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif last == "bias":
            state[key] = 0.05 * torch.randn(shape, generator=g)
        else:
            raise AssertionError(f"the recipe has no rule for {key}")
    return state


def portable_reference() -> dict:
    """tests/reference/dconet_k2_recipe.pt with its weights rebuilt, in the layout of ../shared's vectors."""
    case = torch.load(PORTABLE / "dconet_k2_recipe.pt", weights_only=True)
    state = recipe_state_dict(case["stage_num"], case["recipe_seed"])
    assert set(state) == set(case["weight_checksums"]), "the release layout's keys differ from the recipe's"
    for key, tensor in state.items():
        assert tensor.double().sum().item() == pytest.approx(case["weight_checksums"][key], rel=1e-9, abs=1e-9), \
            f"{key}: the recipe was rebuilt differently from tests/reference/README.md"
    return {"stage_num": case["stage_num"], "state_dict": state, "input": case["input"], "eval": case["eval"],
            "train": {**case["train"], "state_dict_after": case["stats_after_train_forward"]},
            "loss": case["loss"], "grads": case["grads"]}


@pytest.fixture(params=_with_shared("reference", "metric_case"))
def metric_case(request) -> tuple[Path, dict]:
    """(folder with mat/ and masks/, the numbers the release's scorer printed for it): tests/reference/metric_case
    (12 maps, 6 printed decimals) and ../shared/reference/metric_case (30 maps; skipped where absent)."""
    import json

    case = PORTABLE / "metric_case" if request.param == "portable" else shared_path("reference", "metric_case")
    return case, json.loads((case / "expected_paper_protocol.json").read_text())


def release_printed(expected: dict, key: str):
    """pytest.approx for a number the release printed: to 1e-9 relative where it was stored in full (the shared
    case), to half its last printed decimal where it was printed with 6 (Fa with 8)."""
    if "printed_by_the_release" not in expected:
        return pytest.approx(expected[key], rel=1e-9, abs=0)
    return pytest.approx(expected[key], rel=0, abs=5e-9 if key == "Fa" else 5e-7)


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
