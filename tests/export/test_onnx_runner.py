"""ONNX without re-export and without PyTorch: a graph written by t_models.py --onnx carries what a runner needs in
its metadata; t_models.py --onnx-model runs it as it is; onnx_detect.py runs it in a process where torch cannot
be imported and writes what t_models.py writes; and the onnxruntime backend takes --device auto as the CPU on a
machine where auto would be CUDA."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

import t_models
import utils.export.onnx_export as onnx_export
from conftest import REPO, perturbed_model
from model import save_checkpoint
from utils.export.onnx_export import ONNX_T_ATOL, OnnxExportError
from utils.export.onnx_runtime import OnnxModelError, OnnxRuntimeNet

pytest.importorskip("onnxruntime", reason="ONNX export needs onnx, onnxscript and onnxruntime (requirements.txt)")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SIZE = 64
# A process where PyTorch (and what only the PyTorch side uses) cannot be imported, running onnx_detect.py.
WITHOUT_TORCH = """
import runpy, sys
for name in ("torch", "torchvision", "tqdm", "matplotlib", "onnx", "onnxscript", "skimage", "tensorboard"):
    sys.modules[name] = None                  # import name -> ImportError
sys.argv = ["onnx_detect.py", *sys.argv[1:]]
try:
    runpy.run_path("onnx_detect.py", run_name="__main__")
finally:
    print("loaded:", sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("w") / "w.pt", perturbed_model(2, seed=3).eval(),
                           meta={"base_size": SIZE})


@pytest.fixture(scope="module")
def graph(weights, tmp_path_factory) -> Path:
    """The weights as t_models.py --onnx writes them (outputs B, T, D), with threshold 0.4 in the metadata."""
    path = tmp_path_factory.mktemp("onnx") / "dconet.onnx"
    assert t_models.main(["--weights", str(weights), "--onnx", str(path), "--onnx-outputs", "BTD",
                          "--threshold", "0.4"]) == 0
    return path


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """Gray, colour (BGR), alpha (BGRA) and 16-bit PNG frames of several sizes, each with a few bright spots."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"gray": (70, 90), "colour": (64, 80), "alpha": (96, 64), "deep": (100, 60)}.items():
        yy, xx = np.mgrid[:h, :w]
        image = 60 + 40 * np.sin(yy / 17.0) * np.cos(xx / 23.0) + rng.normal(0, 3, (h, w))
        for _ in range(3):
            y, x = rng.integers(2, h - 2), rng.integers(2, w - 2)
            image[y - 1:y + 2, x - 1:x + 2] += 120
        gray = np.clip(image, 0, 255).astype(np.uint8)
        tint = np.clip(gray.astype(int)[..., None] + rng.integers(-9, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        picture = {"gray": gray, "colour": tint, "deep": gray.astype(np.uint16) * 257,
                   "alpha": np.dstack([tint, rng.integers(0, 256, (h, w), dtype=np.uint8)])}[name]
        cv2.imwrite(str(folder / f"{name}.png"), picture)
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _T(out: Path, name: str) -> np.ndarray:
    return scipy.io.loadmat(str(out / "mat" / f"{name}.mat"))["T"]


@pytest.mark.slow
def test_onnx_detect_runs_without_pytorch_and_matches_t_models(weights, graph, frames, tmp_path, monkeypatch,
                                                               capsys):
    net = OnnxRuntimeNet.from_file(graph)
    assert (net.training_size, net.threshold, net.stage_num, net.outputs) == (SIZE, 0.4, 2, ["B", "T", "D"])
    assert net.checked.count("max |T - PyTorch T|") == 3

    pytorch = tmp_path / "pytorch"
    assert t_models.main(["--input", str(frames), "--weights", str(weights), "--out", str(pytorch),
                          "--threshold", "0.4", "--no-progress"]) == 0

    def no_export(*args, **kwargs):
        raise AssertionError("--onnx-model exported the weights again")
    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    monkeypatch.setattr(onnx_export, "trace_to_onnx", no_export)
    saved = tmp_path / "saved"
    capsys.readouterr()
    assert t_models.main(["--input", str(frames), "--onnx-model", str(graph), "--out", str(saved),
                          "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"weights: ONNX graph {graph}, K = 2, trained at 64x64, threshold 0.4"), printed

    runner = tmp_path / "runner"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "--model", str(graph), "--input", str(frames),
                           "--out", str(runner), "--threads", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stderr.strip().splitlines()[-1]
    assert "'onnxruntime'" in loaded and "'torch'" not in loaded and "'tqdm'" not in loaded, loaded
    assert "geometry: resized to 64x64 as the release does" in done.stdout, done.stdout

    names = sorted(p.stem for p in frames.iterdir())
    for out in (saved, runner):
        assert sorted(p.stem for p in (out / "img").iterdir()) == names
    assert (runner / "detections.csv").read_bytes() == (saved / "detections.csv").read_bytes()
    rows = _rows(runner / "detections.csv")
    assert rows and {row["source"] for row in rows} == {f"{name}.png" for name in names}
    assert {row["threshold"] for row in rows} == {"0.400000"}            # the threshold the metadata holds
    reference = _rows(pytorch / "detections.csv")
    assert [(r["source"], r["x0"], r["y0"], r["x1"], r["y1"], r["area"]) for r in rows] == \
        [(r["source"], r["x0"], r["y0"], r["x1"], r["y1"], r["area"]) for r in reference]
    for name in names:
        assert np.array_equal(_T(runner, name), _T(saved, name))
        T = _T(pytorch, name)
        assert np.abs(_T(runner, name) - T).max() <= ONNX_T_ATOL * max(1.0, np.abs(T).max()), name
        assert np.array_equal(cv2.imread(str(runner / "img" / f"{name}.png"), cv2.IMREAD_UNCHANGED),
                              cv2.imread(str(saved / "img" / f"{name}.png"), cv2.IMREAD_UNCHANGED))


def test_the_onnxruntime_backend_takes_auto_as_the_cpu_where_cuda_is_available(weights, frames, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # a CUDA machine, where auto is cuda
    reached = []

    def export_stops_here(model, path, training_size, **kwargs):
        reached.append(next(model.parameters()).device)
        raise OnnxExportError("stopped where the export would start")
    monkeypatch.setattr(onnx_export, "export_onnx", export_stops_here)
    code = t_models.main(["--input", str(frames), "--weights", str(weights), "--backend", "onnxruntime",
                          "--out", str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 2 and "stopped where the export would start" in printed.err, printed.err
    assert reached == [torch.device("cpu")] and "backend: onnxruntime; device: cpu" in printed.out, printed.out
    assert t_models.main(["--input", str(frames), "--weights", str(weights), "--backend", "onnxruntime",
                          "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "the onnxruntime backend runs on the CPU here, got device cuda" in capsys.readouterr().err


def test_a_file_that_is_no_graph_of_this_project_is_named(tmp_path, frames, weights, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(OnnxModelError, match="ONNX Runtime cannot read it"):
        OnnxRuntimeNet.from_file(broken)
    with pytest.raises(OnnxModelError, match="no such ONNX model; write one with: python t_models.py"):
        OnnxRuntimeNet.from_file(tmp_path / "absent.onnx")
    assert t_models.main(["--input", str(frames), "--onnx-model", str(broken), "--weights", str(weights),
                          "--out", str(tmp_path / "out")]) == 2
    assert "drop --weights" in capsys.readouterr().err
