"""Inference: a copy of the model switched to its blocks' deploy forms, prepared once to run, in one wrapper.

The pattern is re-parameterisation (RepVGG, MobileOne, timm's ``reparameterize_model``): each block keeps its
training form as its forward and, being ``Reparameterizable``, owns a ``reparameterize`` method that switches it
to an equivalent deploy form (BatchNorm folded into the convolution, the axial block as one depthwise
convolution, the BSGU's gates as one banded 5x5 convolution, ...; see the blocks). ``deploy`` deep-copies the
model, puts it in eval mode, walks its modules calling that method, sets the layout, and wraps the copy in a
``DeployedDCONet``, which moves it to its device, holds its precision and decides its sub-batches. The copy's
own stage loop (``DCONet.forward``) runs; there is no second network.

In float32 the outputs equal the model's to rounding (a few 1e-6 of their scale; tests/model/test_deploy.py).
"""
from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext

import torch
from torch import nn

from .capabilities import Reparameterizable
from .dconet import DCONet, StageOutput, unwrap
from .ops import gpu_forms

# bf16=True runs the blocks that declare ``bf16_capable`` (the BSGU and the reconstruction, the latter's first
# convolution excepted) in bfloat16. The DBEM stays float32: its output B enters T = D - B + ... directly, so its
# rounding would add several times more error (benchmarks/README.md), for no speed to speak of.
BF16_T_RTOL = 0.02          # the bound the tests hold bf16=True to: max |dT| < BF16_T_RTOL * max |T|


def reparameterize_blocks(module: nn.Module, bf16: bool = False) -> None:
    """Switch ``module`` and then its (possibly new) children to their deploy forms, parents first, in place.

    A module with a ``reparameterize`` method that does not inherit ``Reparameterizable`` is refused with a
    TypeError (its deploy form would otherwise be skipped without a word), and so is a ``reparameterize`` that
    leaves its block undeployed."""
    if isinstance(module, Reparameterizable):
        module.reparameterize(bf16=bf16 and module.bf16_capable)
        if not module.deployed:
            raise RuntimeError(f"{type(module).__name__}.reparameterize() left the block in its training form "
                               f"(it must set deployed = True)")
    elif callable(getattr(module, "reparameterize", None)):
        raise TypeError(f"{type(module).__name__} defines reparameterize() but does not inherit "
                        f"model.capabilities.Reparameterizable, so deploy() cannot tell that it has a deploy form; "
                        f"make the class inherit Reparameterizable")
    for child in module.children():
        reparameterize_blocks(child, bf16)


def is_deployed(module: nn.Module) -> bool:
    """True for a module made by ``deploy`` (it holds its own device and precision and runs without autograd)."""
    return isinstance(module, DeployedDCONet)


class DeployedDCONet(nn.Module):
    """A network prepared for inference, built by ``deploy``: the one wrapper that export, validation, the
    Detector and the benchmarks run.

    forward(x) -> (D, T) and forward(x, return_stages=True) -> (D, T, [StageOutput per stage]), as
    ``DCONet.forward`` in eval mode; no autograd; outputs float32 whatever the precision inside, on ``device``.

    Attributes:
        model: what runs: the deployed copy, or with ``plain`` a copy in its training form (eval mode).
        plain: the blocks keep their paper forward (``bf16`` then runs it under torch.autocast).
        bf16: bfloat16 arithmetic (in the deploy form: the ``bf16_capable`` blocks' weights).
        device: where the network runs; inputs elsewhere are moved there.
        sub_batch: images per forward pass, decided here once: a call with more images runs them in chunks of
            this many, one after another (in eval mode every image is independent, so the outputs do not depend
            on it). None runs the whole batch of a call in one pass. ``deploy`` sets it to the caller's number,
            or by default to 1 on the CPU (one image's working set stays near the caches: faster,
            benchmarks/README.md) and None on a GPU.
    """

    def __init__(self, model: nn.Module, device: torch.device, sub_batch: int | None, plain: bool = False,
                 bf16: bool = False, compile: bool = False):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.device = device
        self.sub_batch = sub_batch
        self.plain = plain
        self.bf16 = bf16
        self.run = torch.compile(model.forward, dynamic=False) if compile else model.forward

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        DCONet.check_input(x)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.plain and self.bf16
                    else nullcontext())
        x = x.to(self.device, torch.float32)
        with torch.no_grad(), autocast:     # stages only when asked for: keeping them costs time and memory
            outs = [self.run(chunk, return_stages=return_stages) for chunk in x.split(self.sub_batch or len(x))]
        D = torch.cat([out[0] for out in outs]).float()
        T = torch.cat([out[1] for out in outs]).float()
        if not return_stages:
            return D, T
        # per stage, per field (B, T, D): the sub-batches' tensors concatenated
        stages = [StageOutput(*(torch.cat(field).float() for field in zip(*per_chunk)))
                  for per_chunk in zip(*(out[2] for out in outs))]
        return D, T, stages


def deploy(model: nn.Module, bf16: bool = False, channels_last: bool = True, compile: bool = False, *,
           device: str | torch.device | None = None, sub_batch: int | None = None,
           plain: bool = False) -> DeployedDCONet:
    """An inference-only copy of ``model`` with DCONet's forward API and, in float32, the same outputs.

    Args:
        model: a DCONet (also wrapped by DistributedDataParallel or torch.compile). Its weights and BatchNorm
            running statistics are copied as they are now; the model itself is left as it was. Deploy again
            after the weights change.
        bf16: bfloat16 arithmetic; T then differs from float32 by less than ``BF16_T_RTOL * max |T|``.
        channels_last: activations in (N, H, W, C) layout, the native one of oneDNN and cuDNN (deploy form).
        compile: ``torch.compile`` the network (the first call of each input shape compiles, for minutes).
        device: where to run (a torch.device or its name); None: where the model's weights are.
        sub_batch: images per forward pass (``DeployedDCONet.sub_batch``); None: 1 on the CPU, the whole
            batch on a GPU.
        plain: keep the blocks' training forms, the paper's forward (for comparison and debugging); then
            ``model`` may also be any module with DCONet's call signature, and ``channels_last`` is not applied.
    """
    model = unwrap(model)
    if not plain and not isinstance(model, DCONet):
        raise TypeError(f"deploy expects a DCONet, got {type(model).__name__} (plain=True runs any module "
                        f"with DCONet's call signature)")
    if bf16 not in (True, False):
        raise ValueError(f"bf16 must be True or False, got {bf16!r}")
    if sub_batch is not None and sub_batch < 1:
        raise ValueError(f"sub_batch must be a positive number of images or None, got {sub_batch}")
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    device = torch.device(device)
    deployed = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if not plain:
        reparameterize_blocks(deployed, bool(bf16))
        deployed.set_channels_last(channels_last)
    if sub_batch is None and not gpu_forms(device):
        sub_batch = 1
    return DeployedDCONet(deployed, device, sub_batch, plain=plain, bf16=bool(bf16), compile=compile).eval()
