"""The Detector takes what t_models.py takes and gives what it gives: colour and alpha PNGs as
cv2.IMREAD_UNCHANGED reads them, 16-bit frames and image paths; on synthetic frames always, on NUAA-SIRST's real
frames where ../shared has them; the README's snippet runs on real frames; the packages import from anywhere."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

import t_models
from conftest import REPO, shared_path
from model import DCONet, DCONetConfig, save_checkpoint
from utils.export.detection_table import table_rows
from utils.export.detections import Detector
from utils.export.maps import sigmoid
from utils.export.writer import SHIPPED_WEIGHTS
from utils.io.images import resize_linear

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _pictures(folder: Path) -> list[Path]:
    """A gray, a colour (BGR, channels unequal), an alpha (BGRA, alpha not 255) and a 16-bit PNG, with targets."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    paths = []
    for name, (h, w) in {"gray": (48, 80), "colour": (70, 50), "alpha": (64, 64), "deep": (40, 90)}.items():
        gray = rng.integers(20, 60, (h, w)).astype(np.uint8)
        for y, x in rng.integers(3, [h - 3, w - 3], size=(2, 2)):
            gray[y - 1:y + 2, x - 1:x + 2] = 230
        colour = np.clip(gray.astype(int)[..., None] + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        picture = {"gray": gray, "colour": colour, "deep": gray.astype(np.uint16) * 257 + 13,
                   "alpha": np.dstack([colour, rng.integers(0, 256, (h, w), dtype=np.uint8)])}[name]
        paths.append(folder / f"{name}.png")
        cv2.imwrite(str(paths[-1]), picture)
    return paths


def _exported(out: Path) -> tuple[dict[str, np.ndarray], dict[str, list[dict]]]:
    """T of every image t_models.py wrote to ``out``, and its detection rows by source."""
    maps = {p.stem: scipy.io.loadmat(str(p))["T"] for p in (out / "mat").iterdir()}
    rows: dict[str, list[dict]] = {}
    with open(out / "detections.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["source"], []).append(row)
    return maps, rows


def _as_table(found, source: str) -> list[dict]:
    """Detections as t_models.py's table writes them (the same rounding), as strings."""
    return [{k: "" if v is None else (f"{v:.6f}" if k in ("peak", "mean", "threshold", "time_s") else
                                      f"{v:.3f}" if k in ("x", "y") else str(v)) for k, v in row.items()}
            for row in table_rows(found, source)]


def _same_as_t_models(detector: Detector, paths: list[Path], out: Path, as_read: bool = True) -> None:
    maps, rows = _exported(out)
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if as_read else path
        probability, found = detector(image)
        shape = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2]
        expected = np.clip(resize_linear(sigmoid(maps[path.stem]), shape), 0.0, 1.0)
        assert probability.shape == shape and np.array_equal(probability, expected), path.name
        assert _as_table(found, path.name) == rows.get(path.name, []), path.name


def test_colour_alpha_and_16_bit_pngs_give_what_t_models_gives(tmp_path):
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "w.pt", DCONet(DCONetConfig(stage_num=1)), meta={"base_size": 64})
    paths = _pictures(tmp_path / "frames")
    assert t_models.main(["--input", str(tmp_path / "frames"), "--weights", str(weights), "--out",
                          str(tmp_path / "out"), "--threshold", "0.45", "--no-progress"]) == 0
    detector = Detector(weights, device="cpu", threshold=0.45)
    _same_as_t_models(detector, paths, tmp_path / "out")                     # arrays as OpenCV reads the files
    _same_as_t_models(detector, paths, tmp_path / "out", as_read=False)      # the files themselves
    assert sum(len(rows) for rows in _exported(tmp_path / "out")[1].values()) > 0


def _real_frames() -> list[Path]:
    """NUAA-SIRST test frames: the first gray, colour and alpha PNG, and Misc_34 (alpha; its sRGB chunk makes
    the decoder convert it in linear light, which its pixels do not carry)."""
    folder = shared_path("data", "NUAA-SIRST", "test", "images")
    chosen: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        chosen.setdefault(1 if image.ndim == 2 else image.shape[2], path)
    assert sorted(chosen) == [1, 3, 4], "NUAA-SIRST holds gray, colour and alpha PNGs"
    return [chosen[1], chosen[3], chosen[4], folder / "Misc_34.png"]


@pytest.mark.slow
def test_on_real_nuaa_sirst_frames_the_shipped_model_gives_what_t_models_gives(tmp_path):
    paths = _real_frames()
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in paths:
        shutil.copy(path, frames / path.name)
    assert t_models.main(["--input", str(frames), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    detector = Detector(device="cpu")                                        # the shipped model
    _same_as_t_models(detector, paths[:3], tmp_path / "out")
    _same_as_t_models(detector, paths, tmp_path / "out", as_read=False)


def _readme_detector_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return next(block for block in blocks if "Detector" in block)


@pytest.mark.slow
def test_the_readme_snippet_runs_on_real_frames_from_another_folder(tmp_path):
    frame = _real_frames()[2]                                                # an alpha PNG
    code = _readme_detector_snippet().replace('"frame.png"', repr(str(frame)))
    check = (f"{code}\nimport utils\nassert not utils.__file__.startswith({str(tmp_path)!r})\n"
             f"print(probability.shape, len(targets), targets[0].box)\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    image = cv2.imread(str(frame), cv2.IMREAD_UNCHANGED)
    assert done.stdout.startswith(f"{image.shape[:2]} "), done.stdout


@pytest.mark.slow
def test_pyproject_packages_model_and_utils_whole(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("model", "utils"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           str(source), "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("dconet-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    ours = {p.relative_to(REPO).as_posix() for package in ("model", "utils") for p in (REPO / package).rglob("*.py")}
    assert ours <= packed, sorted(ours - packed)
    assert SHIPPED_WEIGHTS.is_file()
