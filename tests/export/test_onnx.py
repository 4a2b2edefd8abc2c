"""ONNX export of the deploy form and ONNX Runtime as a backend: a seeded K = 2 model exported with dynamic sizes
and checked at three sizes and batches of 1 and 3; a graph with a size frozen in is refused and leaves no file;
predictions, stages and detections through ONNX Runtime equal PyTorch's up to float rounding; t_models.py --onnx."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import t_models
from conftest import perturbed_model
from model import save_checkpoint
from model.bottleneck import SOA
from utils.export.detections import Detector, detect_logits
from utils.export.onnx_export import ONNX_T_ATOL, OnnxExportError, export_onnx, require_onnx
from utils.export.onnx_runtime import OnnxRuntimeNet, prepare_backend
from utils.export.predict import Geometry, iter_predictions, prepare_model

pytest.importorskip("onnxruntime", reason="ONNX export needs onnx, onnxscript and onnxruntime (requirements.txt)")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SIZE = 64                                           # the size the K = 2 model is exported at
SHAPES = [(1, 64, 64), (3, 96, 160), (1, 128, 64)]  # (N, H, W): three sizes, batches of 1 and 3


@pytest.fixture(scope="module")
def model():
    return perturbed_model(2, seed=3).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "dconet_k2.onnx"
    return export_onnx(model, path, SIZE, outputs="stages", shapes=SHAPES)


def _images(seed: int, shapes: list[tuple[int, int]]) -> list[tuple[str, np.ndarray]]:
    """Smooth backgrounds with a few bright 3x3 spots, uint8, of the given sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[:h, :w]
        image = 60 + 40 * np.sin(yy / 17.0 + i) * np.cos(xx / 23.0) + rng.normal(0, 3, (h, w))
        for _ in range(3):
            y, x = rng.integers(2, h - 2), rng.integers(2, w - 2)
            image[y - 1:y + 2, x - 1:x + 2] += 120
        images.append((f"im{i}", np.clip(image, 0, 255).astype(np.uint8)))
    return images


@pytest.mark.slow
def test_export_is_checked_at_three_sizes_and_two_batches(exported):
    import onnx
    assert exported.path.is_file() and exported.passed
    assert [c.shape for c in exported.checks] == SHAPES
    assert all(c.max_abs_diff <= ONNX_T_ATOL * max(1.0, c.scale) for c in exported.checks), exported.describe()
    proto = onnx.load(str(exported.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["training_size"] == str(SIZE) and meta["stage_num"] == "2" and meta["size_multiple"] == "32"
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 1 and all(dims[i].dim_param for i in (0, 2, 3)), dims
    assert [o.name for o in proto.graph.output] == ["B1", "T1", "D1", "B2", "T2", "D2"]
    assert not any(c.op_type == "BatchNormalization" for c in proto.graph.node), "BatchNorm is folded"


@pytest.mark.slow
def test_a_graph_with_a_frozen_size_is_refused(model, tmp_path, monkeypatch):
    # sqrt(N) of the attention as a Python number, as the eager forward computes it: the trace freezes it.
    monkeypatch.setattr(SOA, "sqrt_tokens", staticmethod(lambda tokens: math.sqrt(tokens.shape[1])))
    path = tmp_path / "frozen.onnx"
    with pytest.raises(OnnxExportError, match="disagrees with PyTorch") as refused:
        export_onnx(model, path, SIZE, shapes=SHAPES)
    assert "1x64x64: max |T - PyTorch T|" in str(refused.value)     # right at the traced size, off elsewhere
    assert list(tmp_path.iterdir()) == [], "a refused export leaves no file"


@pytest.mark.slow
def test_onnxruntime_predictions_equal_pytorch(model, exported):
    runtime = OnnxRuntimeNet.from_file(exported.path)
    net = prepare_model(model, "cpu")
    images = _images(0, [(70, 90), (64, 64), (150, 100)])            # padded to 96x96, 64x64, 160x128
    for geometry in (Geometry(), Geometry(resize=SIZE)):
        ours = list(iter_predictions(runtime, images, geometry, batch_size=2, return_stages=True))
        theirs = list(iter_predictions(net, images, geometry, batch_size=2, return_stages=True))
        for a, b in zip(sorted(ours, key=lambda p: p.name), sorted(theirs, key=lambda p: p.name)):
            assert a.T.shape == b.T.shape and len(a.stages) == len(b.stages) == 2
            for sa, sb in zip(a.stages, b.stages):
                for field_a, field_b in zip(sa, sb):
                    assert np.abs(field_a - field_b).max() <= ONNX_T_ATOL, a.name
            assert [d.box for d in detect_logits(a.T)] == [d.box for d in detect_logits(b.T)], a.name


@pytest.mark.slow
def test_detector_with_the_onnxruntime_backend(model):
    image = _images(1, [(100, 140)])[0][1]
    p_onnx, found_onnx = Detector(model, device="cpu", geometry=Geometry(), backend="onnxruntime")(image)
    p_torch, found_torch = Detector(model, device="cpu", geometry=Geometry())(image)
    assert np.abs(p_onnx - p_torch).max() <= ONNX_T_ATOL
    assert [(d.box, d.area) for d in found_onnx] == [(d.box, d.area) for d in found_torch]


def test_backend_refuses_what_onnxruntime_does_not_run(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        prepare_backend(model, "tensorrt")
    with pytest.raises(ValueError, match="drop bf16"):
        prepare_backend(model, "onnxruntime", "cpu", bf16=True)


def test_missing_onnxruntime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # import onnxruntime then raises ImportError
    with pytest.raises(OnnxExportError, match="onnxruntime.*pip install onnx onnxscript onnxruntime"):
        require_onnx("the onnxruntime backend")


def test_export_refuses_an_existing_file_and_a_wrong_suffix(model, tmp_path):
    existing = tmp_path / "dconet.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_onnx(model, existing, SIZE)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(OnnxExportError, match="ends in .onnx"):
        export_onnx(model, tmp_path / "dconet.pt", SIZE)


@pytest.mark.slow
def test_t_models_onnx_writes_a_checked_file(model, tmp_path, capsys):
    weights = save_checkpoint(tmp_path / "w.pt", model, meta={"base_size": SIZE})
    out = tmp_path / "dconet.onnx"
    assert t_models.main(["--weights", str(weights), "--onnx", str(out), "--onnx-outputs", "BTD"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and printed.count("max |T - PyTorch T|") == 3, printed
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "an ordinary file, not the temporary file's 0600"
    runtime = OnnxRuntimeNet.from_file(out)
    x = torch.rand(1, 1, 96, 64)
    B, T, D = torch.from_numpy(runtime.maps(x[:, 0].numpy(), return_stages=True)).split(1, dim=1)
    D_ref, T_ref = prepare_model(model, "cpu")(x)
    assert (T - T_ref).abs().max() <= ONNX_T_ATOL and (D - D_ref).abs().max() <= ONNX_T_ATOL
    assert t_models.main(["--weights", str(weights), "--onnx", str(out)]) == 2      # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    native = save_checkpoint(tmp_path / "native.pt", model, meta={"base_size": SIZE},
                             train_config={"geometry": "native", "base_size": SIZE})
    assert t_models.main(["--weights", str(native), "--onnx", str(tmp_path / "native.onnx")]) == 0
    assert f"holds the size to run at ({SIZE})" in capsys.readouterr().out     # trained at native scale: resized
    assert OnnxRuntimeNet.from_file(tmp_path / "native.onnx").training_size == SIZE
