"""The activation layout of a training run: contiguous (NCHW) or channels_last (NHWC), or whichever a short probe
finds faster here (``--memory-format auto``).

Which layout trains faster on a CPU depends on the CPU: on one AMD EPYC type channels_last made a step 1.45x
faster, on another (AVX2 only) 1.15x slower. ``auto`` measures instead of guessing, as cudnn.benchmark does for
convolution algorithms: a few forward and backward passes of each layout on a copy of the model, at the run's batch
shape, before training starts; the faster one is kept and the log says what was measured. On a GPU ``auto`` is
contiguous (the release's layout, which cuDNN runs well).
"""
from __future__ import annotations

import copy
import time

import torch

from utils.train import distributed as dist_utils

PROBE_STEPS = 3     # timed steps per layout, after one warm-up step; the fastest of them counts


def _step_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    D, T = model(x)
    (T.float().mean() + D.float().mean()).backward()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def probe_memory_format(model: torch.nn.Module, shape: tuple[int, int, int, int], device: torch.device,
                        steps: int = PROBE_STEPS) -> tuple[str, dict[str, float]]:
    """(the faster layout, {layout: its fastest step in seconds}) of training passes on a copy of ``model`` (its
    weights, statistics and gradients untouched) with an input of ``shape`` drawn from a private generator (the
    run's random state untouched)."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    trial = copy.deepcopy(model).train()
    seconds = {"contiguous": [], "channels_last": []}
    for _ in range(steps + 1):                         # interleaved, so a change in machine load hits both
        for layout in seconds:
            trial.set_channels_last(layout == "channels_last")
            seconds[layout].append(_step_seconds(trial, x))
            trial.zero_grad(set_to_none=True)
    best = {layout: min(times[1:]) for layout, times in seconds.items()}
    return min(best, key=best.get), best


def choose_memory_format(setting: str, model: torch.nn.Module, shape: tuple[int, int, int, int],
                         device: torch.device, info: dist_utils.DistInfo = dist_utils.DistInfo()) -> tuple[str, str]:
    """(the layout to train in, a note for the log, or "" when the setting was explicit). Under torchrun rank 0's
    probe decides for every rank."""
    if setting != "auto":
        return setting, ""
    if device.type == "cuda":
        return "contiguous", "memory format auto: contiguous on a GPU"
    choice, best = probe_memory_format(model, shape, device) if info.is_main else (None, {})
    choice, best = dist_utils.broadcast_object(info, (choice, best))
    timings = ", ".join(f"{layout} {seconds:.3f} s" for layout, seconds in best.items())
    return choice, f"memory format auto: {choice} (a training pass at batch shape {tuple(shape)}: {timings})"


def set_memory_format(model, setting: str, shape: tuple[int, int, int, int],
                      info: dist_utils.DistInfo = dist_utils.DistInfo()) -> list[str]:
    """Put ``model`` (a DCONet, on its device) in the layout ``setting`` names or ``auto`` chooses; returns the log's
    notes (none for an explicit setting)."""
    device = next(model.parameters()).device
    layout, note = choose_memory_format(setting, model, shape, device, info)
    model.set_channels_last(layout == "channels_last")
    return [note] if note else []
