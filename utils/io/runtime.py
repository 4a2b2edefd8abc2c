"""Where and how the network runs: the options run_0.py and t_models.py share, and the device they name.

    options = RuntimeOptions(device="cuda:1", bf16=True)
    device, memory = options.setup()        # torch.device("cuda", 1), and what the C library does with memory

Every script takes the same flags for these (``add_runtime_arguments``), with the same meaning and help text,
and calls the same ``setup``. On NVIDIA GPUs it applies the release's numerics: cuDNN convolutions may use TF32
(PyTorch's default, and what the authors trained with), matrix products keep PyTorch's default (float32), and
``strict_float32`` turns TF32 off everywhere. ``fixed_sizes`` (training, benchmarks) lets cuDNN pick the fastest
algorithm per input size (``cudnn.benchmark``). On the CPU, OpenMP's idle spinning is capped by every script
before torch loads (``utils.io.cpu_memory.limit_openmp_spinning``).

``gpu_paths(device)`` is the one test of "take the GPU's code paths" (the model's kernels, fused Adam, fp16 with
loss scaling, pinned memory and persistent DataLoader workers, these flags): true on CUDA, and on the CPU too
while ``forced_gpu_paths()`` holds, so that tests and ``gpu_check.sh --dry-run`` run every GPU branch on a
machine without one (the model reads the same switch, the environment variable ``DCONET_GPU_PATHS``).
"""
from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch

from utils.io.cpu_memory import MODES, configure_cpu_malloc, limit_openmp_spinning


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else the CPU; "cpu", "cuda", "cuda:N". A GPU that PyTorch does not see
    is an error that says so."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but PyTorch sees no CUDA GPU (torch {torch.__version__}); "
                             f"use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but PyTorch sees {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: this project runs on cpu or cuda")
    return device


GPU_PATHS_VARIABLE = "DCONET_GPU_PATHS"      # "1": every device takes the GPU's code paths (model.ops reads it too)


def gpu_paths(device: torch.device) -> bool:
    """Whether code running on ``device`` takes the GPU's paths: on CUDA, or anywhere under ``forced_gpu_paths``."""
    return device.type == "cuda" or os.environ.get(GPU_PATHS_VARIABLE) == "1"


@contextmanager
def forced_gpu_paths():
    """Within it (and in the processes it starts), the CPU takes the GPU's code paths (``gpu_paths``); the setting
    before it is restored after."""
    before = os.environ.get(GPU_PATHS_VARIABLE)
    os.environ[GPU_PATHS_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GPU_PATHS_VARIABLE, None)
        else:
            os.environ[GPU_PATHS_VARIABLE] = before


def setting(default, help_text: str, choices: tuple | None = None, changeable: bool = False):
    """A settings dataclass field that carries its command-line help, the one place it is written.

    ``choices``: the values allowed; ``changeable``: the setting may differ when a run resumes (where and how it
    runs, not what it computes)."""
    return field(default=default, metadata={"help": help_text, "choices": choices, "changeable": changeable})


def flag_name(name: str) -> str:
    """The command-line flag of a setting: cpu_malloc -> --cpu-malloc."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run the network; none of these changes what it computes beyond float rounding (``bf16``: within
    the bounds tests/ hold it to). Each field's help text is its command-line help."""

    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N", changeable=True)
    bf16: bool = setting(False, "bfloat16 arithmetic: faster on GPUs and on CPUs with AVX512-BF16, float rounding "
                                "aside the same results (inference: the BSGU and the reconstruction; training: "
                                "autocast)", changeable=True)
    compile: bool = setting(False, "torch.compile the network (the first call of every input size compiles, for "
                                   "minutes)", changeable=True)
    cpu_malloc: str = setting("auto", "CPU memory (glibc): keep freed memory for reuse instead of returning large "
                                      "blocks to the system, up to 2x faster at batch 8 for a higher peak (auto: keep "
                                      "when computing on the CPU); system: the C library's defaults", MODES,
                              changeable=True)
    strict_float32: bool = setting(False, "on NVIDIA GPUs, float32 means float32 everywhere: no TF32 in cuDNN's "
                                          "convolutions (by default they use it, as PyTorch does and as the "
                                          "release trained: about 1e-3 relative precision, several times faster "
                                          "on A100/H100-class GPUs)", changeable=True)

    def __post_init__(self) -> None:
        if self.cpu_malloc not in MODES:
            raise ValueError(f"cpu_malloc must be one of {', '.join(MODES)}, got {self.cpu_malloc!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "RuntimeOptions":
        """The options stored in a run's config.json; ``tf32``, a setting of earlier versions, is dropped (TF32
        convolutions are now the default, ``strict_float32`` the opposite)."""
        return cls(**{k: v for k, v in values.items() if k not in RETIRED})

    def setup(self, fixed_sizes: bool = False, device: torch.device | None = None) -> tuple[torch.device, str]:
        """Apply the options and return (device, a note on memory for the log). ``device``: one already decided
        (a torchrun rank's GPU); ``fixed_sizes``: inputs keep one size (training), so cuDNN may time its
        algorithms once per size and keep the fastest."""
        limit_openmp_spinning()        # effective where torch has not loaded libgomp yet (scripts call it first)
        device = device if device is not None else resolve_device(self.device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_device(torch.device("cuda", index))
        if gpu_paths(device):
            torch.backends.cudnn.allow_tf32 = not self.strict_float32
            torch.backends.cuda.matmul.allow_tf32 = False      # PyTorch's default: float32 matrix products
            torch.backends.cudnn.benchmark = fixed_sizes
        return device, configure_cpu_malloc(self.cpu_malloc, device.type)


RETIRED = frozenset({"tf32"})   # runtime settings that earlier versions stored and this one ignores


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: NVIDIA compute capability 8.0 (Ampere) and up.
    (``torch.cuda.is_bf16_supported`` also says yes where bfloat16 is emulated, slowly.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The autocast dtype of CUDA mixed precision: ``choice`` bf16 or fp16, or auto: bfloat16 where the GPU has
    it natively, else float16 (with loss scaling)."""
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        return torch.float16
    if choice != "auto":
        raise ValueError(f"amp dtype must be auto, bf16 or fp16, got {choice!r}")
    return torch.bfloat16 if native_bf16(device) else torch.float16


def add_runtime_arguments(parser: argparse.ArgumentParser, defaults: RuntimeOptions = RuntimeOptions()) -> None:
    """--device, --bf16, --compile, --cpu-malloc and --strict-float32, with the same help in every script."""
    group = parser.add_argument_group("where and how to run")
    for f in fields(RuntimeOptions):
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] if isinstance(default, bool) else f"{f.metadata['help']} (default: %(default)s)"
        if isinstance(default, bool):
            group.add_argument(flag_name(f.name), action="store_true", default=default, help=help_text)
        else:
            group.add_argument(flag_name(f.name), default=default, choices=f.metadata["choices"], help=help_text)


def runtime_from_args(args: argparse.Namespace) -> RuntimeOptions:
    """The RuntimeOptions that ``add_runtime_arguments``' flags describe."""
    return RuntimeOptions(**{f.name: getattr(args, f.name) for f in fields(RuntimeOptions)})
