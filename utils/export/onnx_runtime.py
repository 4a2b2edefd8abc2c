"""ONNX Runtime as a backend: a checked ONNX graph of the deploy form run with DeployedDCONet's call API.

    net = prepare_backend(model, "onnxruntime", training_size=256)    # exports, checks, opens a session
    D, T, stages = net(x, return_stages=True)                          # as the PyTorch deploy form

Everything that runs a prepared model (``utils.export.predict``, t_models.py, the Detector) runs either
backend; the outputs agree to float rounding (``utils.export.onnx_export.ONNX_T_ATOL`` at most, checked when
the graph is made).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import DeployedDCONet, StageOutput
from model.dconet import DCONet
from utils.io.runtime import resolve_device

BACKENDS = ("pytorch", "onnxruntime")


class OnnxRuntimeNet:
    """An ONNX Runtime session (CPU provider) of a graph from ``utils.export.onnx_export`` with the call API
    of ``DeployedDCONet``: ``net(x)`` -> (D, T), ``net(x, return_stages=True)`` -> (D, T, stages), float32
    tensors on the CPU. Every stage's maps need a graph exported with ``outputs="stages"``; a graph with fewer
    outputs answers only what it has (T alone: ``run_T``).

    Args:
        session: an ``onnxruntime.InferenceSession``.
    """

    device = torch.device("cpu")

    def __init__(self, session):
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        meta = session.get_modelmeta().custom_metadata_map
        self.stage_num = int(meta.get("stage_num", 0))
        self.training_size = int(meta["training_size"]) if "training_size" in meta else None

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> "OnnxRuntimeNet":
        """A session of the ONNX file on the CPU with ``threads`` threads (default: PyTorch's thread count)."""
        from utils.export.onnx_export import require_onnx
        require_onnx("the onnxruntime backend")
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return cls(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    def run_T(self, x: np.ndarray) -> np.ndarray:
        """T (N, 1, H, W) for images x (N, 1, H, W) float32."""
        return self.session.run(["T" if "T" in self.outputs else f"T{self.stage_num}"], {"image": x})[0]

    def __call__(self, x: torch.Tensor, return_stages: bool = False):
        DCONet.check_input(x)
        maps = self.session.run(None, {"image": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})
        maps = dict(zip(self.outputs, (torch.from_numpy(m) for m in maps)))
        if "T1" in maps:                                           # every stage: B1, T1, D1, ..., BK, TK, DK
            stages = [StageOutput(maps[f"B{k}"], maps[f"T{k}"], maps[f"D{k}"]) for k in range(1, self.stage_num + 1)]
        elif "B" in maps:
            stages = [StageOutput(maps["B"], maps["T"], maps["D"])]
        else:
            if return_stages:
                raise ValueError("this ONNX graph gives T alone; export it with outputs B, T, D "
                                 "(t_models.py --onnx-outputs BTD) to get the stages' maps")
            return None, maps["T"]
        last = stages[-1]
        return (last.D, last.T, stages) if return_stages else (last.D, last.T)


def prepare_backend(model: nn.Module, backend: str = "pytorch", device: str | torch.device = "auto",
                    training_size: int = 256, threads: int | None = None,
                    **deploy_options) -> DeployedDCONet | OnnxRuntimeNet:
    """The network to run: the PyTorch deploy form (``utils.export.predict.prepare_model`` with
    ``deploy_options``) or, for ``backend="onnxruntime"``, its ONNX graph (every stage's maps) exported and
    checked at three sizes around ``training_size``, in an ONNX Runtime session on the CPU ("auto" means the CPU
    there)."""
    from utils.export.predict import prepare_model
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "pytorch":
        return prepare_model(model, device, **deploy_options)
    from utils.export.onnx_export import export_onnx, require_onnx
    require_onnx("the onnxruntime backend")
    if device != "auto" and resolve_device(device).type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU here, got device {device}; "
                         f"use --device cpu or the pytorch backend")
    refused = sorted(k for k, v in deploy_options.items() if k != "sub_batch" and v not in (None, False))
    if refused:
        raise ValueError(f"the onnxruntime backend runs the float32 deploy form (no bf16, compile or plain); "
                         f"drop {', '.join(refused)} or use the pytorch backend")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dconet.onnx"
        export_onnx(model, path, training_size, outputs="stages")
        return OnnxRuntimeNet.from_file(path, threads)
