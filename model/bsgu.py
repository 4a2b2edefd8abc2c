"""BSGU, the background suppression gating unit: a gated, ConvLSTM-like cell that refines the target layer."""
from __future__ import annotations

import torch
from torch import nn

from .capabilities import HasKernels, HasLayout, Reparameterizable
from .kernels import compose_gate_kernel, gate_preactivations, gated_cell_in_bands
from .ops import conv_to_one, conv_to_one_float, conv_with


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class BSGU(Reparameterizable, HasKernels, HasLayout):
    """One stage's target update, a gated, ConvLSTM-like cell.

    x = D - B + T;  x1 = conv_x(x)
    f, i, o = sigmoid(conv_f(x1)), sigmoid(conv_i(x1)), sigmoid(conv_o(x1));  g = tanh(conv_g(x1))
    c = f * c0 + i * g   with c0 = cell_bias in the first stage, conv_c(c_prev) later
    T_new = x - conv_out(o * tanh(c) * eps)

    (Release names: conv_g is cell_state; cell_bias is conv_c's bias, conv_c applied to zeros; conv_c is conv_c2.)

    The same function computed faster, with the speed kernels on (``DCONet.use_kernels``) and in the deploy
    form (``reparameterize``): the four gates(conv_x(x)) as one 5x5 convolution of the one-channel x, its
    border ring corrected (``model.kernels``). tanh(u) = 2 sigmoid(2u) - 1: with the cell candidate's rows
    doubled, one sigmoid serves all four gates (sigmoid is several times cheaper than tanh on CPUs).

    Args:
        channels: width of the cell state (32 in the release).
        first_stage: the first stage has no previous cell state; its c0 is a learnable bias.
    """

    bf16_capable = True

    def __init__(self, channels: int = 32, first_stage: bool = True):
        super().__init__()
        self.channels = channels
        self.first_stage = first_stage
        self.epsilon = nn.Parameter(torch.full((channels,), 0.01))
        self.conv_x = _conv3x3(1, channels)
        if first_stage:
            self.cell_bias = nn.Parameter(torch.zeros(channels))   # conv_c applied to zeros: its bias alone
        else:
            self.conv_c = _conv3x3(channels, channels)             # the release's conv_c2
        self.conv_f = _conv3x3(channels, channels)                 # forget gate
        self.conv_i = _conv3x3(channels, channels)                 # input gate
        self.conv_o = _conv3x3(channels, channels)                 # output gate
        self.conv_g = _conv3x3(channels, channels)                 # cell candidate (the release's cell_state)
        self.conv_out = _conv3x3(channels, 1)

    def reset_parameters(self) -> None:
        """The release's initialisation: xavier-normal weights, zero biases, eps = 0.01. (The order of the draws
        is this project's since its first version, so that a seed gives the same network as it always did.)"""
        convs = [self.conv_x, self.conv_out] + ([] if self.first_stage else [self.conv_c])
        for conv in convs + [self.conv_f, self.conv_i, self.conv_o, self.conv_g]:
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.epsilon, 0.01)
        if self.first_stage:
            nn.init.zeros_(self.cell_bias)

    def cell_input(self, c_prev: torch.Tensor | None) -> torch.Tensor:
        """c0: cell_bias (1, C, 1, 1) in the first stage, conv_c(c_prev) (N, C, H, W) later."""
        if self.first_stage:
            return self.cell_bias.view(1, -1, 1, 1)
        if c_prev is None:
            raise ValueError("a BSGU after the first stage needs the previous stage's cell state")
        return self.conv_c(c_prev)

    def forward(self, D: torch.Tensor, B: torch.Tensor, T: torch.Tensor,
                c_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_new, c) from the stage's D, B, T (each (N, 1, H, W)) and the previous cell state (N, C, H, W)."""
        x = D - B + T                                              # (N, 1, H, W)
        if self.deployed:
            return self._forward_deployed(x, c_prev)
        c0 = self.cell_input(c_prev)                               # (1, C, 1, 1) or (N, C, H, W)
        if self.kernels:
            return self._forward_kernels(x, c0)
        x1 = self.conv_x(x)                                        # (N, 1, H, W) -> (N, C, H, W)
        f = torch.sigmoid(self.conv_f(x1))                         # forget gate, (N, C, H, W)
        i = torch.sigmoid(self.conv_i(x1))                         # input gate
        o = torch.sigmoid(self.conv_o(x1))                         # output gate
        g = torch.tanh(self.conv_g(x1))                            # cell candidate
        c = f * c0 + i * g                                         # cell state, (N, C, H, W)
        h = o * torch.tanh(c) * self.epsilon.view(1, -1, 1, 1)     # (N, C, H, W), eps per channel
        return x - self.conv_out(h), c                             # T_new (N, 1, H, W), c

    def _stacked_gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The four gate convolutions as one: weight (4C, C, 3, 3), bias (4C,), blocks forget, input, output, cell
        candidate, the last block doubled so that sigmoid of it gives tanh(u) = 2 sigmoid(2u) - 1."""
        weight = torch.cat([self.conv_f.weight, self.conv_i.weight, self.conv_o.weight, 2.0 * self.conv_g.weight])
        bias = torch.cat([self.conv_f.bias, self.conv_i.bias, self.conv_o.bias, 2.0 * self.conv_g.bias])
        return weight, bias

    def _forward_kernels(self, x: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward with the composed 5x5 gate convolution and the hand-written one-channel convolutions."""
        wg, bg = self._stacked_gates()                             # (4C, C, 3, 3), (4C,)
        z = gate_preactivations(x, self.conv_x.weight, self.conv_x.bias, wg, bg, nhwc=self.nhwc)   # (N, 4C, H, W)
        f, i, o, s = torch.sigmoid(z).chunk(4, dim=1)              # s = sigmoid(2 conv_g(x1))
        c = torch.addcmul(torch.addcmul(-i, i, s, value=2.0), f, c0)    # f * c0 + i * g, g = 2 s - 1
        h = o * torch.tanh(c)                                      # (N, C, H, W)
        weight = self.conv_out.weight * self.epsilon.view(1, -1, 1, 1)  # conv_out(h * eps)
        return x - conv_to_one(h, weight, self.conv_out.bias), c

    @torch.no_grad()
    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form (eval, no autograd): the composed 5x5 gate convolution run in cache-sized
        bands of rows with the border ring corrected, tanh through sigmoid, eps (and the 1/2 of that tanh)
        folded into conv_out; ``bf16`` stores the weights, and so computes the gates, in bfloat16."""
        if self.deployed:
            return
        wg, bg = self._stacked_gates()                             # (4C, C, 3, 3), cell rows doubled
        self.gates = conv_with(self.conv_f, wg, bg)               # for the border ring
        w5, b5 = compose_gate_kernel(self.conv_x.weight.double(), self.conv_x.bias.double(), wg.double(),
                                     bg.double())
        self.gates5 = conv_with(nn.Conv2d(1, 4 * self.channels, 5, padding=2), w5, b5)
        # o * tanh(c) * eps = (o * (sigmoid(2c) - 1/2)) * 2 eps
        self.conv_out = conv_with(self.conv_out, self.conv_out.weight * (2.0 * self.epsilon).view(1, -1, 1, 1),
                                  self.conv_out.bias)
        del self.conv_f, self.conv_i, self.conv_o, self.conv_g, self.epsilon
        if bf16:
            self.to(torch.bfloat16)
        self.deployed = True

    def _forward_deployed(self, x: torch.Tensor, c_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """forward in bands of rows (``model.kernels.gated_cell_in_bands``). x stays float32; the gates run in
        the dtype of the weights."""
        xd = x.to(self.gates5.weight.dtype)
        c, h = gated_cell_in_bands(xd, self.cell_input(c_prev), self.gates5.weight, self.gates5.bias,
                                   self.conv_x.weight, self.conv_x.bias, self.gates.weight, self.gates.bias, self.nhwc)
        return x - conv_to_one_float(h, self.conv_out.weight, self.conv_out.bias), c   # x - conv_out(o tanh(c) eps)
