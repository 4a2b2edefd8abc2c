"""DBEM, the direction-aware background estimation module: a small U-Net with axial depthwise convolutions,
a multi-dilation channel mixer (MDCR) and linear-complexity attention (SOA) at its bottleneck.

Paper: Zhang et al., "DCONet: A Dual-Task Collaborative Optimization Network for Infrared Small Target
Detection", IEEE GRSL 22, 2025, https://doi.org/10.1109/LGRS.2025.3597969
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import conv1x1, conv_from_one, conv_with, fold_batchnorm, max_pool2x2

WIDTHS = (16, 32, 64, 128, 256, 512)  # conv_in width, then the output width of each of the five encoder blocks
MDCR_RATES = (2, 8, 12, 18)


class AxialDepthwise(nn.Module):
    """A(x) = x + dwconv(7x1)(x) + dwconv(1x7)(x): direction-aware depthwise mixing along H and along W.

    The identity and both depthwise convolutions are one linear map: a single depthwise convolution whose 7x7
    kernel is a cross (the 7x1 taps in the centre column, the 1x7 taps in the centre row, plus 1 at the centre),
    one pass over the activation instead of four (``as_conv``). ``reparameterize()`` switches the block to it;
    with the fast kernels on (``DCONet.set_fast_kernels``) it also runs so whenever no gradient is needed (its
    backward pass is several times slower than that of the two 7-tap convolutions).
    """

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"the axial kernel must be odd ('same' padding), got {kernel}")
        self.conv_h = nn.Conv2d(channels, channels, (kernel, 1), padding="same", groups=channels)
        self.conv_w = nn.Conv2d(channels, channels, (1, kernel), padding="same", groups=channels)
        self.fast_kernels = False
        self.deployed = False

    def cross_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (C, 1, k, k), bias (C,)) of the single depthwise convolution equal to A."""
        r = self.conv_h.kernel_size[0] // 2
        weight = (F.pad(self.conv_h.weight, (r, r, 0, 0))      # (C, 1, k, 1) -> (C, 1, k, k), centre column
                  + F.pad(self.conv_w.weight, (0, 0, r, r)))   # (C, 1, 1, k) -> (C, 1, k, k), centre row
        weight[..., r, r] += 1.0                                # x itself: 1 at the centre
        return weight, self.conv_h.bias + self.conv_w.bias

    def as_conv(self) -> nn.Conv2d:
        """A as one depthwise convolution, without gradients (the deploy form's own once switched)."""
        if self.deployed:
            return self.cross
        with torch.no_grad():
            weight, bias = self.cross_kernel()
        c, k = weight.shape[0], weight.shape[-1]
        return conv_with(nn.Conv2d(c, c, k, padding=k // 2, groups=c, device=weight.device), weight, bias)

    def reparameterize(self) -> None:
        """Switch to the deploy form: A as one depthwise 7x7 convolution."""
        if self.deployed:
            return
        self.cross = self.as_conv()
        del self.conv_h, self.conv_w
        self.deployed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.cross(x)
        if self.fast_kernels and not (torch.is_grad_enabled()
                                      and (x.requires_grad or self.conv_h.weight.requires_grad)):
            weight, bias = self.cross_kernel()
            return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=weight.shape[-1] // 2,
                            groups=x.shape[1])
        return x + self.conv_h(x) + self.conv_w(x)                # (N, C, H, W)


class EncoderBlock(nn.Module):
    """skip = BN(A(x)); x = GELU(maxpool2x2(conv1x1(skip))). Returns (x, skip).

    Deploy form (``reparameterize``): BN(A(.)) as one depthwise 7x7 convolution; in channels_last layout the
    1x1 convolution is a single matrix product.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.axial = AxialDepthwise(in_channels)
        self.norm = nn.BatchNorm2d(in_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.deployed = False

    def reparameterize(self) -> None:
        """Switch to the deploy form (eval mode): the BatchNorm folded into the axial block's single convolution."""
        if self.deployed:
            return
        self.axial_norm = fold_batchnorm(self.axial.as_conv(), self.norm)     # BN(A(x))
        del self.axial, self.norm
        self.deployed = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deployed:
            skip = self.axial_norm(x)                             # BN(A(x)), (N, Cin, H, W)
            return F.gelu(max_pool2x2(conv1x1(skip, self.proj))), skip
        skip = self.norm(self.axial(x))                           # (N, Cin, H, W)
        x = F.gelu(F.max_pool2d(self.proj(skip), 2))              # (N, Cout, H/2, W/2)
        return x, skip


class DecoderBlock(nn.Module):
    """x = GELU(conv1x1(A(BN(conv1x1(cat[up2(x), skip]))))), nearest upsampling.

    The first conv1x1 is pointwise, so on the concatenation it equals conv1x1 of the skip plus the nearest
    upsampling of conv1x1 of the low-resolution input (the weight's two column blocks): the wide input is mixed
    at a quarter of the pixels and neither the wide upsampled tensor nor the concatenation is formed. The fast
    kernels (``DCONet.set_fast_kernels``) and the deploy form (``reparameterize``, which also folds the BN into
    those two blocks) compute it so.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.proj_in = nn.Conv2d(in_channels + out_channels, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.axial = AxialDepthwise(out_channels)
        self.proj_out = nn.Conv2d(out_channels, out_channels, 1)
        self.fast_kernels = False
        self.deployed = False

    def reparameterize(self) -> None:
        """Switch to the deploy form (eval mode): BN(conv1x1(.)) split into the weight's two column blocks."""
        if self.deployed:
            return
        folded = fold_batchnorm(self.proj_in, self.norm)           # (Cout, Cin + Cout, 1, 1), cat order [x, skip]
        self.proj_low = conv_with(folded, folded.weight[:, :self.in_channels], None)
        self.proj_skip = conv_with(folded, folded.weight[:, self.in_channels:], folded.bias)
        self.axial.reparameterize()
        del self.proj_in, self.norm
        self.deployed = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            low = conv1x1(x, self.proj_low)                       # (N, Cout, H/2, W/2)
            x = conv1x1(skip, self.proj_skip)                     # (N, Cout, H, W)
            x += F.interpolate(low, scale_factor=2.0, mode="nearest")             # BN(conv1x1(cat[up2(x), skip]))
            x = self.axial(x)                                     # A(.)
            return F.gelu(conv1x1(x, self.proj_out))
        if self.fast_kernels:
            weight = self.proj_in.weight                          # (Cout, Cin + Cout, 1, 1), cat order [x, skip]
            low = F.conv2d(x, weight[:, :self.in_channels])      # (N, Cout, H/2, W/2)
            x = F.conv2d(skip, weight[:, self.in_channels:], self.proj_in.bias)   # (N, Cout, H, W)
            x = x + F.interpolate(low, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")               # (N, Cin, H, W)
            x = self.proj_in(torch.cat([x, skip], dim=1))                         # (N, Cin + Cout, H, W) -> Cout
        return F.gelu(self.proj_out(self.axial(self.norm(x))))   # (N, Cout, H, W)


class ConvNormReLU(nn.Sequential):
    """conv -> BatchNorm -> ReLU, the building block of MDCR."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1, groups: int = 1):
        padding = dilation * (kernel - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, groups=groups)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.deployed = False

    def reparameterize(self) -> None:
        """Switch to the deploy form (eval mode): conv -> ReLU, the BatchNorm folded into the conv."""
        if self.deployed:
            return
        self.conv = fold_batchnorm(self.conv, self.norm)
        del self.norm
        self.deployed = True


class MDCR(nn.Module):
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
        self.deployed = False

    def reparameterize(self) -> None:
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
        if self.training or not norm.track_running_stats:
            # One BN channel per (group, channel) pair = the batch statistics of that group's own call.
            y = F.batch_norm(x, None, None, norm.weight.repeat(g), norm.bias.repeat(g), True, 0.0, norm.eps)
            if self.training and norm.track_running_stats:
                self._update_running_stats(x.detach())
        else:
            y = F.batch_norm(x, norm.running_mean.repeat(g), norm.running_var.repeat(g),
                             norm.weight.repeat(g), norm.bias.repeat(g), False, 0.0, norm.eps)
        return F.relu(y)

    @torch.no_grad()
    def _update_running_stats(self, x: torch.Tensor) -> None:
        """Closed form of G sequential updates r <- (1 - m) r + m s_i, i = 0 first (x: (N, 4*G, H, W))."""
        norm, g = self.mix.norm, self.groups
        count = x.numel() // x.shape[1]
        mean = x.mean(dim=(0, 2, 3)).view(g, -1).float()                      # (G, 4)
        var = x.var(dim=(0, 2, 3), unbiased=count > 1).view(g, -1).float()    # (G, 4), unbiased as BatchNorm
        m = norm.momentum
        if m is None:
            raise ValueError("MDCR's shared BatchNorm needs a momentum (cumulative averaging is not supported)")
        decay = (1.0 - m) ** torch.arange(g - 1, -1, -1, dtype=torch.float64, device=x.device)  # (G,), i=0 oldest
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
        out = self.proj(v + q2 @ context / math.sqrt(h * w) + tokens)          # (n, N, c)
        return out.transpose(1, 2).reshape(n, c, h, w)            # (n, N, c) -> (n, c, h, w)


class DBEM(nn.Module):
    """Direction-aware background estimation: B = U(D - T), U a five-level U-Net.

    Input and output: (N, 1, H, W) with H and W multiples of 32. With the fast kernels on, conv_in (one input
    channel) has its backward pass computed as matrix products (``model.ops.conv_from_one``); in the deploy
    form conv_out (one output channel) is a matrix product in channels_last layout.
    """

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, WIDTHS[0], 7, padding="same")
        self.encoders = nn.ModuleList(EncoderBlock(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
        self.mdcr = MDCR(WIDTHS[-1])
        self.soa = SOA(WIDTHS[-1])
        self.decoders = nn.ModuleList(
            DecoderBlock(b, a) for a, b in reversed(list(zip(WIDTHS[:-1], WIDTHS[1:]))))
        self.conv_out = nn.Conv2d(WIDTHS[0], 1, 1)
        self.fast_kernels = False
        self.nhwc = False     # activations in (N, H, W, C) layout (channels_last)
        self.deployed = False

    def reparameterize(self) -> None:
        """Switch conv_out to its deploy form, a matrix product in channels_last layout (the blocks inside have
        their own ``reparameterize``, which ``optimize_for_inference`` calls)."""
        self.deployed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_kernels and not self.deployed:
            x = conv_from_one(x, self.conv_in.weight, self.conv_in.bias, self.nhwc)
        else:
            x = self.conv_in(x)                                  # (N, 1, H, W) -> (N, 16, H, W)
        skips = []
        for encoder in self.encoders:
            x, skip = encoder(x)                                 # (N, 2C, H/2, W/2), skip (N, C, H, W)
            skips.append(skip)
        x = self.soa(self.mdcr(x))                               # (N, 512, H/32, W/32)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)                                 # (N, C/2, 2H, 2W)
        return conv1x1(x, self.conv_out) if self.deployed else self.conv_out(x)   # (N, 16, H, W) -> (N, 1, H, W)
