"""BSGU, the background suppression gating unit: a gated, ConvLSTM-like cell that refines the target layer."""
from __future__ import annotations

import torch
from torch import nn

GATES = ("forget", "input", "output", "cell")  # order of the four gate blocks inside ``BSGU.gates``


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class BSGU(nn.Module):
    """One stage's target update.

    x = D - B + T;  x1 = conv_x(x)
    f, i, o = sigmoid(conv_f(x1)), sigmoid(conv_i(x1)), sigmoid(conv_o(x1));  g = tanh(cell_state(x1))
    c = f * c0 + i * g   with c0 = conv_c's bias in the first stage, conv_c2(c_prev) later
    T_new = x - conv_out(o * tanh(c) * eps)

    The four gate convolutions run as one convolution with 4 * channels outputs (blocks in ``GATES`` order).

    Args:
        channels: width of the cell state (32 in the release).
        first_stage: the first stage has no previous cell state; its c0 is a learnable bias.
    """

    def __init__(self, channels: int = 32, first_stage: bool = True):
        super().__init__()
        self.channels = channels
        self.first_stage = first_stage
        self.epsilon = nn.Parameter(torch.full((channels,), 0.01))
        self.conv_x = _conv3x3(1, channels)
        if first_stage:
            self.cell_bias = nn.Parameter(torch.zeros(channels))   # conv_c applied to zeros: its bias alone
        else:
            self.conv_c = _conv3x3(channels, channels)
        self.gates = _conv3x3(channels, 4 * channels)
        self.conv_out = _conv3x3(channels, 1)

    def reset_parameters(self) -> None:
        """The release's initialisation: xavier-normal weights (each gate on its own), zero biases, eps = 0.01."""
        for conv in [self.conv_x, self.conv_out] + ([] if self.first_stage else [self.conv_c]):
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            for block in self.gates.weight.view(len(GATES), self.channels, *self.gates.weight.shape[1:]):
                nn.init.xavier_normal_(block)
        nn.init.zeros_(self.gates.bias)
        nn.init.constant_(self.epsilon, 0.01)
        if self.first_stage:
            nn.init.zeros_(self.cell_bias)

    def forward(self, D: torch.Tensor, B: torch.Tensor, T: torch.Tensor,
                c_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = D - B + T                                              # (N, 1, H, W)
        x1 = self.conv_x(x)                                        # (N, C, H, W)
        f, i, o, g = self.gates(x1).chunk(len(GATES), dim=1)       # 4 x (N, C, H, W)
        if self.first_stage:
            c0 = self.cell_bias.view(1, -1, 1, 1)
        else:
            if c_prev is None:
                raise ValueError("a BSGU after the first stage needs the previous stage's cell state")
            c0 = self.conv_c(c_prev)
        c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c) * self.epsilon.view(1, -1, 1, 1)
        return x - self.conv_out(h), c
