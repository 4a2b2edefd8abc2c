"""The release's "poly" learning-rate schedule, stepped every iteration: a function of how much of the run is done.

The scheduler counts iterations of the current run's size (epochs x iterations per epoch), so that its count over
that total is the fraction of the run done, epochs done plus the step within the epoch over the iterations per
epoch. A run resumed with another number of processes has another number of iterations per epoch; it continues
at the same fraction (``continue_schedule`` with the count rescaled to the new size, always at an epoch's end).
"""
from __future__ import annotations

import torch


def poly_lr(base_lr: float, iteration: int, total_iterations: int, power: float = 0.9) -> float:
    """lr = base_lr * (1 - iteration / total_iterations) ** power, clamped at 0 past the end."""
    if total_iterations <= 0:
        raise ValueError(f"total_iterations must be positive, got {total_iterations}")
    return base_lr * max(0.0, 1.0 - iteration / total_iterations) ** power


def poly_scheduler(optimizer: torch.optim.Optimizer, total_iterations: int,
                   power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that applies ``poly_lr`` to every parameter group; call ``step()`` after each iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / total_iterations) ** power)


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, iteration: int | None = None) -> float:
    """After ``scheduler.load_state_dict``: every group's lr set to the schedule's value at ``iteration`` (None:
    the stored count; another one rescales the count to this run's iterations per epoch), under this scheduler's
    total (which a resumed run with more epochs has recomputed; the optimizer's stored lr was the old total's).
    Returns the first group's lr."""
    if iteration is not None:
        scheduler.last_epoch = iteration
    for group, base, rule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return scheduler._last_lr[0]
