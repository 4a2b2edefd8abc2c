"""The reconstruction network M: D = M(B + T)."""
from __future__ import annotations

import torch
from torch import nn

from .ops import conv_from_one, conv_to_one


class Reconstruction(nn.Module):
    """conv3x3(1->C)+BN+ReLU, two x [conv3x3(C->C)+BN+ReLU], conv3x3(C->1).

    The one-channel convolutions at either end run as matrix products (``model.ops``)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 1
        for _ in range(3):
            layers += [nn.Conv2d(width_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            width_in = channels
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.nhwc = False     # keep the C-channel activations in (N, H, W, C) layout (channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self.body[0], self.body[-1]
        x = conv_from_one(x, first.weight, first.bias, self.nhwc)  # (N, 1, H, W) -> (N, C, H, W)
        x = self.body[1:-1](x)
        return conv_to_one(x, last.weight, last.bias)               # (N, C, H, W) -> (N, 1, H, W)
