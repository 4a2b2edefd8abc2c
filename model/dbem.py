"""DBEM, the direction-aware background estimation module: a small U-Net with axial depthwise convolutions,
a multi-dilation channel mixer (MDCR) and linear-complexity attention (SOA) at its bottleneck (those two in
``model.bottleneck``).

Paper: Zhang et al., "DCONet: A Dual-Task Collaborative Optimization Network for Infrared Small Target
Detection", IEEE GRSL 22, 2025, https://doi.org/10.1109/LGRS.2025.3597969
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bottleneck import MDCR, SOA
from .capabilities import HasKernels, HasLayout, Reparameterizable
from .ops import conv1x1, conv_from_one, conv_with, fold_batchnorm, max_pool2x2

WIDTHS = (16, 32, 64, 128, 256, 512)  # conv_in width, then the output width of each of the five encoder blocks


class AxialDepthwise(Reparameterizable, HasKernels):
    """A(x) = x + dwconv(7x1)(x) + dwconv(1x7)(x): direction-aware depthwise mixing along H and along W.

    The identity and both depthwise convolutions are one linear map: a single depthwise convolution whose 7x7
    kernel is a cross (the 7x1 taps in the centre column, the 1x7 taps in the centre row, plus 1 at the centre),
    one pass over the activation instead of four (``as_conv``). ``reparameterize()`` switches the block to it;
    with the speed kernels on (``DCONet.use_kernels``) it also runs so whenever no gradient is needed (its
    backward pass is several times slower than that of the two 7-tap convolutions).
    """

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"the axial kernel must be odd ('same' padding), got {kernel}")
        self.conv_h = nn.Conv2d(channels, channels, (kernel, 1), padding="same", groups=channels)
        self.conv_w = nn.Conv2d(channels, channels, (1, kernel), padding="same", groups=channels)

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

    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form: A as one depthwise 7x7 convolution (float32, as the whole DBEM)."""
        if self.deployed:
            return
        self.cross = self.as_conv()
        del self.conv_h, self.conv_w
        self.deployed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.cross(x)
        if self.kernels and not (torch.is_grad_enabled()
                                      and (x.requires_grad or self.conv_h.weight.requires_grad)):
            weight, bias = self.cross_kernel()
            return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=weight.shape[-1] // 2,
                            groups=x.shape[1])
        return x + self.conv_h(x) + self.conv_w(x)                # (N, C, H, W)


class EncoderBlock(Reparameterizable):
    """skip = BN(A(x)); x = GELU(maxpool2x2(conv1x1(skip))). Returns (x, skip).

    Deploy form (``reparameterize``): BN(A(.)) as one depthwise 7x7 convolution; in channels_last layout the
    1x1 convolution is a single matrix product.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.axial = AxialDepthwise(in_channels)
        self.norm = nn.BatchNorm2d(in_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def reparameterize(self, bf16: bool = False) -> None:
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


class DecoderBlock(Reparameterizable, HasKernels):
    """x = GELU(conv1x1(A(BN(conv1x1(cat[up2(x), skip]))))), nearest upsampling.

    The first conv1x1 is pointwise, so on the concatenation it equals conv1x1 of the skip plus the nearest
    upsampling of conv1x1 of the low-resolution input (the weight's two column blocks): the wide input is mixed
    at a quarter of the pixels and neither the wide upsampled tensor nor the concatenation is formed. The speed
    kernels (``DCONet.use_kernels``) and the deploy form (``reparameterize``, which also folds the BN into
    those two blocks) compute it so.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.proj_in = nn.Conv2d(in_channels + out_channels, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.axial = AxialDepthwise(out_channels)
        self.proj_out = nn.Conv2d(out_channels, out_channels, 1)

    def reparameterize(self, bf16: bool = False) -> None:
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
        if self.kernels:
            weight = self.proj_in.weight                          # (Cout, Cin + Cout, 1, 1), cat order [x, skip]
            low = F.conv2d(x, weight[:, :self.in_channels])      # (N, Cout, H/2, W/2)
            x = F.conv2d(skip, weight[:, self.in_channels:], self.proj_in.bias)   # (N, Cout, H, W)
            x = x + F.interpolate(low, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")               # (N, Cin, H, W)
            x = self.proj_in(torch.cat([x, skip], dim=1))                         # (N, Cin + Cout, H, W) -> Cout
        return F.gelu(self.proj_out(self.axial(self.norm(x))))   # (N, Cout, H, W)


class DBEM(Reparameterizable, HasKernels, HasLayout):
    """Direction-aware background estimation: B = U(D - T), U a five-level U-Net.

    Input and output: (N, 1, H, W) with H and W multiples of 32. With the speed kernels on, conv_in (one input
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

    def reparameterize(self, bf16: bool = False) -> None:
        """Switch conv_out to its deploy form, a matrix product in channels_last layout (the blocks inside have
        their own ``reparameterize``, which ``model.deploy`` calls). The DBEM stays float32."""
        self.deployed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels and not self.deployed:
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
