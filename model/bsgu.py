"""BSGU, the background suppression gating unit: a gated, ConvLSTM-like cell that refines the target layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import add_to_border, conv_from_one, conv_to_one

GATES = ("forget", "input", "output", "cell")  # order of the four gate blocks inside ``BSGU.gates``


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def compose_gate_kernel(wx: torch.Tensor, bx: torch.Tensor, wg: torch.Tensor,
                        bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (4C, 1, 5, 5), bias (4C,)) of gates(conv_x(x)) as one convolution (padding 2), exact away from the
    image's border ring. The kernels compose by full convolution: w[o, d] = sum_m sum_(a+b=d) wg[o, m, a] wx[m, b].

    wx, bx: conv_x (C, 1, 3, 3), (C,); wg, bg: the gates (4C, C, 3, 3), (4C,)."""
    weight = F.conv_transpose2d(wg, wx)                                  # (4C, C, 3, 3) x (C, 1, 3, 3) -> (4C, 1, 5, 5)
    bias = bg + wg.sum(dim=(2, 3)) @ bx                                  # (4C,)
    return weight, bias


def gate_border(x: torch.Tensor, wx: torch.Tensor, bx: torch.Tensor, wg: torch.Tensor,
                bg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """gates(conv_x(x)) on the top and bottom rows and on the left and right columns, computed the
    two-convolution way from the three rows (columns) of x that they depend on: (top, bottom, left, right)."""

    def edge(strip: torch.Tensor, rows: bool, keep: slice, pad: tuple[int, int, int, int]) -> torch.Tensor:
        x1 = F.conv2d(strip, wx, bx, padding=1)                          # exact where it does not see the cut
        x1 = x1[..., keep, :] if rows else x1[..., keep]                  # the two exact rows (columns)
        return F.conv2d(F.pad(x1, pad), wg, bg)                          # one row (column) of gate inputs

    top = edge(x[..., :3, :], True, slice(0, 2), (1, 1, 1, 0))           # (N, 4C, 1, W)
    bottom = edge(x[..., -3:, :], True, slice(1, 3), (1, 1, 0, 1))
    left = edge(x[..., :, :3], False, slice(0, 2), (1, 0, 1, 1))         # (N, 4C, H, 1)
    right = edge(x[..., :, -3:], False, slice(1, 3), (0, 1, 1, 1))
    return top, bottom, left, right


def composite_border(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the composed 5x5 convolution gives on the same strips as ``gate_border``."""
    top = F.conv2d(F.pad(x[..., :3, :], (2, 2, 2, 0)), weight, bias)     # (N, 4C, 1, W)
    bottom = F.conv2d(F.pad(x[..., -3:, :], (2, 2, 0, 2)), weight, bias)
    left = F.conv2d(F.pad(x[..., :, :3], (2, 0, 2, 2)), weight, bias)    # (N, 4C, H, 1)
    right = F.conv2d(F.pad(x[..., :, -3:], (0, 2, 2, 2)), weight, bias)
    return top, bottom, left, right


def gate_preactivations(x: torch.Tensor, wx: torch.Tensor, bx: torch.Tensor, wg: torch.Tensor,
                        bg: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
    """gates(conv_x(x)) for a one-channel x (N, 1, H, W), H, W >= 3: (N, 4C, H, W).

    One 5x5 convolution of x, then the border ring is corrected by the difference between the exact
    two-convolution strips and the composed strips (all four strips are small)."""
    weight, bias = compose_gate_kernel(wx, bx, wg, bg)
    z = conv_from_one(x, weight, bias, nhwc)                              # (N, 4C, H, W)
    exact, composed = gate_border(x, wx, bx, wg, bg), composite_border(x, weight, bias)
    top, bottom, left, right = (e - c for e, c in zip(exact, composed))
    return add_to_border(z, top, bottom, left[..., 1:-1, :], right[..., 1:-1, :])


class BSGU(nn.Module):
    """One stage's target update.

    x = D - B + T;  x1 = conv_x(x)
    f, i, o = sigmoid(conv_f(x1)), sigmoid(conv_i(x1)), sigmoid(conv_o(x1));  g = tanh(cell_state(x1))
    c = f * c0 + i * g   with c0 = conv_c's bias in the first stage, conv_c2(c_prev) later
    T_new = x - conv_out(o * tanh(c) * eps)

    The four gate convolutions run as one convolution with 4 * channels outputs (blocks in ``GATES`` order).
    conv_x feeds nothing but the gates, and both are linear, so gates(conv_x(x)) runs as one 5x5 convolution
    of the one-channel x (``compose_gate_kernel``): 4C * 25 multiply-adds per pixel instead of 4C * C * 9. Only on the
    image's outermost ring of pixels does the result differ (there the gates see conv_x's zero padding); those
    four one-pixel strips are computed the two-convolution way (``gate_border``).

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
        self.nhwc = False     # write the gates in (N, H, W, C) layout (channels_last)

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

    def gate_preactivations(self, x: torch.Tensor, cell_scale: float = 1.0) -> torch.Tensor:
        """gates(conv_x(x)) for x (N, 1, H, W), H, W >= 3: (N, 4C, H, W), the cell block times ``cell_scale``."""
        wg, bg = self.gates.weight, self.gates.bias
        if cell_scale != 1.0:
            scale = torch.ones(len(GATES), 1, device=wg.device, dtype=wg.dtype)
            scale[GATES.index("cell")] = cell_scale
            scale = scale.expand(-1, self.channels).reshape(-1)            # (4C,)
            wg, bg = wg * scale.view(-1, 1, 1, 1), bg * scale
        return gate_preactivations(x, self.conv_x.weight, self.conv_x.bias, wg, bg, nhwc=self.nhwc)

    def forward(self, D: torch.Tensor, B: torch.Tensor, T: torch.Tensor,
                c_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = D - B + T                                              # (N, 1, H, W)
        # tanh(u) = 2 sigmoid(2u) - 1: doubling the cell rows lets one sigmoid serve all four gates
        f, i, o, s = torch.sigmoid(self.gate_preactivations(x, cell_scale=2.0)).chunk(len(GATES), dim=1)
        if self.first_stage:
            c0 = self.cell_bias.view(1, -1, 1, 1)
        else:
            if c_prev is None:
                raise ValueError("a BSGU after the first stage needs the previous stage's cell state")
            c0 = self.conv_c(c_prev)
        c = torch.addcmul(torch.addcmul(-i, i, s, value=2.0), f, c0)    # f * c0 + i * tanh(g), tanh(g) = 2 s - 1
        h = o * torch.tanh(c)                                          # (N, C, H, W)
        weight = self.conv_out.weight * self.epsilon.view(1, -1, 1, 1)  # conv_out(h * eps)
        return x - conv_to_one(h, weight, self.conv_out.bias), c
