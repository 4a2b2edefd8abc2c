"""The speed kernels compute what the paper's forward computes: the one-channel convolutions of model.ops and
the BSGU's composed gates (model.kernels), values and gradients, border included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomise
from model.bsgu import BSGU
from model.ops import conv_from_one, conv_to_one


# --- model.ops -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("nhwc", [False, True])
def test_one_channel_convolutions_match_conv2d(k, nhwc):
    torch.manual_seed(k)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    x = torch.randn(2, 1, 12, 20, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 1, k, k, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, dtype=torch.double, requires_grad=True)
    y, y_ref = conv_from_one(x, w, b, nhwc), F.conv2d(x, w, b, padding=k // 2)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y_ref).contiguous(memory_format=fmt)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert torch.allclose(a, r, atol=1e-10)
    assert torch.allclose(y, y_ref, atol=1e-10)

    x = torch.randn(2, 6, 12, 20, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(1, 6, k, k, dtype=torch.double, requires_grad=True)
    b = torch.randn(1, dtype=torch.double, requires_grad=True)
    y, y_ref = conv_to_one(x, w, b), F.conv2d(x, w, b, padding=k // 2)
    g = torch.randn_like(y_ref)
    assert torch.allclose(y, y_ref, atol=1e-10)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert torch.allclose(a, r, atol=1e-10)


@pytest.mark.parametrize("first_stage", [True, False])
def test_bsgu_kernels_equal_the_equations_border_included(first_stage):
    """The composed 5x5 gates with their border correction and tanh through sigmoid, values and gradients."""
    bsgu = randomise(BSGU(8, first_stage=first_stage).double(), seed=4)
    torch.manual_seed(4)
    D, B, T = (torch.randn(2, 1, 9, 13, dtype=torch.double, requires_grad=True) for _ in range(3))
    c_prev = None if first_stage else torch.randn(2, 8, 9, 13, dtype=torch.double, requires_grad=True)
    inputs = [t for t in (D, B, T, c_prev) if t is not None] + list(bsgu.parameters())
    g_T, g_c = torch.randn(2, 1, 9, 13, dtype=torch.double), torch.randn(2, 8, 9, 13, dtype=torch.double)
    results = []
    for kernels in (False, True):
        bsgu.kernels = kernels
        T_new, c = bsgu(D, B, T, c_prev)
        results.append([T_new, c, *torch.autograd.grad((T_new, c), inputs, (g_T, g_c))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-9)
