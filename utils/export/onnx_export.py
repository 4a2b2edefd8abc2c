"""ONNX export of the deploy form, checked against PyTorch at three sizes before the file is kept.

    report = export_onnx(model, "dconet.onnx", training_size=256)       # refuses a graph that is off anywhere
    report.describe()                                                    # max |T - PyTorch T| per size

The graph is the deploy form (BatchNorm folded, ``model.deploy``) traced by ``torch.export`` with a dynamic
batch, height and width; H and W are multiples of 32 (five 2x2 poolings). While traced, the deploy forms use
standard operators whose shapes come from the tensors (``model.ops.exporting``): a size computed as a Python
number would be frozen into the graph and give wrong maps at any other size without a word. So the export runs
the written file with ONNX Runtime at the training size and at two others, next to the PyTorch deploy form, and
keeps it only when every max |T - PyTorch T| is within ``ONNX_T_ATOL`` on the logits' scale (times
max(1, max |T|): float32 rounding grows with the logits, and trained models reach |T| of 50 and more, where the
PyTorch deploy form itself differs from the paper forward by 1e-4); otherwise the file is removed and an
``OnnxExportError`` says by how much which size was off.

Input ``image`` (N, 1, H, W) float32 in [0, 1]; outputs ``T`` (logits of the last stage), with ``outputs="BTD"``
also ``B`` and ``D`` of the last stage, with ``outputs="stages"`` ``B1, T1, D1, ..., BK, TK, DK``. The model's
metadata says the training size (the geometry to run it at), the threshold, K, the input, the size multiple, the
outputs and the checks it passed: a saved file runs as it is (``utils.export.onnx_runtime.OnnxRuntimeNet``,
t_models.py --onnx-model, onnx_detect.py), without PyTorch.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import deploy
from model.dconet import SIZE_MULTIPLE
from utils import ProjectError
from utils.export.onnx_runtime import DEFAULT_THRESHOLD, INSTALL_HINT, OnnxRuntimeNet

ONNX_OPSET = 18
ONNX_T_ATOL = 1e-4           # max |T - PyTorch T| the export accepts, times max(1, max |T|), at every size
OUTPUTS = ("T", "BTD", "stages")
MIN_TORCH = (2, 6)           # torch.onnx.export(dynamo=True, dynamic_shapes=...) as used here


class OnnxExportError(ProjectError):
    """The export could not be made, or its graph disagrees with PyTorch (the file is then removed)."""


def require_onnx(what: str) -> None:
    """Raise an ``OnnxExportError`` naming the packages to install when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise OnnxExportError(f"{what} needs the package(s) {', '.join(missing)}, which are not installed: "
                              f"{INSTALL_HINT}")
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < MIN_TORCH:
        raise OnnxExportError(f"{what} needs PyTorch {'.'.join(map(str, MIN_TORCH))} or later (its torch.export "
                              f"based ONNX exporter), found {torch.__version__}: pip install -U torch")


class GraphOutputs(nn.Module):
    """The deployed network's forward as the graph's outputs: (T,), (B, T, D) of the last stage, or every
    stage's (B, T, D) in order."""

    def __init__(self, net: nn.Module, outputs: str = "T"):
        super().__init__()
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        self.net = net
        self.outputs = outputs

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, _, stages = self.net(image, return_stages=True)        # (N, 1, H, W) -> K x StageOutput(B, T, D)
        if self.outputs == "T":
            return (stages[-1].T,)
        kept = stages if self.outputs == "stages" else stages[-1:]
        return tuple(map_ for stage in kept for map_ in stage)


def output_names(outputs: str, stage_num: int) -> list[str]:
    if outputs == "T":
        return ["T"]
    if outputs == "BTD":
        return ["B", "T", "D"]
    return [f"{name}{k}" for k in range(1, stage_num + 1) for name in "BTD"]


def check_shapes(training_size: int) -> list[tuple[int, int, int]]:
    """(N, H, W) the export is checked at: the training size S (one image), S + 64 x S + 224 (320x480 for 256;
    two images) and max(64, S - 64) x S + 96 (one image): three sizes, two of them not square."""
    s = training_size
    return [(1, s, s), (2, s + 64, s + 224), (1, max(2 * SIZE_MULTIPLE, s - 64), s + 96)]


@dataclass
class SizeCheck:
    """One checked input shape (N, H, W), max |T - PyTorch T| there (inf when ONNX Runtime failed) and the
    logits' scale max |T| of PyTorch."""

    shape: tuple[int, int, int]
    max_abs_diff: float
    scale: float = 0.0
    error: str = ""

    def bound(self, atol: float = ONNX_T_ATOL) -> float:
        return atol * max(1.0, self.scale)

    def describe(self) -> str:
        n, h, w = self.shape
        what = (f"ONNX Runtime failed: {self.error}" if self.error else
                f"max |T - PyTorch T| = {self.max_abs_diff:.2e} (max |T| {self.scale:.3g})")
        return f"{n}x{h}x{w}: {what}"


@dataclass
class OnnxReport:
    path: Path
    checks: list[SizeCheck]
    atol: float

    @property
    def passed(self) -> bool:
        return all(c.max_abs_diff <= c.bound(self.atol) for c in self.checks)

    def describe(self) -> str:
        return "; ".join(c.describe() for c in self.checks)


