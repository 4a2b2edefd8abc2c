"""DCONet: K unrolled stages of background estimation (DBEM), target gating (BSGU) and reconstruction.

Paper: Zhang, Xu, Lyu, Gong, Chen, Ling, "DCONet: A Dual-Task Collaborative Optimization Network for Infrared
Small Target Detection", IEEE GRSL 22, 2025, https://doi.org/10.1109/LGRS.2025.3597969
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .bsgu import BSGU
from .capabilities import HasKernels, HasLayout
from .config import SIZE_MULTIPLE, DCONetConfig, StageOutput
from .dbem import DBEM
from .ops import nhwc_weight
from .reconstruction import Reconstruction


class DCONetStage(nn.Module):
    """One stage k: B = DBEM(D - T); T, c = BSGU(D, B, T, c); D = M(B + T)."""

    def __init__(self, channels: int, first_stage: bool):
        super().__init__()
        self.dbem = DBEM()
        self.bsgu = BSGU(channels, first_stage=first_stage)
        self.reconstruction = Reconstruction(channels)

    def forward(self, D: torch.Tensor, T: torch.Tensor,
                c: torch.Tensor | None) -> tuple[StageOutput, torch.Tensor]:
        B = self.dbem(D - T)                     # background, (N, 1, H, W)
        T, c = self.bsgu(D, B, T, c)             # target layer (logits), cell state (N, C, H, W)
        D = self.reconstruction(B + T)           # reconstruction, (N, 1, H, W)
        return StageOutput(B, T, D), c


@contextmanager
def frozen_running_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, training-mode BatchNorm layers of ``module`` run exactly as usual (same operations,
    batch statistics); on leaving it their running statistics and ``num_batches_tracked`` are put back to
    what they were on entering. Used for recomputation, which must not count a batch twice."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _run_checkpointed(stage: DCONetStage, D: torch.Tensor, T: torch.Tensor,
                      c: torch.Tensor | None) -> tuple[StageOutput, torch.Tensor]:
    """stage(D, T, c) keeping only its inputs for the backward pass, which runs the stage again first.

    The recomputation sees the same input and the same batch statistics, so it reproduces the forward exactly;
    it must not update the BatchNorm running statistics a second time, so it runs with them frozen.
    """
    calls = 0

    def run(D: torch.Tensor, T: torch.Tensor, c: torch.Tensor | None):
        nonlocal calls
        calls += 1
        if calls == 1:
            return stage(D, T, c)
        with frozen_running_statistics(stage):
            return stage(D, T, c)

    return checkpoint(run, D, T, c, use_reentrant=False, preserve_rng_state=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``) and/or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


class DCONet(nn.Module):
    """The dual-task collaborative optimization network.

    Args:
        config: structure of the model (``DCONetConfig()`` is the release's: K = 5, 32 channels).

    forward(x) takes a grayscale image batch (N, 1, H, W) in [0, 1], H and W multiples of 32, and returns
    (D, T): the last stage's reconstruction and target logits (sigmoid(T) > 0.5 is a target pixel).
    ``forward(x, return_stages=True)`` returns (D, T, stages) with one ``StageOutput`` per stage.

    Three switches change how the forward computes, not what (each returns the model):

    - ``use_kernels(True)``: speed kernels, chiefly for training: the BSGU's gates as one composed 5x5
      convolution, on the CPU the one-channel convolutions' backward passes as matrix products (``model.ops``;
      on a GPU those stay cuDNN's), the decoders' first 1x1 convolution applied before upsampling, the axial
      blocks as one depthwise convolution when no gradient is needed. Off by default, so that the forward runs as the paper's equations read.
    - ``set_channels_last(True)``: weights and activations in (N, H, W, C) layout.
    - ``set_checkpointing(True)`` trades time for memory in training: each stage but the last keeps only its
      inputs for the backward pass and runs again there (one more forward pass of K - 1 stages; activation
      memory of about one stage instead of K). Outputs, gradients and BatchNorm running statistics are those
      of the plain forward.

    For inference, ``model.deploy`` switches a copy to its blocks' deploy forms.
    """

    def __init__(self, config: DCONetConfig | None = None):
        super().__init__()
        self.config = config or DCONetConfig()
        self.stages = nn.ModuleList(
            DCONetStage(self.config.channels, first_stage=(k == 0)) for k in range(self.config.stage_num))
        self.checkpointing = False
        self.reset_parameters()

    def set_checkpointing(self, enabled: bool = True) -> "DCONet":
        """Recompute each stage's activations in the backward pass instead of keeping them (training only)."""
        self.checkpointing = bool(enabled)
        return self

    def use_kernels(self, enabled: bool = True) -> "DCONet":
        """Compute the forward (and its backward pass) with the blocks' speed kernels: the same outputs to float
        rounding, several times less time in the one-channel convolutions and the BSGU's gates."""
        for module in self.modules():
            if isinstance(module, HasKernels):
                module.kernels = bool(enabled)
        return self

    def set_channels_last(self, enabled: bool = True) -> "DCONet":
        """Keep weights and activations in (N, H, W, C) layout, oneDNN's and cuDNN's native one (same results)."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, HasLayout):
                    module.nhwc = bool(enabled)
                # With one input channel a weight (C, 1, k, k) has the same strides in both layouts as far as
                # ``.to`` can tell, so it is stored (C, k, k, 1) explicitly: oneDNN then writes the output NHWC.
                if isinstance(module, nn.Conv2d) and module.in_channels == 1:
                    weight = module.weight.data
                    module.weight.data = nhwc_weight(weight) if enabled else weight.clone(
                        memory_format=torch.contiguous_format)
        return self

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
        D = x                                    # (N, 1, H, W)
        T = torch.zeros_like(x)                  # T0 = 0
        c = None                                 # the cell state starts empty
        stages: list[StageOutput] = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            # The last stage's backward runs first, before any recomputation: keeping its activations costs
            # no extra peak memory, so it is not recomputed.
            out, c = _run_checkpointed(stage, D, T, c) if recompute and k < last else stage(D, T, c)
            D, T = out.D, out.T
            if return_stages:
                stages.append(out)
        if return_stages:
            return D, T, stages
        return D, T
