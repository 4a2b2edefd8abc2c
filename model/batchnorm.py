"""BatchNorm over the batches of all processes of a torch.distributed group (``--sync-bn``), on any device.

    synchronise_batchnorm(model)      # under torchrun: every BatchNorm of the model takes all ranks' statistics

In training mode a BatchNorm normalises with the mean and variance of its batch; under DistributedDataParallel
each process sees its share of the batch only. Here the statistics are those of the whole batch: each process
computes its share's mean and variance, one all_gather combines them (the counts weigh them), and the backward
pass all-reduces the two per-channel gradient sums the input gradient needs. PyTorch's own ``nn.SyncBatchNorm``
runs on CUDA only and reaches BatchNorm modules only, not MDCR's shared BatchNorm, which normalises functionally
(``model.bottleneck.MDCR``); ``sync_batch_norm`` serves both, with gloo on CPUs as with NCCL on GPUs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_CHANNELS = (0, 2, 3)                 # the dimensions a BatchNorm2d reduces over: all but the channels of (N, C, H, W)


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    return values[None, :, None, None]                     # (C,) -> (1, C, 1, 1)


class _SyncBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the mean and (biased) variance of every process's
    batch; also returns the mean and the unbiased variance (for running statistics), which carry no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        channels, world = x.shape[1], _world(group)
        var, mean = torch.var_mean(x.float(), dim=_CHANNELS, correction=0)                  # (C,), (C,)
        total = mean.new_full((1,), x.numel() // channels)                                   # this share's count
        if world > 1:
            shares = [torch.empty(2 * channels + 1, dtype=mean.dtype, device=mean.device) for _ in range(world)]
            dist.all_gather(shares, torch.cat([mean, var, total]), group=group)
            shares = torch.stack(shares)                                               # (world, 2C + 1)
            means, variances, counts = shares[:, :channels], shares[:, channels:-1], shares[:, -1:]
            total = counts.sum(0)                                                      # (1,)
            mean = (counts * means).sum(0) / total
            var = (counts * (variances + (means - mean) ** 2)).sum(0) / total           # the whole batch's
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group, ctx.world = group, world
        unbiased = torch.where(total > 1, var * total / (total - 1).clamp(min=1), var)
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd, total = ctx.saved_tensors
        channels = x.shape[1]
        g = grad_y.float()
        x_hat = (x.float() - _per_channel(mean)) * _per_channel(invstd)
        sums = torch.cat([g.sum(_CHANNELS), (g * x_hat).sum(_CHANNELS)])           # this share's, (2C,)
        grad_bias, grad_weight = sums[:channels].clone(), sums[channels:].clone()
        if ctx.world > 1:
            dist.all_reduce(sums, group=ctx.group)                                    # the whole batch's
        mean_g, mean_g_x_hat = sums[:channels] / total, sums[channels:] / total
        scale = invstd if weight is None else invstd * weight.float()
        grad_x = (g - _per_channel(mean_g) - x_hat * _per_channel(mean_g_x_hat)) * _per_channel(scale)
        if weight is None:
            grad_weight = grad_bias = None
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None


def sync_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of x (N, C, H, W) with the statistics of every process's batch in ``group`` (None:
    the default group; without a process group, this process's batch). Returns (y, mean, unbiased variance), the
    statistics (C,) float32 and without gradient, for running statistics. The gradients are those of the whole
    batch's loss summed over the processes; weight and bias get this process's share (DistributedDataParallel
    averages them as it does every parameter's)."""
    return _SyncBatchNorm.apply(x, weight, bias, eps, group)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of every process's batch (``sync_batch_norm``),
    on any device; in eval mode, and without a process group, it is ``nn.BatchNorm2d``."""

    process_group = None          # None: the default group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) == 1:
            return super().forward(x)
        y, mean, var = sync_batch_norm(x, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats:
            update_running_stats(self, mean, var)
        return y


@torch.no_grad()
def update_running_stats(norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """One training step's update of ``norm``'s running statistics with a batch's mean and unbiased variance, as
    ``nn.BatchNorm2d`` makes it (momentum, or a cumulative average when the momentum is None)."""
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1.0 / norm.num_batches_tracked
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(var.to(norm.running_var.dtype), factor)


def synchronise_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm2d`` of ``model`` (in place) a ``SyncBatchNorm2d`` that holds the same parameters
    and buffers (an optimizer made before keeps working); MDCR's shared BatchNorm is one of them and then
    normalises with ``sync_batch_norm`` too. Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
                for key, value in (*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)):
                    setattr(synced, key, value)
                synced.train(child.training)
                setattr(parent, name, synced)
    return model
