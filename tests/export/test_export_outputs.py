"""What t_models.py writes where: never over an input (even with --overwrite), refusals that name what they keep,
and an interrupted export that says so in one line, keeps its results and finishes with --resume."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import t_models
import utils.export.writer as writer
from model import DCONet, DCONetConfig, save_checkpoint
from utils.io.frame_writer import FrameWriter

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "model.pt", DCONet(DCONetConfig(stage_num=1)),
                           meta={"base_size": 32})


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.integers(0, 90, (32, 32), dtype=np.uint8)
        image[10 + i:13 + i, 12:15] = 255
        assert cv2.imwrite(str(folder / f"f{i}.png"), image)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = t_models.main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_an_output_is_never_an_input_even_with_overwrite(tmp_path, weights, capsys):
    clip = tmp_path / "clip.avi"
    with FrameWriter(clip, fps=5.0) as video:
        for i in range(3):
            video.write(np.full((32, 32), 40 * i, np.uint8))
    before = clip.read_bytes()
    code, _, err = run(capsys, "--input", clip, "--weights", weights, "--annotate", clip, "--overwrite",
                       "--out", tmp_path / "out")
    assert code == 2 and f"{clip} is an input of this export" in err and "even with --overwrite" in err
    assert clip.read_bytes() == before
    image = tmp_path / "still" / "x.png"                 # a folder of annotated frames would write x.png over it
    image.parent.mkdir()
    cv2.imwrite(str(image), np.zeros((32, 32), np.uint8))
    code, _, err = run(capsys, "--input", image, "--weights", weights, "--annotate", image.parent, "--overwrite",
                       "--out", tmp_path / "out2")
    assert code == 2 and f"{image.parent} is an input of this export ({image})" in err


def test_a_refusal_names_the_file_it_keeps(tmp_path, weights, frames, capsys):
    annotated = tmp_path / "elsewhere" / "annotated"
    argv = ("--input", frames, "--weights", weights, "--out", tmp_path / "out", "--annotate", annotated,
            "--maps", "off")
    assert run(capsys, *argv)[0] == 0
    (tmp_path / "out" / "detections.csv").unlink()       # only the annotated frames, outside the output folder
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"results exist already and are kept: {annotated}" in err and "--overwrite" in err


def test_an_interrupted_export_keeps_its_results_and_resumes(tmp_path, weights, frames, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert run(capsys, "--input", frames, "--weights", weights, "--out", straight)[0] == 0

    out = tmp_path / "out"
    argv = ("--input", frames, "--weights", weights, "--out", out)
    calls = {"n": 0}
    real = writer.write_prediction

    def stop_at_the_third(*args):        # after the third image's table rows, before its maps
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(writer, "write_prediction", stop_at_the_third)
    code, _, err = run(capsys, *argv)
    assert code == 130
    assert err.strip() == (f"t_models.py: interrupted; 2 of 5 image(s) finished, their results kept in {out}; "
                           f"run the same command with --resume to do the rest")
    assert sorted(p.name for p in (out / "mat").iterdir()) == ["f0.mat", "f1.mat"]
    assert "f2.png" in (out / "detections.csv").read_text()     # the unfinished image's rows, dropped on resume
    monkeypatch.setattr(writer, "write_prediction", real)

    code, _, err = run(capsys, *argv)                       # refused, the results kept
    assert code == 2 and "--resume" in err and len(list((out / "mat").iterdir())) == 2
    code, stdout, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "wrote 3 image(s) (and kept the 2 an earlier export had finished)" in stdout
    assert (out / "detections.csv").read_text() == (straight / "detections.csv").read_text()
    for name in ("f0", "f3"):
        assert (out / "img" / f"{name}.png").read_bytes() == (straight / "img" / f"{name}.png").read_bytes()
    assert sorted(p.name for p in (out / "mat").iterdir()) == [f"f{i}.mat" for i in range(5)]


def test_the_header_says_frames_for_a_video_and_no_tiles_when_resizing(tmp_path, weights, capsys):
    clip = tmp_path / "clip.avi"
    with FrameWriter(clip, fps=5.0) as video:
        for i in range(3):
            video.write(np.full((32, 32), 40 * i, np.uint8))
    code, stdout, _ = run(capsys, "--input", clip, "--weights", weights, "--out", tmp_path / "out")
    header = stdout.splitlines()[2]
    assert code == 0 and f"video {clip}, 3 frame(s); resized to 32x32; writing to" in header, header
    assert "tiles" not in header and "image(s)" not in header
