"""ONNX Runtime as a backend: a checked ONNX graph of the deploy form (``utils.export.onnx_export``, t_models.py
--onnx) run on numpy arrays, on the CPU, without PyTorch.

    net = OnnxRuntimeNet.from_file("dconet.onnx")        # a saved graph: no export, no check at start
    net.training_size, net.threshold                     # from the graph's metadata
    for prediction in iter_predictions(net, frames, Geometry(resize=net.training_size)): ...
    net = prepare_backend(model, "onnxruntime", training_size=256)    # a PyTorch model exported and checked first

Everything that runs a network (``utils.export.maps``, t_models.py, onnx_detect.py, the Detector) runs either
backend; the outputs agree to float rounding (``utils.export.onnx_export.ONNX_T_ATOL`` at most, checked when the
graph is made). Only ``prepare_backend`` loads torch, and only when it has a PyTorch model to export or run.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from model.config import SIZE_MULTIPLE
from utils import ProjectError
from utils.export.maps import ArrayNetwork

BACKENDS = ("pytorch", "onnxruntime")
INSTALL_HINT = "pip install onnx onnxscript onnxruntime (all three are in requirements.txt)"
DEFAULT_THRESHOLD = 0.5          # sigmoid(T) > 0.5, i.e. T > 0: t_models.py's default


class OnnxModelError(ProjectError):
    """An ONNX file that cannot be run here (ONNX Runtime missing, not a graph of this project, unreadable)."""


class OnnxRuntimeNet(ArrayNetwork):
    """An ONNX Runtime session (CPU provider) of a graph written by ``utils.export.onnx_export``.

    ``maps(batch, return_stages)`` gives the map stack of ``utils.export.maps.ArrayNetwork``: every stage's B, T,
    D from a graph exported with outputs "stages", the last stage's from "BTD" (with or without
    ``return_stages``), T alone from "T". ``run_T(x)`` gives T for (N, 1, H, W) inputs. The graph's metadata
    gives ``stage_num`` (K), ``training_size`` (the default geometry resizes to it), ``threshold`` and ``checked``
    (the checks against PyTorch it passed when written; empty for files written before they were recorded).

    Args:
        session: an ``onnxruntime.InferenceSession``.
        path: the file it was read from, for messages.
    """

    def __init__(self, session, path: str | Path = "the ONNX model"):
        self.session = session
        self.path = Path(path)
        self.outputs = [o.name for o in session.get_outputs()]
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.stage_num = int(self.metadata.get("stage_num", 0))
        if "training_size" not in self.metadata or not {"T", f"T{self.stage_num}"} & set(self.outputs):
            raise OnnxModelError(f"{self.path}: not a DCONet graph written by t_models.py --onnx (no training size "
                                 f"in its metadata, or no output T); write one with: python t_models.py --weights "
                                 f"best.pkl --onnx {self.path.name}")
        self.training_size = int(self.metadata["training_size"])
        self.threshold = float(self.metadata.get("threshold", DEFAULT_THRESHOLD))
        self.checked = self.metadata.get("checked", "")

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None) -> "OnnxRuntimeNet":
        """A session of the ONNX file on the CPU with ``threads`` threads (default: ONNX Runtime's own choice)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError(f"running an ONNX model needs onnxruntime, which is not installed: "
                                 f"{INSTALL_HINT}") from None
        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"{path}: no such ONNX model; write one with: python t_models.py --weights best.pkl "
                                 f"--onnx {path.name}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:        # onnxruntime raises its own types for a damaged or foreign file
            raise OnnxModelError(f"{path}: ONNX Runtime cannot read it ({str(error).splitlines()[0][:200]}); "
                                 f"write it again with t_models.py --onnx") from None
        return cls(session, path)

    def describe(self) -> str:
        """K, the training size, the outputs and the checks, in words."""
        checked = f"checked against PyTorch when written: {self.checked}" if self.checked else "checks not recorded"
        return (f"ONNX graph {self.path}, K = {self.stage_num}, trained at {self.training_size}x{self.training_size}, "
                f"threshold {self.threshold:g}, outputs {', '.join(self.outputs)}; {checked}")

    def run_T(self, x: np.ndarray) -> np.ndarray:
        """T (N, 1, H, W) for images x (N, 1, H, W) float32."""
        return self.session.run(["T" if "T" in self.outputs else f"T{self.stage_num}"],
                                {"image": np.ascontiguousarray(x, np.float32)})[0]

    def maps(self, batch: np.ndarray, return_stages: bool = False) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 3 or batch.shape[1] % SIZE_MULTIPLE or batch.shape[2] % SIZE_MULTIPLE or not batch.size:
            raise ValueError(f"expected images (N, H, W) with H and W positive multiples of {SIZE_MULTIPLE}, got "
                             f"shape {batch.shape}")
        x = batch[:, None]                                               # (N, H, W) -> (N, 1, H, W)
        if self.outputs == ["T"]:
            return self.run_T(x)
        maps = dict(zip(self.outputs, self.session.run(None, {"image": x})))
        if "T1" in maps:                                                 # every stage: B1, T1, D1, ..., BK, TK, DK
            kept = range(1, self.stage_num + 1) if return_stages else [self.stage_num]
            order = [f"{name}{k}" for k in kept for name in "BTD"]
        else:
            order = ["B", "T", "D"]
        return np.concatenate([maps[name] for name in order], axis=1)      # (N, 3S, H, W)


def onnxruntime_device(device) -> str:
    """The device the onnxruntime backend runs on: the CPU, which "auto" means there; another is an error."""
    if str(device) not in ("auto", "cpu"):
        raise ValueError(f"the onnxruntime backend runs on the CPU here, got device {device}; use --device cpu "
                         f"(or auto) or the pytorch backend")
    return "cpu"


def prepare_backend(model, backend: str = "pytorch", device="auto", training_size: int = 256,
                    threads: int | None = None, **deploy_options):
    """The network to run: the PyTorch deploy form (``utils.export.predict.prepare_model`` with
    ``deploy_options``) or, for ``backend="onnxruntime"``, its ONNX graph (every stage's maps) exported and
    checked at three sizes around ``training_size``, in an ONNX Runtime session on the CPU ("auto" means the CPU
    there) with ``threads`` threads (default: PyTorch's thread count)."""
    import torch

    from utils.export.onnx_export import export_onnx, require_onnx
    from utils.export.predict import prepare_model
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "pytorch":
        return prepare_model(model, device, **deploy_options)
    require_onnx("the onnxruntime backend")
    onnxruntime_device(device)
    refused = sorted(k for k, v in deploy_options.items() if k != "sub_batch" and v not in (None, False))
    if refused:
        raise ValueError(f"the onnxruntime backend runs the float32 deploy form (no bf16, compile or plain); "
                         f"drop {', '.join(refused)} or use the pytorch backend")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dconet.onnx"
        export_onnx(model, path, training_size, outputs="stages")
        return OnnxRuntimeNet.from_file(path, threads or torch.get_num_threads())
