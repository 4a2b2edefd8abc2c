"""Speed kernels shared by the blocks, and the weight algebra of their deploy forms.

DCONet works on one-channel images: several of its convolutions read one channel (C_in = 1) or write one
(C_out = 1) at full resolution. oneDNN runs the backward passes of both, and the forward pass of C_out = 1, at
a few GFLOP/s. Here those become matrix products over the k*k shifted copies of the one-channel plane, which
run at matrix speed. Each function computes what ``F.conv2d`` computes (stride 1, 'same' zero padding), in
NCHW or NHWC layout, to float rounding; the backward passes are written out so that no full-size temporary
is made per tap. The autograd functions serve training when the model's speed kernels are on
(``DCONet.use_kernels``); the no-autograd helpers (``conv_to_one_float``, ``conv1x1``, ``max_pool2x2``)
and ``fold_batchnorm`` serve the deploy forms (the blocks' ``reparameterize`` methods). The BSGU's gates as
one composed convolution are in ``model.kernels``.

Per device: the matrix-product forms exist for oneDNN. On a GPU, cuDNN runs these shapes well, and the forms'
per-image loops and k*k shifted adds would be hundreds of small kernel launches per step; there
``conv_from_one``, ``conv_to_one`` and ``conv_to_one_float`` are one ``F.conv2d`` call (``gpu_forms``). The
environment variable DCONET_GPU_PATHS=1 (``utils.io.runtime.forced_gpu_paths``) makes the CPU take the GPU's forms,
so that tests run them on machines without a GPU.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def gpu_forms(device: torch.device) -> bool:
    """Whether the kernels take their GPU forms on ``device`` (cuDNN's convolutions, whole-image bands): on CUDA,
    or anywhere while DCONET_GPU_PATHS is 1; else the CPU's matrix-product forms (oneDNN)."""
    return device.type == "cuda" or os.environ.get("DCONET_GPU_PATHS") == "1"


def is_nhwc(x: torch.Tensor) -> bool:
    """True for a 4-D tensor with more than one channel stored as (N, H, W, C)."""
    return x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)


def nhwc_weight(weight: torch.Tensor) -> torch.Tensor:
    """A convolution weight (O, I, kh, kw) stored as (O, kh, kw, I), also for I = 1, where
    ``contiguous(memory_format=torch.channels_last)`` keeps the NCHW strides (and the output comes back NCHW)."""
    o, i, kh, kw = weight.shape
    if weight.stride() == (kh * kw * i, 1, kw * i, i):
        return weight
    out = torch.empty_strided(weight.shape, (kh * kw * i, 1, kw * i, i), dtype=weight.dtype, device=weight.device)
    return out.copy_(weight)


