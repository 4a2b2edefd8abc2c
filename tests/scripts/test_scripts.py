"""The three scripts as a newcomer meets them: --help, messages, what reaches the terminal."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import t_models
from model import DCONet, DCONetConfig, save_checkpoint
from utils.io.images import set_opencv_log_level
from utils.data.synthetic_sets import write_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_0.py", "t_models.py", "cal_from_mask.py"])
def test_help_prints_every_default_once(script):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    options = re.split(r"\n  (?=-)", result.stdout)[1:]      # one chunk per option, after usage and description
    assert len(options) > 5
    for option in options:
        assert option.count("(default") <= 1, option


def test_opencv_messages_stay_out_of_the_output(tmp_path, capfd):
    """An unreadable image is reported once, by name, by t_models.py; OpenCV's own warnings do not show."""
    set_opencv_log_level(3)      # warnings, as a fresh process starts
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "ok.png"), np.full((32, 32), 90, np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "w.pt", DCONet(DCONetConfig(stage_num=1)), meta={"base_size": 32})
    code = t_models.main(["--input", str(folder), "--weights", str(weights), "--out", str(tmp_path / "out"),
                          "--no-progress"])
    out, err = capfd.readouterr()
    assert code == 1 and "broken.png" in err
    assert "[ WARN" not in out + err and "[ERROR" not in out + err and "libpng" not in out + err


def test_a_tolerated_data_problem_is_a_note_in_the_log_not_a_stray_warning(tmp_path, capsys):
    from run_0 import main
    write_dataset(tmp_path, "tiny", n_trainval=4, n_test=2, size=32, seed=3)
    mask = tmp_path / "tiny" / "test" / "masks" / "00004.png"
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask), 0), (64, 64), interpolation=cv2.INTER_NEAREST))
    out = tmp_path / "run"
    assert main(["--dataset", "tiny", "--data-root", str(tmp_path), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--base-size", "32", "--stage-num", "1", "--vis-images", "0"]) == 0
    printed = capsys.readouterr()
    assert "DatasetWarning" not in printed.err and "return " not in printed.err
    notes = [line for line in (out / "log.txt").read_text().splitlines() if " note: " in line]
    assert len(notes) == 1 and "00004.png" in notes[0] and "size mismatch tolerated" in notes[0]


def test_every_unreadable_image_is_counted(tmp_path, capsys):
    """The first few reasons are listed, every unreadable image is counted, and the exit status is 1."""
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "ok.png"), np.full((32, 32), 90, np.uint8))
    for i in range(7):
        (folder / f"broken{i}.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "w.pt", DCONet(DCONetConfig(stage_num=1)), meta={"base_size": 32})
    code = t_models.main(["--input", str(folder), "--weights", str(weights), "--out", str(tmp_path / "out"),
                          "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "error: 7 image(s) could not be read" in err and err.count("skipped: ") == 5
    assert (tmp_path / "out" / "mat" / "ok.mat").is_file()


_SPIN_AT_TORCH_IMPORT = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "seen" not in globals():
            globals()["seen"] = os.environ.get("GOMP_SPINCOUNT", "unset")
        return None
sys.meta_path.insert(0, Watch())
import {script}
print(seen)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_0", "t_models"])
def test_the_scripts_cap_openmp_spinning_before_torch_loads(script):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", _SPIN_AT_TORCH_IMPORT.format(script=script)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1000"]
