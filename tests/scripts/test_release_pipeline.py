"""The release's whole path, from image file to printed score, against what the authors' code produced.

Every case folder ``../shared/reference/pipeline_*`` holds weights in the release layout (``weights_release.pkl``),
the logits T that the release's t_models.py computed for a test split (``release_T.npz``, one 256x256 map per
stem) and the numbers its scorer printed for them (``expected.json``). The test runs this project's t_models.py
with those weights and its default geometry, then cal_from_mask.py --protocol paper on what it wrote, and holds
both to the reference's tolerances (../shared/reference/README.md): every T within 2e-4 of the release's map,
every printed number equal at the printed precision (6 decimals, Fa 8). It does so with each backend: PyTorch's
deploy form and its ONNX graph run by ONNX Runtime (t_models.py --backend onnxruntime).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import cal_from_mask
import t_models
from conftest import SHARED
from utils.io.images import list_images

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
T_ATOL = 2e-4
PRINTED_ATOL = {"Fa": 5e-9}          # |ours - printed| for a number printed with 8 decimals
DEFAULT_PRINTED_ATOL = 5e-7          # and with 6
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
ONNX_BACKEND = pytest.param("onnxruntime", marks=[pytest.mark.slow, pytest.mark.skipif(
    not HAS_ONNX, reason="the onnxruntime backend needs onnx, onnxscript and onnxruntime (requirements.txt)")])


def _cases() -> list[Path]:
    return sorted(p for p in (SHARED / "reference").glob("pipeline_*")
                  if (p / "expected.json").is_file() and (p / "weights_release.pkl").is_file())


def _test_split(stems: set[str]) -> Path:
    """The data set folder whose test/images hold exactly the stems of the release's maps."""
    for images in sorted((SHARED / "data").glob("*/test/images")):
        if {p.stem for p in list_images(images)} == stems:
            return images.parent
    raise AssertionError(f"no ../shared/data/*/test/images holds exactly the {len(stems)} stems of the case")


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases() or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no reference case under {SHARED / 'reference'} (reference data lives beside the repository)"))],
    ids=lambda p: p.name if p else "absent")
@pytest.mark.parametrize("backend", ["pytorch", ONNX_BACKEND])
def test_export_and_paper_protocol_reproduce_the_release(case, backend, tmp_path, capsys):
    expected = json.loads((case / "expected.json").read_text())
    release_T = np.load(case / "release_T.npz")
    split = _test_split(set(release_T.files))

    out = tmp_path / "results"
    assert t_models.main(["--input", str(split / "images"), "--weights", str(case / "weights_release.pkl"),
                          "--out", str(out), "--no-progress", "--device", "cpu", "--backend", backend]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].startswith("geometry: resized to 256x256 as the release does")
    assert f"K = {expected['stage_num']}" in printed and f"backend: {backend}" in printed

    worst = {}
    for stem in release_T.files:
        T = scipy.io.loadmat(str(out / "mat" / f"{stem}.mat"))["T"]
        assert T.shape == (256, 256) and T.dtype == np.float32, stem
        worst[stem] = float(np.abs(T - release_T[stem]).max())
    stem = max(worst, key=worst.get)
    assert worst[stem] <= T_ATOL, f"{stem}: max |T - T_release| = {worst[stem]:.2e}"

    assert cal_from_mask.main(["--pred-dir", str(out / "mat"), "--mask-dir", str(split / "masks"),
                               "--protocol", "paper", "--out", str(tmp_path / "eval")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("paper, as the release prints:"))
    ours = {key: float(value) for key, value in re.findall(r"(\w+) (-?\d+\.\d+)", line)}
    for key, value in expected["expected_paper_protocol"].items():
        assert ours[key] == pytest.approx(value, abs=PRINTED_ATOL.get(key, DEFAULT_PRINTED_ATOL)), (key, line)
