"""The reconstruction network M: D = M(B + T)."""
from __future__ import annotations

import torch
from torch import nn


class Reconstruction(nn.Module):
    """conv3x3(1->C)+BN+ReLU, two x [conv3x3(C->C)+BN+ReLU], conv3x3(C->1)."""

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
        return self.body(x)                                         # (N, 1, H, W) -> (N, 1, H, W)