def check_onnx(path: str | Path, model: nn.Module, shapes: list[tuple[int, int, int]], threads: int | None = None,
               seed: int = 0) -> list[SizeCheck]:
    """Run the ONNX file with ONNX Runtime and the PyTorch deploy form of ``model`` on the same seeded random
    images (N, 1, H, W) in [0, 1] for each (N, H, W) in ``shapes``; max |T - PyTorch T| per shape."""
    runtime = OnnxRuntimeNet.from_file(path, threads=threads or torch.get_num_threads())
    reference = deploy(model, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for n, h, w in shapes:
        x = torch.rand(n, 1, h, w, generator=generator)
        _, T_ref = reference(x)
        scale = float(T_ref.abs().max())
        try:
            T = runtime.run_T(x.numpy())
        except Exception as error:        # a graph that cannot run at this size (e.g. a frozen input shape)
            checks.append(SizeCheck((n, h, w), float("inf"), scale, str(error).splitlines()[0][:200]))
            continue
        diff = float(np.abs(T - T_ref.numpy()).max()) if T.shape == tuple(T_ref.shape) else float("inf")
        checks.append(SizeCheck((n, h, w), diff if np.isfinite(diff) else float("inf"), scale,
                                "" if T.shape == tuple(T_ref.shape) else f"T has shape {T.shape}"))
    return checks


def trace_to_onnx(model: nn.Module, path: str | Path, training_size: int, outputs: str = "T",
                  threshold: float = DEFAULT_THRESHOLD) -> None:
    """Write the deploy form of ``model`` as ONNX (opset ``ONNX_OPSET``, dynamic N, H, W), unchecked; its metadata
    holds what a runner needs besides the graph: the training size (the default geometry resizes to it) and the
    threshold."""
    require_onnx("ONNX export")
    net = deploy(model, channels_last=False, device="cpu").model     # the deployed DCONet itself, NCHW
    stage_num = len(net.stages)
    batch, rows, cols = torch.export.Dim("batch"), torch.export.Dim("rows32"), torch.export.Dim("cols32")
    example = torch.zeros(2, 1, training_size, training_size)         # sizes of 1 would be specialised
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            GraphOutputs(net, outputs).eval(), (example,), dynamo=True, opset_version=ONNX_OPSET,
            input_names=["image"], output_names=output_names(outputs, stage_num), external_data=False,
            dynamic_shapes={"image": {0: batch, 2: SIZE_MULTIPLE * rows, 3: SIZE_MULTIPLE * cols}}, verbose=False)
    program.save(str(path), external_data=False)
    add_metadata(path, {
        "model": "DCONet (deploy form, BatchNorm folded)", "stage_num": str(stage_num),
        "training_size": str(training_size), "size_multiple": str(SIZE_MULTIPLE), "threshold": repr(float(threshold)),
        "input": f"image (N, 1, H, W) float32 in [0, 1]; H and W positive multiples of {SIZE_MULTIPLE}; images "
                 "resized to training_size x training_size as the release does (8-bit INTER_LINEAR, then / 255)",
        "outputs": ", ".join(output_names(outputs, stage_num)) + " (N, 1, H, W) float32; T are logits: a pixel is "
                   "a target when sigmoid(T) > threshold"})


def add_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the metadata_props of the ONNX file at ``path`` (a key given again is replaced)."""
    import onnx
    proto = onnx.load(str(path))
    kept = {prop.key: prop.value for prop in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**kept, **metadata})
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, path: str | Path, training_size: int, outputs: str = "T",
                shapes: list[tuple[int, int, int]] | None = None, overwrite: bool = False,
                atol: float = ONNX_T_ATOL, threshold: float = DEFAULT_THRESHOLD) -> OnnxReport:
    """Write ``model``'s deploy form to ``path`` as ONNX and keep it only if ONNX Runtime's T is within
    ``atol * max(1, max |T|)`` of the PyTorch deploy form's at every shape of ``shapes`` (default
    ``check_shapes(training_size)``). The kept file's metadata says the checks it passed (``checked``), its
    training size and ``threshold``: what ``OnnxRuntimeNet`` and onnx_detect.py run it with.

    The graph is written beside ``path`` under a temporary name and moved there once checked, so a refused or
    interrupted export leaves no file. Raises ``OnnxExportError`` (the checks in its message) on a refusal,
    ``FileExistsError`` when ``path`` exists and ``overwrite`` is False."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise OnnxExportError(f"{path}: an ONNX model file ends in .onnx; give a path such as dconet.onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it, choose another path or pass --overwrite")
    if not path.parent.is_dir():
        raise OnnxExportError(f"{path}: the folder {path.parent} does not exist; create it first")
    if training_size % SIZE_MULTIPLE:
        raise OnnxExportError(f"the training size must be a multiple of {SIZE_MULTIPLE}, got {training_size}")
    handle, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=path.parent)
    os.close(handle)
    try:
        trace_to_onnx(model, tmp, training_size, outputs, threshold)
        report = OnnxReport(path, check_onnx(tmp, model, shapes or check_shapes(training_size)), atol)
        if not report.passed:
            raise OnnxExportError(f"{path}: the exported graph disagrees with PyTorch (tolerance {atol:g} x "
                                  f"max(1, max |T|); "
                                  f"{report.describe()}); the file was not written")
        add_metadata(tmp, {"checked": f"{report.describe()} (tolerance {atol:g} x max(1, max |T|))"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                                  # mkstemp made it private
        os.replace(tmp, path)
        return report
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
