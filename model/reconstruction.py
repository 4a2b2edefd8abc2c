"""The reconstruction network M: D = M(B + T)."""
from __future__ import annotations

import torch
from torch import nn

from .capabilities import HasKernels, HasLayout, Reparameterizable
from .ops import conv_from_one, conv_to_one, conv_to_one_float, fold_batchnorm


class Reconstruction(Reparameterizable, HasKernels, HasLayout):
    """D = M(x): conv3x3(1->C)+BN+ReLU, two x [conv3x3(C->C)+BN+ReLU], conv3x3(C->1).

    With the speed kernels on (``DCONet.use_kernels``) the one-channel convolutions at either end have their
    backward passes (and the last one its forward) computed as matrix products (``model.ops``). The deploy form
    (``reparameterize``) folds every BatchNorm into its convolution.
    """

    bf16_capable = True

    def __init__(self, channels: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 1
        for _ in range(3):
            layers += [nn.Conv2d(width_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            width_in = channels
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self._forward_deployed(x)
        if not self.kernels:
            return self.body(x)                                     # (N, 1, H, W) -> (N, 1, H, W)
        first, last = self.body[0], self.body[-1]
        x = conv_from_one(x, first.weight, first.bias, self.nhwc)  # (N, 1, H, W) -> (N, C, H, W)
        x = self.body[1:-1](x)
        return conv_to_one(x, last.weight, last.bias)               # (N, C, H, W) -> (N, 1, H, W)

    @torch.no_grad()
    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form (eval, no autograd): four convolutions with the BatchNorms folded in, the last
        one a matrix product. ``bf16`` computes all but the first in bfloat16: the first reads B + T, which
        carries the logits, and rounding it would put an error of up to |B + T| * 2**-9 into D and, through D,
        into the next stage's T."""
        if self.deployed:
            return
        layers = list(self.body)
        convs = [fold_batchnorm(conv, norm) for conv, norm in zip(layers[0:-1:3], layers[1::3])]
        convs.append(fold_batchnorm(layers[-1]))
        if bf16:
            for conv in convs[1:]:
                conv.to(torch.bfloat16)
        self.convs = nn.ModuleList(convs)
        del self.body
        self.deployed = True

    def _forward_deployed(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.convs
        for conv in hidden:                                         # each layer in its weights' dtype
            x = conv(x.to(conv.weight.dtype)).relu_()               # (N, C, H, W)
        return conv_to_one_float(x.to(last.weight.dtype), last.weight, last.bias)   # (N, 1, H, W), float32
