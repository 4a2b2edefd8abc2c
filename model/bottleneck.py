"""The DBEM's bottleneck, at 512 channels and 1/32 of the image's size: MDCR, then SOA.

Paper: Zhang et al., "DCONet: A Dual-Task Collaborative Optimization Network for Infrared Small Target
Detection", IEEE GRSL 22, 2025, https://doi.org/10.1109/LGRS.2025.3597969
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import SyncBatchNorm2d, sync_batch_norm
from .capabilities import Reparameterizable
from .ops import conv_with, exporting, fold_batchnorm

MDCR_RATES = (2, 8, 12, 18)


class ConvNormReLU(Reparameterizable, nn.Sequential):
    """conv -> BatchNorm -> ReLU, the building block of MDCR."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1, groups: int = 1):
        padding = dilation * (kernel - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, groups=groups)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form (eval mode): conv -> ReLU, the BatchNorm folded into the conv."""
        if self.deployed:
            return
        self.conv = fold_batchnorm(self.conv, self.norm)
        del self.norm
        self.deployed = True


class MDCR(Reparameterizable):
    """Multi-dilation channel mixing (from HCF-Net).

    The channels are split into four chunks; chunk j goes through a depthwise 3x3 convolution of dilation
    ``MDCR_RATES[j]``. Then, for every channel index i, the four values (chunk1[i], ..., chunk4[i]) pass through
    one shared conv1x1(4->4)+BN+ReLU, the results are concatenated in order i = 0, 1, ..., and a conv1x1 mixes all.

    The release applies the shared block in a Python loop of C/4 calls. This version does the same work in one
    grouped convolution and keeps the loop's semantics: in training mode every call is normalised with its own
    batch statistics, and the shared running statistics end where C/4 sequential momentum updates would leave them.
    """

    def __init__(self, channels: int = 512, rates: tuple[int, ...] = MDCR_RATES):
        super().__init__()
        if channels % len(rates):
            raise ValueError(f"MDCR needs channels divisible by {len(rates)}, got {channels}")
        quarter = channels // len(rates)
        self.groups = quarter
        self.branches = nn.ModuleList(
            ConvNormReLU(quarter, quarter, 3, dilation=r, groups=quarter) for r in rates)
        self.mix = ConvNormReLU(len(rates), len(rates), 1)  # shared across the `quarter` channel groups
        self.out = ConvNormReLU(channels, channels, 1)

    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form (eval mode): every BatchNorm folded into its convolution, the shared block
        stored as the one grouped convolution it runs as."""
        if self.deployed:
            return
        for block in (*self.branches, self.mix, self.out):
            block.reparameterize()
        conv, g = self.mix.conv, self.groups
        self.mix_groups = conv_with(nn.Conv2d(g * conv.in_channels, g * conv.out_channels, 1, groups=g),
                                    conv.weight.repeat(g, 1, 1, 1), conv.bias.repeat(g))
        del self.mix
        self.deployed = True

    def _mix_groups(self, x: torch.Tensor) -> torch.Tensor:
        """The shared 4->4 block applied to each group of four interleaved channels. x: (N, 4*G, H, W)."""
        if self.deployed:
            return self.mix_groups(x).relu_()
        conv, norm, g = self.mix.conv, self.mix.norm, self.groups
        x = F.conv2d(x, conv.weight.repeat(g, 1, 1, 1), conv.bias.repeat(g), groups=g)
        # In training, one BN channel per (group, channel) pair = the batch statistics of that group's own call.
        if self.training and isinstance(norm, SyncBatchNorm2d):            # --sync-bn: every process's batch
            y, mean, var = sync_batch_norm(x, norm.weight.repeat(g), norm.bias.repeat(g), norm.eps,
                                           norm.process_group)
            if norm.track_running_stats:
                self._update_running_stats(mean, var)
        elif self.training or not norm.track_running_stats:
            y = F.batch_norm(x, None, None, norm.weight.repeat(g), norm.bias.repeat(g), True, 0.0, norm.eps)
            if self.training and norm.track_running_stats:
                self._update_running_stats(*self._batch_statistics(x.detach()))
        else:
            y = F.batch_norm(x, norm.running_mean.repeat(g), norm.running_var.repeat(g),
                             norm.weight.repeat(g), norm.bias.repeat(g), False, 0.0, norm.eps)
        return F.relu(y)

    @staticmethod
    @torch.no_grad()
    def _batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and unbiased variance (as BatchNorm's) of x (N, 4*G, H, W), in float32."""
        count = x.numel() // x.shape[1]
        x = x.float()                     # under autocast x is bf16 or fp16: the statistics are taken in float32
        return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), correction=1 if count > 1 else 0)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Closed form of G sequential updates r <- (1 - m) r + m s_i, i = 0 first, from the batch statistics of
        the 4*G channels (mean, unbiased variance: (4*G,))."""
        norm, g = self.mix.norm, self.groups
        mean, var = mean.view(g, -1), var.view(g, -1)                         # (G, 4)
        m = norm.momentum
        if m is None:
            raise ValueError("MDCR's shared BatchNorm needs a momentum (cumulative averaging is not supported)")
        decay = (1.0 - m) ** torch.arange(g - 1, -1, -1, dtype=torch.float64, device=mean.device)  # (G,), i=0 oldest
        weights = (m * decay).to(mean.dtype).unsqueeze(1)                                       # (G, 1)
        keep = (1.0 - m) ** g
        norm.running_mean.copy_(keep * norm.running_mean + (weights * mean).sum(0))
        norm.running_var.copy_(keep * norm.running_var + (weights * var).sum(0))
        norm.num_batches_tracked.add_(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(x, len(self.branches), dim=1)
        ys = [branch(chunk) for branch, chunk in zip(self.branches, chunks)]    # 4 x (N, G, H, W)
        n, _, h, w = x.shape
        x = torch.stack(ys, dim=2).reshape(n, -1, h, w)                      # (N, G, 4, H, W) -> (N, 4G, H, W)
        return self.out(self._mix_groups(x))


class SOA(nn.Module):
    """Linear-complexity self-attention over the h*w positions of the bottleneck."""

    def __init__(self, channels: int = 512):
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                     # (n, c, h, w) -> (n, N, c)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)               # 3 x (n, N, c)
        q = q - q.mean(dim=-1, keepdim=True)
        k = k - k.mean(dim=-1, keepdim=True)
        q2 = q.pow(2)
        q2 = F.normalize(q2 / (q2.sum(dim=-1, keepdim=True) + 1e-7), dim=-1)   # over channels
        k2 = k.pow(2)
        k2 = F.normalize(k2 / (k2.sum(dim=-1, keepdim=True) + 1e-7), dim=-2)   # over tokens
        context = k2.transpose(1, 2) @ v                          # (n, c, N) @ (n, N, c) -> (n, c, c)
        out = self.proj(v + q2 @ context / self.sqrt_tokens(tokens) + tokens)  # (n, N, c)
        return out.transpose(1, 2).reshape(n, c, h, w)            # (n, N, c) -> (n, c, h, w)

    @staticmethod
    def sqrt_tokens(tokens: torch.Tensor) -> float | torch.Tensor:
        """sqrt(N) for tokens (n, N, c): a Python number, or while exporting a tensor counted from the tokens'
        shape, so that the graph follows the input's size (a number would be frozen in as a constant)."""
        if exporting():
            return tokens.new_ones(tokens.shape[1]).sum().sqrt()
        return math.sqrt(tokens.shape[1])
