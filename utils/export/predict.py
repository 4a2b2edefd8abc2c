"""Inference in PyTorch: DCONet predictions for images of any size, one at a time or in batches, on the CPU or a GPU.

The geometry (native or resized, tiles), the batching by size and the ``Prediction`` are ``utils.export.maps``'s,
which imports no torch and serves onnx_detect.py too; this module adds the PyTorch network: ``prepare_model``
(the deploy form on a device) and ``run_network`` (one forward pass on numpy arrays). The names of
``utils.export.maps`` that the PyTorch path uses are imported here with it, so that one import serves::

    from utils.export.predict import Geometry, iter_predictions, prepare_model
    net = prepare_model(model, torch.device("cuda"))           # a DeployedDCONet: deploy form, eval, on the device
    for prediction in iter_predictions(net, [("img1", image)], Geometry()):
        prediction.T                                            # (H, W) float32 logits

Tiled and untiled outputs are not identical (``utils.export.maps``); ``TILE_ATOL`` in the tests is the difference
measured.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from model import DeployedDCONet, deploy
from utils.export.maps import (RELEASE_SIZE, Geometry, Prediction, iter_predictions, predict,  # noqa: F401
                               run_tiled, trained_geometry)
from utils.io.runtime import resolve_device


def prepare_model(model: nn.Module, device: str | torch.device, bf16: bool = False, compile: bool = False,
                  plain: bool = False, sub_batch: int | None = None) -> DeployedDCONet:
    """``model.deploy`` on a device given as the command line gives it ("auto", "cpu", "cuda", "cuda:N").

    Args:
        bf16: bfloat16 arithmetic. In the deploy form the BSGU and the reconstruction run in bfloat16 (T stays
            within ``model.deploy.BF16_T_RTOL`` of max |T| of float32); with ``plain`` the whole forward runs
            under torch.autocast. Outputs are float32 either way.
        compile: torch.compile the network (the first call of every input size then compiles, which takes minutes).
        plain: run the model's own forward instead of its deploy form (for comparison and debugging, and for a
            stand-in module that is not a DCONet).
        sub_batch: images per forward pass (``DeployedDCONet.sub_batch``); None: 1 on the CPU, all on a GPU.

    Returns a ``DeployedDCONet``: call it as the DCONet, ``net(x)`` -> (D, T), ``net(x, True)`` -> (D, T, stages).
    It holds a copy of the weights as they are now (the model is left as it was): prepare again after they change.
    """
    return deploy(model, bf16=bf16, compile=compile, device=resolve_device(device), sub_batch=sub_batch,
                  plain=plain)


def model_device(model) -> torch.device:
    """The device a prepared model runs on (its ``device``), else that of its first parameter or buffer."""
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    raise ValueError(f"{type(model).__name__} holds no tensor to tell its device by")


def run_network(model: nn.Module, batch: np.ndarray, return_stages: bool = False) -> np.ndarray:
    """One forward pass of a prepared model on a batch (N, H, W) of network inputs (H, W multiples of 32).

    Returns the map stack (N, 3 * S, H, W) float32: B, T, D of every stage (S = K) with ``return_stages``, else of
    the last stage only (S = 1).
    """
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    with torch.inference_mode():
        _, _, stages = model(x.to(model_device(model)), return_stages=True)
        kept = stages if return_stages else stages[-1:]
        maps = torch.cat([torch.cat([s.B, s.T, s.D], dim=1) for s in kept], dim=1)  # (N, 3S, H, W)
        return maps.float().cpu().numpy()
