"""The BSGU's gates as one composed 5x5 convolution of the one-channel input: the weight algebra, the border
ring, and the banded loop of the deploy form.

conv_x feeds nothing but the gates, and both are linear, so the four gates(conv_x(x)) are one 5x5 convolution
of the one-channel x (``compose_gate_kernel``): 4C * 25 multiply-adds per pixel instead of 4C * C * 9. Only on
the image's outermost ring of pixels does the result differ (there the gates see conv_x's zero padding); those
four one-pixel strips are computed the two-convolution way (``gate_border``). ``gate_preactivations`` is the
training-time speed kernel (``DCONet.use_kernels``), ``gated_cell_in_bands`` the deploy form's computation
(``BSGU.reparameterize``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import add_to_border, conv_from_one, exporting, gpu_forms

BAND_BYTES = 4 << 20   # deploy form on the CPU: rows per band of the gates chosen so that a band holds about this much


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
    """gates(conv_x(x)) for a one-channel x (N, 1, H, W), H, W >= 3: (N, 4C, H, W), with autograd.

    One 5x5 convolution of x, then the border ring is corrected by the difference between the exact
    two-convolution strips and the composed strips (all four strips are small)."""
    weight, bias = compose_gate_kernel(wx, bx, wg, bg)
    z = conv_from_one(x, weight, bias, nhwc)                              # (N, 4C, H, W)
    exact, composed = gate_border(x, wx, bx, wg, bg), composite_border(x, weight, bias)
    top, bottom, left, right = (e - c for e, c in zip(exact, composed))
    return add_to_border(z, top, bottom, left[..., 1:-1, :], right[..., 1:-1, :])


def gated_cell_in_bands(x: torch.Tensor, c0: torch.Tensor, w5: torch.Tensor, b5: torch.Tensor,
                        wx: torch.Tensor, bx: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor,
                        nhwc: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The BSGU's cell without autograd, in bands of rows: (c, o * tanh(c) / 2), each (N, C, H, W).

    Each band's gate tensor goes through the gating arithmetic while it is in cache, so the full-resolution
    4C-channel gate tensor is never formed. The gates' cell-candidate rows are doubled (tanh(u) =
    2 sigmoid(2u) - 1, one sigmoid for all four gates); everything runs in the dtype of x.

    x: (N, 1, H, W); c0: (1, C, 1, 1) or (N, C, H, W); w5, b5: ``compose_gate_kernel``'s convolution;
    wx, bx, wg, bg: conv_x and the stacked gates, for the border ring (``gate_border``).
    """
    if exporting():
        return gated_cell_whole(x, c0, w5, b5, wx, bx, wg, bg)
    n, _, H, W = x.shape
    C = w5.shape[0] // 4
    top, bottom, left, right = gate_border(x, wx, bx, wg, bg)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    c = torch.empty(n, C, H, W, dtype=x.dtype, device=x.device, memory_format=layout)
    h = torch.empty_like(c)
    rows = H if gpu_forms(x.device) else max(1, BAND_BYTES // (4 * C * W * x.element_size() * n))
    per_pixel_c0 = tuple(c0.shape[-2:]) != (1, 1)                         # later stages: conv_c(c_prev)
    xp = F.pad(x, (0, 0, 2, 2))                                           # the 5x5's zero rows
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        z = F.conv2d(xp[:, :, r0:r1 + 4], w5, b5, padding=(0, 2))        # (N, 4C, r, W)
        if r0 == 0:
            z[:, :, :1] = top                                             # the exact border ring
        if r1 == H:
            z[:, :, -1:] = bottom
        z[:, :, :, :1], z[:, :, :, -1:] = left[:, :, r0:r1], right[:, :, r0:r1]
        f, i, o, s = z.sigmoid_().split(C, dim=1)                         # s = sigmoid(2 g)
        cb, hb = c[:, :, r0:r1], h[:, :, r0:r1]
        torch.mul(f, c0[:, :, r0:r1] if per_pixel_c0 else c0, out=cb)     # f * c0
        cb.addcmul_(i, s.sub_(0.5), value=2.0)                            # + i * g, g = 2 (s - 1/2)
        torch.mul(cb, 2.0, out=hb).sigmoid_().sub_(0.5).mul_(o)           # o * tanh(c) / 2
    return c, h


def gated_cell_whole(x: torch.Tensor, c0: torch.Tensor, w5: torch.Tensor, b5: torch.Tensor,
                     wx: torch.Tensor, bx: torch.Tensor, wg: torch.Tensor,
                     bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_cell_in_bands`` as one band of the whole image, in standard operators without in-place writes:
    the form traced for export (``model.ops.exporting``), where every shape follows the input's."""
    C = w5.shape[0] // 4
    top, bottom, left, right = gate_border(x, wx, bx, wg, bg)
    z = F.conv2d(x, w5, b5, padding=2)                                    # (N, 4C, H, W)
    z = torch.cat([top, z[:, :, 1:-1], bottom], dim=2)                    # the exact border rows,
    z = torch.cat([left, z[:, :, :, 1:-1], right], dim=3)                 # then columns (corners included)
    f, i, o, s = torch.sigmoid(z).split(C, dim=1)                         # s = sigmoid(2 g)
    c = f * c0 + 2.0 * (i * (s - 0.5))                                    # f * c0 + i * g, g = 2 (s - 1/2)
    return c, o * (torch.sigmoid(2.0 * c) - 0.5)                          # o * tanh(c) / 2
