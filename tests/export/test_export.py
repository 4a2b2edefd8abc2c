"""t_models.py end to end: the results layout in both geometry modes, scoring what it wrote, release weights,
odd and large frames, the decomposition panel, and every user error (exit status 2, a message, no traceback)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from scipy.special import expit

import t_models
from model import DCONet, DCONetConfig, load_checkpoint, save_checkpoint, to_release_state_dict
from utils.export.predict import Geometry, predict, prepare_model
from utils.io.images import read_gray
from utils.export.panels import detection_outcome

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
STEMS = ("a", "b", "odd")
TILE_ATOL = 2e-2   # tiled vs untiled max |dT| for this model, see tests/export/test_predict.py


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path


def frame(h: int, w: int, targets: list[tuple[int, int]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit cloudy frame with 3x3 targets (1x1 when at the border) and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = 80 + 40 * np.sin(xx / 17.0) * np.cos(yy / 29.0) + rng.normal(0, 4, (h, w))
    mask = np.zeros((h, w), np.uint8)
    for r, c in targets:
        r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, h), max(c - 1, 0), min(c + 2, w)
        if r in (0, 1, h - 2, h - 1) or c in (0, 1, w - 2, w - 1):
            r0, r1, c0, c1 = r, r + 1, c, c + 1
        image[r0:r1, c0:c1] = 250
        mask[r0:r1, c0:c1] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """datasets/tiny/test/{images,masks}: 64x64, 41x57 and 241x319 (a 1x1 target at the border) frames."""
    root = tmp_path_factory.mktemp("datasets")
    specs = {"a": (64, 64, [(20, 30), (45, 10)]), "b": (41, 57, [(20, 28)]), "odd": (241, 319, [(1, 317), (120, 160)])}
    for seed, (stem, (h, w, targets)) in enumerate(specs.items()):
        image, mask = frame(h, w, targets, seed)
        write_png(root / "tiny" / "test" / "images" / f"{stem}.png", image)
        write_png(root / "tiny" / "test" / "masks" / f"{stem}.png", mask)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The same one-stage model as a project checkpoint and as a release-layout best.pkl."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    torch.save(to_release_state_dict(model), folder / "best.pkl")
    return {"project": save_checkpoint(folder / "model.pt", model), "release": folder / "best.pkl", "model": model}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = t_models.main(["--device", "cpu"] + [str(a) for a in argv] + ["--no-progress"])   # a later --device wins
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def read_mat(path: Path) -> dict[str, np.ndarray]:
    content = scipy.io.loadmat(str(path))
    return {k: content[k] for k in ("T", "B", "D")}


def check_results(out: Path, stems, shapes: dict[str, tuple[int, int]]) -> None:
    """img/<stem>.png = round(sigmoid(T) * 255), mat/<stem>.mat with float32 T, B, D of the expected shape."""
    assert sorted(p.stem for p in (out / "mat").iterdir()) == sorted(stems)
    for stem in stems:
        maps = read_mat(out / "mat" / f"{stem}.mat")
        for name, array in maps.items():
            assert array.dtype == np.float32 and array.shape == shapes[stem], (stem, name, array.dtype, array.shape)
            assert np.isfinite(array).all()
        png = cv2.imread(str(out / "img" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and png.shape == shapes[stem]
        assert np.array_equal(png, np.rint(expit(maps["T"].astype(np.float64)) * 255).astype(np.uint8)), stem


def score(tmp_path: Path, pred_dir: Path, mask_dir: Path) -> dict:
    """Score with cal_from_mask.main when the project has it; the scores must be finite fractions."""
    if importlib.util.find_spec("cal_from_mask") is None:
        pytest.skip("cal_from_mask.py is not in this checkout")
    import cal_from_mask
    scores_path = tmp_path / "scores.json"
    assert cal_from_mask.main(["--pred-dir", str(pred_dir), "--mask-dir", str(mask_dir), "--out",
                               str(tmp_path / "eval"), "--json", str(scores_path)]) == 0
    scores = json.loads(scores_path.read_text())
    for protocol in ("standard", "paper"):
        assert 0 <= scores[protocol]["mIoU"] <= 1 and 0 <= scores[protocol]["Pd"] <= 1, scores
    return scores


@pytest.fixture(scope="module")
def native_out(tmp_path_factory, data_root, weights) -> Path:
    out = tmp_path_factory.mktemp("native") / "tiny"
    code = t_models.main(["--device", "cpu", "--dataset", "tiny", "--data-root", str(data_root),
                          "--weights", str(weights["project"]),
                          "--out", str(out), "--batch-size", "2", "--no-progress", "--native"])
    assert code == 0
    return out


def test_native_export_writes_the_release_layout_at_each_images_size(native_out, data_root, weights, tmp_path,
                                                                     capsys):
    shapes = {"a": (64, 64), "b": (41, 57), "odd": (241, 319)}
    check_results(native_out, STEMS, shapes)
    net = prepare_model(weights["model"], "cpu")
    for stem in STEMS:
        expected = predict(net, read_gray(data_root / "tiny" / "test" / "images" / f"{stem}.png"))
        assert np.allclose(read_mat(native_out / "mat" / f"{stem}.mat")["T"], expected.T, atol=1e-5), stem
    score(tmp_path, native_out / "mat", data_root / "tiny" / "test" / "masks")


def test_resize_mode_writes_square_maps(tmp_path, data_root, weights, capsys):
    out = tmp_path / "resized"
    code, stdout, _ = run(capsys, "--dataset", "tiny", "--data-root", data_root, "--weights", weights["project"],
                          "--out", out, "--resize", 64)
    assert code == 0 and stdout.splitlines()[1].startswith("geometry: resized to 64x64 (--resize")
    check_results(out, STEMS, {stem: (64, 64) for stem in STEMS})
    # the release's geometry: the 8-bit image resized as 8 bits, then / 255
    image = cv2.imread(str(data_root / "tiny" / "test" / "images" / "odd.png"), 0)
    x = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR) / np.float32(255)
    expected = predict(prepare_model(weights["model"], "cpu"), x, Geometry(tile=0))
    assert np.allclose(read_mat(out / "mat" / "odd.mat")["T"], expected.T, atol=1e-5)
    score(tmp_path, out / "img", data_root / "tiny" / "test" / "masks")   # PNG predictions, masks resized


def test_default_geometry_is_the_one_the_weights_were_trained_with(tmp_path, data_root, weights, capsys):
    """A release best.pkl means 256x256 (the release exports so); a checkpoint of this project says its size.
    The first line printed names the weights, the second says which geometry runs and why."""
    image = data_root / "tiny" / "test" / "images" / "b.png"
    code, stdout, _ = run(capsys, "--input", image, "--weights", weights["release"], "--out", tmp_path / "rel")
    assert stdout.splitlines()[0] == f"weights: {weights['release']}"
    first = stdout.splitlines()[1]
    assert code == 0 and first.startswith("geometry: resized to 256x256 as the release does") and "release" in first
    assert read_mat(tmp_path / "rel" / "mat" / "b.mat")["T"].shape == (256, 256)

    payload = load_checkpoint(weights["project"])
    trained = tmp_path / "trained64.pt"
    save_checkpoint(trained, weights["model"], meta={"base_size": 64})
    code, stdout, _ = run(capsys, "--input", image, "--weights", trained, "--out", tmp_path / "p64")
    assert code == 0 and stdout.splitlines()[1] == ("geometry: resized to 64x64 as the release does (the size this "
                                                    "checkpoint was trained at)")
    assert read_mat(tmp_path / "p64" / "mat" / "b.mat")["T"].shape == (64, 64)
    assert "base_size" not in payload["meta"]
    code, stdout, _ = run(capsys, "--input", image, "--weights", weights["project"], "--out", tmp_path / "p")
    assert code == 0 and "does not say its training size" in stdout.splitlines()[1]

    code, stdout, _ = run(capsys, "--input", image, "--weights", trained, "--out", tmp_path / "nat", "--native")
    assert code == 0 and stdout.splitlines()[1].startswith("geometry: native size")
    assert read_mat(tmp_path / "nat" / "mat" / "b.mat")["T"].shape == (41, 57)


def test_release_best_pkl_gives_the_project_checkpoints_outputs(tmp_path, native_out, data_root, weights, capsys):
    out = tmp_path / "release"
    code, stdout, _ = run(capsys, "--input", data_root / "tiny" / "test" / "images" / "b.png",
                          "--weights", weights["release"], "--out", out, "--native")
    assert code == 0 and "release layout, K = 1" in stdout
    ours, theirs = read_mat(native_out / "mat" / "b.mat"), read_mat(out / "mat" / "b.mat")
    for name in ("T", "B", "D"):
        assert np.allclose(ours[name], theirs[name], atol=1e-6), name


def test_a_target_at_the_border_of_an_odd_frame_stays_in_place(native_out, data_root):
    T = read_mat(native_out / "mat" / "odd.mat")["T"]
    assert T.shape == (241, 319)
    image = read_gray(data_root / "tiny" / "test" / "images" / "odd.png")
    assert image[1, 317] > 0.9 and T[1, 317] > T[1:4, 310:316].mean(), "the bright 1x1 target lost its place"


def test_a_large_frame_runs_tiled_within_the_measured_bound(tmp_path, weights, capsys):
    image, _ = frame(160, 224, [(80, 100)], seed=5)
    write_png(tmp_path / "big" / "big.png", image)
    outs = {}
    for tile in (128, 0):
        outs[tile] = tmp_path / f"tile{tile}"
        code, _, _ = run(capsys, "--input", tmp_path / "big", "--weights", weights["project"], "--out", outs[tile],
                         "--native", "--tile", tile, "--overlap", 64)
        assert code == 0
    tiled, whole = read_mat(outs[128] / "mat" / "big.mat")["T"], read_mat(outs[0] / "mat" / "big.mat")["T"]
    assert tiled.shape == whole.shape == (160, 224)
    assert 0 < np.abs(tiled - whole).max() < TILE_ATOL


def test_visualize_writes_one_panel_per_image(tmp_path, data_root, weights, capsys):
    out = tmp_path / "vis_run"
    code, stdout, _ = run(capsys, "--dataset", "tiny", "--data-root", data_root, "--weights", weights["project"],
                          "--out", out, "--visualize", "--resize", 64)
    assert code == 0 and "3 panel(s)" in stdout
    for stem in STEMS:
        panel = cv2.imread(str(out / "vis" / f"{stem}.png"), cv2.IMREAD_COLOR)
        assert panel is not None and panel.shape[0] > 300 and panel.shape[1] > 300, stem
        assert panel.std() > 10, f"{stem}: the panel is blank"


def test_detection_outcome_marks_hits_misses_and_false_alarms():
    mask = np.zeros((60, 60), bool)
    mask[10:13, 10:13] = True        # hit: a prediction 2 px off
    mask[40:43, 40:43] = True        # missed: nothing near
    mask[10:13, 40:43] = True        # missed: a prediction 4 px off, which is also a false alarm
    logits = np.full((60, 60), -10, np.float32)
    logits[12:15, 10:13] = 10
    logits[15:18, 40:43] = 10
    logits[50:52, 5:8] = 10          # false alarm far from everything
    outcome = detection_outcome(logits, mask)
    assert np.allclose(outcome.hits, [[11, 11]])
    assert sorted(map(tuple, outcome.misses)) == [(11.0, 41.0), (41.0, 41.0)]
    assert sorted(map(tuple, outcome.false_alarms)) == [(16.0, 41.0), (50.5, 6.0)]
    assert outcome.false_alarm_boxes.tolist() == [[15, 40, 18, 43], [50, 5, 52, 8]]


# ---------------------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------------------

def test_unreadable_images_are_skipped_and_counted_or_fatal_with_strict(tmp_path, data_root, weights, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(data_root / "tiny" / "test" / "images" / "b.png", folder / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run(capsys, "--input", folder, "--weights", weights["project"], "--out", tmp_path / "o1")
    assert code == 1 and "broken.png" in err and "1 image(s) could not be read and were skipped" in err
    assert (tmp_path / "o1" / "mat" / "b.mat").is_file()
    assert "[ WARN" not in err and "[ERROR" not in err, "OpenCV's own messages reach the output"
    code, _, err = run(capsys, "--input", folder, "--weights", weights["project"], "--out", tmp_path / "o2",
                       "--strict")
    assert code == 2 and "broken.png" in err and "--strict" in err
    (folder / "b.png").unlink()
    code, _, err = run(capsys, "--input", folder, "--weights", weights["project"], "--out", tmp_path / "o3")
    assert code == 1 and "1 image(s) could not be read" in err


def test_weights_that_do_not_fit_exit_2_naming_the_key(tmp_path, data_root, weights, capsys):
    payload = load_checkpoint(weights["project"])
    key = next(k for k in payload["model"] if k.endswith("conv_x.weight"))
    payload["model"][key] = torch.zeros(3, 1, 3, 3)
    torch.save(payload, tmp_path / "bad.pt")
    release = torch.load(weights["release"], weights_only=True)
    del release["decos.0.merge.mapping.0.weight"]
    torch.save(release, tmp_path / "bad.pkl")
    for path, name in ((tmp_path / "bad.pt", key), (tmp_path / "bad.pkl", "decos.0.merge.mapping.0.weight")):
        code, _, err = run(capsys, "--dataset", "tiny", "--data-root", data_root, "--weights", path,
                           "--out", tmp_path / "never")
        assert code == 2 and name in err and str(path) in err
    assert not (tmp_path / "never").exists()


def test_an_output_folder_with_results_is_kept_unless_overwrite(tmp_path, data_root, weights, capsys):
    image = data_root / "tiny" / "test" / "images" / "b.png"
    out = tmp_path / "out"
    assert run(capsys, "--input", image, "--weights", weights["project"], "--out", out)[0] == 0
    stamp = (out / "mat" / "b.mat").stat().st_mtime_ns
    code, _, err = run(capsys, "--input", image, "--weights", weights["project"], "--out", out)
    assert code == 2 and f"results exist already and are kept: {out}" in err and "--overwrite" in err
    assert (out / "mat" / "b.mat").stat().st_mtime_ns == stamp
    assert run(capsys, "--input", image, "--weights", weights["project"], "--out", out, "--overwrite")[0] == 0


def test_default_weights_come_from_the_weight_folder(tmp_path, data_root, weights, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_root / "tiny", tmp_path / "datasets" / "tiny")
    shutil.rmtree(tmp_path / "datasets" / "tiny" / "test" / "images")
    (tmp_path / "datasets" / "tiny" / "test" / "images").mkdir()
    shutil.copy(data_root / "tiny" / "test" / "images" / "a.png", tmp_path / "datasets" / "tiny" / "test" / "images")
    code, _, err = run(capsys, "--dataset", "tiny")
    assert code == 2 and str(Path("Weight") / "tiny" / "best.pkl") in err and "--weights" in err
    (tmp_path / "Weight" / "tiny").mkdir(parents=True)
    shutil.copy(weights["release"], tmp_path / "Weight" / "tiny" / "best.pkl")
    code, _, _ = run(capsys, "--dataset", "tiny")
    assert code == 0 and (tmp_path / "results" / "tiny" / "mat" / "a.mat").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "nowhere"], "nowhere"),
    (["--input", "missing_folder"], "missing_folder"),
    (["--input", ".", "--weights", "missing.pkl"], "missing.pkl"),
    (["--dataset", "tiny", "--resize", "250"], "multiple of 32"),
    (["--dataset", "tiny", "--tile", "100"], "multiple of 32"),
])
def test_user_errors_exit_2_with_a_message(argv, message, tmp_path, data_root, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "x.png", np.zeros((8, 8), np.uint8))
    code, _, err = run(capsys, *argv, "--data-root", data_root)
    assert code == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_exits_2(tmp_path, data_root, weights, capsys):
    code, _, err = run(capsys, "--dataset", "tiny", "--data-root", data_root, "--weights", weights["project"],
                       "--out", tmp_path / "o", "--device", "cuda")
    assert code == 2 and "--device cpu" in err