def _shifted_planes(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k*k shifted copies of a one-channel image under zero padding k // 2: (k*k, N, H, W), tap-major.

    x: (N, 1, H, W)."""
    n, _, h, w = x.shape
    xp = F.pad(x[:, 0], (k // 2,) * 4)                                     # (N, H + k - 1, W + k - 1)
    return torch.stack([xp[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)])


def _add_shifted(planes: torch.Tensor, k: int) -> torch.Tensor:
    """The adjoint of ``_shifted_planes``: sum over taps of each plane moved back into place. (k*k, N, H, W) ->
    (N, 1, H, W)."""
    _, n, h, w = planes.shape
    r = k // 2
    out = planes.new_zeros(n, h + 2 * r, w + 2 * r)
    for t in range(k * k):
        dy, dx = divmod(t, k)
        out[:, dy:dy + h, dx:dx + w] += planes[t]
    return out[:, r:r + h, r:r + w].unsqueeze(1)


def _as_rows(y: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) matrix, a view for NHWC storage, else a copy."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _in_dtype_of(grad: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The saved tensors in the gradient's dtype (under autocast the backward computes in that dtype)."""
    return tuple(t.to(grad.dtype) for t in tensors)


def _in_dtypes(dtypes: tuple[torch.dtype, ...], *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each gradient in the dtype of the input it belongs to (None stays None)."""
    return tuple(g.to(d) if g is not None else None for g, d in zip(grads, dtypes))


class _ConvFromOne(torch.autograd.Function):
    """y = conv2d(x, weight, bias, padding=k // 2) for a one-channel x (N, 1, H, W), weight (C, 1, k, k).

    The forward pass is oneDNN's; the backward pass, which oneDNN runs slowly for this shape, is two matrix
    products with the k*k shifted copies of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, nhwc):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        k = weight.shape[-1]
        if nhwc:      # a weight stored (C, k, k, 1) makes oneDNN write the output as (N, H, W, C)
            weight = nhwc_weight(weight)
        return F.conv2d(x, weight, bias, padding=k // 2)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dtypes = x.dtype, weight.dtype
        x, weight = _in_dtype_of(grad, x, weight)
        c, k = weight.shape[0], weight.shape[-1]
        n, _, h, w = x.shape
        grad_x = grad_w = grad_b = None
        if is_nhwc(grad):
            g = _as_rows(grad)                                              # (N*H*W, C), a view
            if ctx.needs_input_grad[1]:
                cols = _shifted_planes(x, k).view(k * k, -1)                # (k*k, N*H*W)
                grad_w = torch.mm(cols, g).t().reshape(weight.shape)        # (C, 1, k, k)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0)
            if ctx.needs_input_grad[0]:
                planes = torch.mm(weight.view(c, k * k).t(), g.t())         # (k*k, N*H*W)
                grad_x = _add_shifted(planes.view(k * k, n, h, w), k)
        else:
            g = grad.reshape(n, c, h * w)                                   # (N, C, H*W)
            if ctx.needs_input_grad[1]:
                cols = _shifted_planes(x, k).view(k * k, n, h * w).transpose(0, 1)       # (N, k*k, H*W)
                grad_w = torch.bmm(g, cols.transpose(1, 2)).sum(0).reshape(weight.shape)  # (C, 1, k, k)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum((0, 2))
            if ctx.needs_input_grad[0]:
                wt = weight.view(c, k * k).t()                              # (k*k, C)
                planes = torch.stack([torch.mm(wt, g[j]) for j in range(n)], dim=1)     # (k*k, N, H*W)
                grad_x = _add_shifted(planes.view(k * k, n, h, w), k)
        grad_x, grad_w = _in_dtypes(dtypes, grad_x, grad_w)
        return grad_x, grad_w, grad_b, None


def conv_from_one(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  nhwc: bool = False) -> torch.Tensor:
    """conv2d of a one-channel image (N, 1, H, W) with weight (C, 1, k, k), k odd, padding k // 2.

    ``nhwc`` returns the (N, C, H, W) result stored as (N, H, W, C) (channels_last)."""
    if weight.shape[1] != 1 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 != 1:
        raise ValueError(f"conv_from_one needs a (C, 1, k, k) weight with k odd, got {tuple(weight.shape)}")
    if gpu_forms(x.device):
        return F.conv2d(x, nhwc_weight(weight) if nhwc else weight, bias, padding=weight.shape[-1] // 2)
    return _ConvFromOne.apply(x, weight, bias, nhwc)


class _ConvToOne(torch.autograd.Function):
    """y = conv2d(x, weight, bias, padding=k // 2) for weight (1, C, k, k): one (k*k, C) @ (C, pixels) product
    gives every tap's partial sum, then the k*k shifted planes are added."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv_to_one_float(x, weight, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dtypes = x.dtype, weight.dtype
        x, weight = _in_dtype_of(grad, x, weight)
        c, k = weight.shape[1], weight.shape[-1]
        r = k // 2
        n, _, h, w = x.shape
        gp = F.pad(grad[:, 0], (r, r, r, r))                                 # (N, H + 2r, W + 2r)
        # d out[p] / d parts[t][p + (dy - r, dx - r)] = 1: the tap planes' gradient is the shifted output gradient
        planes = torch.stack([gp[:, 2 * r - dy:2 * r - dy + h, 2 * r - dx:2 * r - dx + w]
                              for dy in range(k) for dx in range(k)]).view(k * k, -1)   # (k*k, N*H*W)
        grad_x = grad_w = grad_b = None
        taps = weight.reshape(c, k * k).t()                                 # (k*k, C)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum().reshape(1)
        if is_nhwc(x):
            if ctx.needs_input_grad[1]:
                grad_w = torch.mm(planes, _as_rows(x)).t().reshape(weight.shape)    # (1, C, k, k)
            if ctx.needs_input_grad[0]:
                rows = torch.mm(planes.t(), taps)                           # (N*H*W, C)
                grad_x = rows.view(n, h, w, c).permute(0, 3, 1, 2)          # NHWC storage, like x
        else:
            per_image = planes.view(k * k, n, h * w).transpose(0, 1)        # (N, k*k, H*W)
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(per_image, x.reshape(n, c, h * w).transpose(1, 2)).sum(0)   # (k*k, C)
                grad_w = grad_w.t().reshape(weight.shape)
            if ctx.needs_input_grad[0]:
                grad_x = torch.stack([torch.mm(taps.t(), per_image[j]) for j in range(n)]).view(n, c, h, w)
        grad_x, grad_w = _in_dtypes(dtypes, grad_x, grad_w)
        return grad_x, grad_w, grad_b


def conv_to_one_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward of ``conv_to_one`` (no autograd); the tap planes are summed in float32 at least. On a GPU, and
    while exporting (where the per-image loop would freeze the batch size), one float32 convolution."""
    c, k = weight.shape[1], weight.shape[-1]
    if exporting() or gpu_forms(x.device):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), padding=k // 2)
    n, _, h, w = x.shape
    taps = weight.reshape(c, k * k).t()                                   # (k*k, C), row ky * k + kx
    if is_nhwc(x):
        parts = torch.mm(taps, _as_rows(x).t()).view(k * k, n, h, w)       # (k*k, N, H, W)
    else:
        rows = x.reshape(n, c, h * w)
        parts = torch.stack([torch.mm(taps, rows[j]) for j in range(n)], dim=1).view(k * k, n, h, w)
    r = k // 2
    parts = F.pad(parts.to(torch.promote_types(parts.dtype, torch.float32)), (r, r, r, r))
    centre = (k * k) // 2
    out = parts[centre, :, r:r + h, r:r + w].clone()
    if bias is not None:
        out += bias.to(out.dtype)
    for t in range(k * k):
        if t != centre:
            dy, dx = divmod(t, k)
            out += parts[t, :, dy:dy + h, dx:dx + w]
    return out.unsqueeze(1)                                                # (N, 1, H, W)


def conv_to_one(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d with one output channel, weight (1, C, k, k), k odd, padding k // 2; x (N, C, H, W)."""
    if weight.shape[0] != 1 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 != 1:
        raise ValueError(f"conv_to_one needs a (1, C, k, k) weight with k odd, got {tuple(weight.shape)}")
    if gpu_forms(x.device):
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    return _ConvToOne.apply(x, weight, bias)


class _AddToBorder(torch.autograd.Function):
    """z (in place) += the four one-pixel border strips: top and bottom rows (N, C, 1, W), left and right
    columns without the corners (N, C, H - 2, 1). The gradient passes through to z unchanged (no copy)."""

    @staticmethod
    def forward(ctx, z, top, bottom, left, right):
        z[..., :1, :] += top
        z[..., -1:, :] += bottom
        z[..., 1:-1, :1] += left
        z[..., 1:-1, -1:] += right
        ctx.mark_dirty(z)
        return z

    @staticmethod
    def backward(ctx, grad):
        return (grad, grad[..., :1, :], grad[..., -1:, :], grad[..., 1:-1, :1], grad[..., 1:-1, -1:])


def add_to_border(z: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, left: torch.Tensor,
                  right: torch.Tensor) -> torch.Tensor:
    """z += strips on its border ring, in place; see ``_AddToBorder``."""
    return _AddToBorder.apply(z, top, bottom, left, right)


# ----------------------------------------------------------------------------------------------------------
# Deploy forms (no autograd)
# ----------------------------------------------------------------------------------------------------------

def exporting() -> bool:
    """True while ``torch.export`` (and so the ONNX exporter) traces the model.

    A graph traced for export must hold for every input size, but the deploy forms' CPU kernels loop in Python
    over sizes (bands of rows, images of a batch) and take sizes as Python numbers, which tracing freezes into
    the graph as constants. While exporting, the deploy forms compute the same function with standard
    operators whose shapes come from the tensors (``utils/export/onnx_export.py`` checks the graph against
    PyTorch at three sizes)."""
    return bool(_IS_EXPORTING is not None and _IS_EXPORTING())


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)          # PyTorch 2.5 and later


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution; in channels_last layout one (N*H*W, Cin) @ (Cin, Cout) matrix product."""
    if exporting() or not is_nhwc(x):
        return conv(x)
    n, cin, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, cin)                    # (N, Cin, H, W) -> (N*H*W, Cin), a view
    weight = conv.weight.view(conv.out_channels, cin).t()             # (Cin, Cout)
    y = torch.mm(rows, weight) if conv.bias is None else torch.addmm(conv.bias, rows, weight)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)                    # (N*H*W, Cout) -> (N, Cout, H, W), NHWC


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """max_pool2d(x, 2) as the maximum of the four phases (the same values, NaN included); while exporting,
    max_pool2d itself (one operator in the graph)."""
    if exporting():
        return F.max_pool2d(x, 2)
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d | None = None) -> nn.Conv2d:
    """A new convolution, shaped as ``conv``, that computes eval-mode ``norm(conv(x))`` (``conv(x)`` without norm).

    The arithmetic runs in float64 and the result is rounded once to float32; the new convolution has no
    gradients."""
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if norm is not None:
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    return conv_with(conv, weight, bias)


@torch.no_grad()
def conv_with(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """An nn.Conv2d with conv's stride, padding, dilation and groups holding ``weight`` and ``bias`` as float32
    (shapes may differ from conv's in the channel counts), without gradients."""
    out_channels, in_per_group = weight.shape[:2]
    new = nn.Conv2d(in_per_group * conv.groups, out_channels, tuple(weight.shape[2:]), stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=bias is not None,
                    device=weight.device)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new.requires_grad_(False)
