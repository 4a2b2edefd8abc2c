"""Inference: a copy of the model switched to its blocks' deploy forms, run in sub-batches.

The pattern is re-parameterisation (RepVGG, MobileOne, timm's ``reparameterize_model``): each block keeps its
training form as its forward and owns a ``reparameterize`` method that switches it to an equivalent deploy
form (BatchNorm folded into the convolution, the axial block as one depthwise convolution, the BSGU's gates as
one banded 5x5 convolution, ...; see the blocks). ``optimize_for_inference`` deep-copies the model, puts it in
eval mode, walks its modules calling that method, sets the layout, and wraps the copy so that a batch runs in
sub-batches without autograd. The copy's own stage loop (``DCONet.forward``) runs; there is no second network.

In float32 the outputs equal the model's to rounding (a few 1e-6 of their scale; tests/test_fast.py).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .bsgu import BSGU
from .dconet import DCONet, StageOutput, unwrap
from .reconstruction import Reconstruction

# bf16=True runs these blocks in bfloat16 (the reconstruction's first convolution excepted, see
# ``Reconstruction.reparameterize``). The DBEM stays float32: its output B enters T = D - B + ... directly, so
# its rounding would add several times more error (benchmarks/README.md), for no speed to speak of.
BF16_BLOCKS = (BSGU, Reconstruction)
BF16_T_RTOL = 0.02          # the bound the tests hold bf16=True to: max |dT| < BF16_T_RTOL * max |T|


def _reparameterize(module: nn.Module, bf16: bool) -> None:
    """Switch ``module`` and then its (possibly new) children to their deploy forms, parents first."""
    if isinstance(module, BF16_BLOCKS):
        module.reparameterize(bf16=bf16)
    elif hasattr(module, "reparameterize"):
        module.reparameterize()
    for child in module.children():
        _reparameterize(child, bf16)


def is_deployed(module: nn.Module) -> bool:
    """True for a module made by ``optimize_for_inference`` (it holds its own precision and runs without autograd)."""
    return isinstance(module, FastDCONet)


class FastDCONet(nn.Module):
    """A DCONet in its deploy form for inference, built by ``optimize_for_inference``.

    forward(x) -> (D, T) and forward(x, return_stages=True) -> (D, T, [StageOutput per stage]), as
    ``DCONet.forward`` in eval mode; float32 outputs, no autograd. ``model`` is the deployed copy.
    """

    def __init__(self, model: DCONet, sub_batch: int | None = None, compile: bool = False):
        super().__init__()
        self.model = model
        self.config = model.config
        self.sub_batch = sub_batch
        self.run = torch.compile(model.forward, dynamic=False) if compile else model.forward

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        DCONet.check_input(x)
        # in eval mode every image is independent: on the CPU one at a time keeps the working set of the
        # full-resolution layers near the caches
        step = self.sub_batch or (1 if x.device.type == "cpu" else x.shape[0])
        with torch.no_grad():
            outs = [self.run(chunk, return_stages) for chunk in x.float().split(step)]
        D = torch.cat([out[0] for out in outs])
        T = torch.cat([out[1] for out in outs])
        if not return_stages:
            return D, T
        # per stage, per field (B, T, D): the sub-batches' tensors concatenated
        stages = [StageOutput(*map(torch.cat, zip(*per_chunk))) for per_chunk in zip(*(out[2] for out in outs))]
        return D, T, stages


def optimize_for_inference(model: DCONet, bf16: bool = False, channels_last: bool = True,
                           compile: bool = False, sub_batch: int | None = None) -> FastDCONet:
    """An inference-only copy of ``model`` with the same forward API and, in float32, the same outputs.

    Args:
        model: a DCONet (also wrapped by DistributedDataParallel or torch.compile). Its weights and BatchNorm
            running statistics are copied as they are now; the model itself is left as it was.
        bf16: run ``BF16_BLOCKS`` in bfloat16 (faster on CPUs with AVX512-BF16); T then differs from float32
            by less than ``BF16_T_RTOL * max |T|``.
        channels_last: activations in (N, H, W, C) layout, the native one of oneDNN and cuDNN.
        compile: ``torch.compile`` the stage loop (the first call of each input shape compiles, for minutes).
        sub_batch: images per chunk of the batch; None: one at a time on the CPU, the whole batch on a GPU.
    """
    model = unwrap(model)
    if not isinstance(model, DCONet):
        raise TypeError(f"optimize_for_inference expects a DCONet, got {type(model).__name__}")
    if bf16 not in (True, False):
        raise ValueError(f"bf16 must be True or False, got {bf16!r}")
    if sub_batch is not None and sub_batch < 1:
        raise ValueError(f"sub_batch must be a positive number of images or None, got {sub_batch}")
    deployed = copy.deepcopy(model).eval().requires_grad_(False)
    _reparameterize(deployed, bool(bf16))
    deployed.set_channels_last(channels_last)
    return FastDCONet(deployed, sub_batch=sub_batch, compile=compile).eval()
