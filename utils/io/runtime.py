"""Where and how the network runs: the options run_0.py and t_models.py share, and the device they name.

    options = RuntimeOptions(device="cuda:1", bf16=True)
    device, memory = options.setup()        # torch.device("cuda", 1), and what the C library does with memory

Both scripts take the same flags for these (``add_runtime_arguments``), with the same meaning and help text.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import torch

from utils.io.cpu_memory import MODES, configure_cpu_malloc


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
            raise ValueError(f"device {name!r} requested but PyTorch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: this project runs on cpu or cuda")
    return device


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
    tf32: bool = setting(False, "on NVIDIA GPUs, let float32 convolutions and matrix products use TF32: faster, "
                                "about 1e-3 relative precision (off: float32 means float32 everywhere)",
                         changeable=True)

    def __post_init__(self) -> None:
        if self.cpu_malloc not in MODES:
            raise ValueError(f"cpu_malloc must be one of {', '.join(MODES)}, got {self.cpu_malloc!r}")

    def setup(self) -> tuple[torch.device, str]:
        """The device, after applying the memory setting; returns (device, a note on memory for the log)."""
        device = resolve_device(self.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        return device, configure_cpu_malloc(self.cpu_malloc, device.type)


def add_runtime_arguments(parser: argparse.ArgumentParser, defaults: RuntimeOptions = RuntimeOptions()) -> None:
    """--device, --bf16, --compile, --cpu-malloc and --tf32, with the same help in every script."""
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
