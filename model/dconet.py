"""DCONet: K unrolled stages of background estimation (DBEM), target gating (BSGU) and reconstruction.

Paper: Zhang, Xu, Lyu, Gong, Chen, Ling, "DCONet: A Dual-Task Collaborative Optimization Network for Infrared
Small Target Detection", IEEE GRSL 22, 2025, https://doi.org/10.1109/LGRS.2025.3597969
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .bsgu import BSGU
from .config import DCONetConfig
from .dbem import DBEM
from .reconstruction import Reconstruction

SIZE_MULTIPLE = 32  # five 2x2 poolings in the DBEM


class StageOutput(NamedTuple):
    """What one stage produced: background B, target layer T (logits) and reconstruction D, each (N, 1, H, W)."""

    B: torch.Tensor
    T: torch.Tensor
    D: torch.Tensor


class DCONetStage(nn.Module):
    """One stage k: B = DBEM(D - T); T, c = BSGU(D, B, T, c); D = M(B + T)."""

    def __init__(self, channels: int, first_stage: bool):
        super().__init__()
        self.dbem = DBEM()
        self.bsgu = BSGU(channels, first_stage=first_stage)
        self.reconstruction = Reconstruction(channels)

    def forward(self, D: torch.Tensor, T: torch.Tensor,
                c: torch.Tensor | None) -> tuple[StageOutput, torch.Tensor]:
        B = self.dbem(D - T)
        T, c = self.bsgu(D, B, T, c)
        D = self.reconstruction(B + T)
        return StageOutput(B, T, D), c


class DCONet(nn.Module):
    """The dual-task collaborative optimization network.

    Args:
        config: structure of the model (``DCONetConfig()`` is the release's: K = 5, 32 channels).

    forward(x) takes a grayscale image batch (N, 1, H, W) in [0, 1], H and W multiples of 32, and returns
    (D, T): the last stage's reconstruction and target logits (sigmoid(T) > 0.5 is a target pixel).
    ``forward(x, return_stages=True)`` returns (D, T, stages) with one ``StageOutput`` per stage.
    """

    def __init__(self, config: DCONetConfig | None = None):
        super().__init__()
        self.config = config or DCONetConfig()
        self.stages = nn.ModuleList(
            DCONetStage(self.config.channels, first_stage=(k == 0)) for k in range(self.config.stage_num))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: xavier-normal conv weights, BN weight 1 and bias 0, zero BSGU biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.stages:
            stage.bsgu.reset_parameters()

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """Raise a ValueError that says how to fix an input the network cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DCONet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"DCONet expects a 4-D batch (N, 1, H, W), got shape {tuple(x.shape)}; "
                             f"add the missing axes, e.g. image[None, None] for one (H, W) image")
        if x.shape[1] != 1:
            raise ValueError(f"DCONet expects one grayscale channel, got {x.shape[1]} channels in shape "
                             f"{tuple(x.shape)}; convert the images to grayscale first")
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
            raise ValueError(f"DCONet needs H and W to be positive multiples of {SIZE_MULTIPLE}, got {h}x{w}; "
                             f"pad the image (e.g. to {-(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE}x"
                             f"{-(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE}) or resize it (the release uses 256x256)")

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        self.check_input(x)
        D = x
        T = torch.zeros_like(x)
        c = None
        stages: list[StageOutput] = []
        for stage in self.stages:
            out, c = stage(D, T, c)
            D, T = out.D, out.T
            if return_stages:
                stages.append(out)
        if return_stages:
            return D, T, stages
        return D, T
