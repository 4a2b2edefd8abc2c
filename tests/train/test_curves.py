"""Learning curves: both log formats read, the figure written atomically, plot_curves.py's exit codes, and a
training run that draws its own curves.png."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from utils.train.curve_figure import curves_figure
from utils.train.curves import LogFormatError, plot_curves, read_curves, refresh_run_curves

REPO = Path(__file__).resolve().parents[2]
RELEASE_LOGS = REPO.parent / "shared" / "reference" / "release_logs"

# The lines utils.train.loop writes through utils.train.run_dir.RunLog (time stamp, then the message), for a run of 2 epochs of
# 20 iterations, logged every 10, stopped in its second epoch and resumed after its first.
PROJECT_LOG = """\
2026-11-29 22:40:00 start: {"dataset": "tiny", "epochs": 2, "batch_size": 4, "lr": 0.001}
2026-11-29 22:40:00 note: tiny/test: size mismatch tolerated, the mask is resized with nearest neighbours
2026-11-29 22:41:54 epoch 1/2 iter 10/20 (total 10/40) - loss 1.0100 (soft_iou 0.9993, mse 0.10777) - lr 9.874e-04 - 0.500 it/s - left: epoch 20 s, run 1 min 00 s
2026-11-29 22:42:14 epoch 1/2 iter 20/20 (total 20/40) - loss 0.9000 (soft_iou 0.8950, mse 0.05000) - lr 9.500e-04 - 0.500 it/s - left: epoch 0 s, run 40 s
2026-11-29 22:42:14 epoch 1/2 done - loss 0.9500, soft_iou 0.9400, mse 0.0700 - lr 9.500e-04 (last used)
2026-11-29 22:42:20 validation epoch 1/2 iter 20 - mIoU 0.0006, nIoU 0.0010, Pd 0.5000, Fa 12.34e-6, Prec 0.0010, Recall 0.5000, F1 0.0020, AUC 0.6000 - best mIoU 0.0006 (epoch 1, iter 20) *
2026-11-29 22:42:40 epoch 2/2 iter 10/20 (total 30/40) - loss 0.9990 (soft_iou 0.9900, mse 0.09000) - lr 9.100e-04 - 0.500 it/s - left: epoch 20 s, run 20 s
2026-11-29 22:43:00 resumed after epoch 1 (iteration 20)
2026-11-29 22:43:20 epoch 2/2 iter 10/20 (total 30/40) - loss 0.8000 (soft_iou 0.7950, mse 0.05000) - lr 9.100e-04 - 0.500 it/s - left: epoch 20 s, run 20 s
2026-11-29 22:43:40 epoch 2/2 iter 20/20 (total 40/40) - loss 0.7000 (soft_iou 0.6960, mse 0.04000) - lr 8.700e-04 - 0.500 it/s - left: epoch 0 s, run 0 s
2026-11-29 22:43:40 epoch 2/2 done - loss 0.7500, soft_iou 0.7450, mse 0.0450 - lr 8.700e-04 (last used)
2026-11-29 22:43:45 validation epoch 2/2 iter 40 - mIoU 0.2500, nIoU 0.3000, Pd 0.7500, Fa 3.00e-6, Prec 0.4000, Recall 0.7500, F1 0.5200, AUC 0.9000 - best mIoU 0.2500 (epoch 2, iter 40) *
2026-11-29 22:43:45 done: best mIoU 0.2500 at epoch 2 (iteration 40); weights in runs/tiny
"""


@pytest.fixture
def project_run(tmp_path) -> Path:
    run = tmp_path / "tiny_run"
    run.mkdir()
    (run / "log.txt").write_text(PROJECT_LOG)
    return run


def release_log(name: str) -> Path:
    path = RELEASE_LOGS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the authors' logs live beside the repository, in ../shared)")
    return path


def test_project_log_gives_global_iterations_and_drops_what_a_resume_trained_again(project_run):
    curves = read_curves(project_run)
    assert (curves.label, curves.format, curves.iterations_per_epoch) == ("tiny_run", "project", 20)
    assert curves.source == project_run / "log.txt"
    # the interrupted epoch's line at iteration 30 (loss 0.9990) is replaced by the resumed run's
    assert curves.train_iter == [10, 20, 30, 40]
    assert curves.train["loss"] == [1.01, 0.9, 0.8, 0.7]
    assert curves.train["soft_iou"] == [0.9993, 0.895, 0.795, 0.696]
    assert curves.train["mse"] == [0.10777, 0.05, 0.05, 0.04]
    assert curves.train["lr"] == [9.874e-4, 9.5e-4, 9.1e-4, 8.7e-4]
    assert curves.val_iter == [20, 40], "a validation's 'iter' is already the global iteration"
    assert set(curves.val) == {"mIoU", "nIoU", "Pd", "Fa", "Prec", "Recall", "F1", "AUC"}
    assert curves.val["mIoU"] == [0.0006, 0.25] and curves.val["Pd"] == [0.5, 0.75]
    assert curves.val["Fa"] == pytest.approx([12.34e-6, 3e-6]), "Fa is logged as 'x e-6' and read as a fraction"
    assert curves.best() == (40, 0.25) and curves.best("nIoU") == (40, 0.3)
    assert read_curves(project_run / "log.txt", label="mine").label == "mine"


def test_a_start_line_begins_the_curves_afresh(tmp_path):
    lines = PROJECT_LOG.splitlines()
    stopped = [lines[0], lines[2]]                        # a run stopped before its first checkpoint, started again
    (tmp_path / "log.txt").write_text("\n".join(stopped + lines) + "\n")
    curves = read_curves(tmp_path / "log.txt")
    assert curves.train_iter == [10, 20, 30, 40] and curves.val_iter == [20, 40]


def test_release_irstd1k_log():
    curves = read_curves(release_log("IRSTD-1K_log.txt"))
    assert (curves.label, curves.format, curves.iterations_per_epoch) == ("IRSTD-1K_log.txt", "release", 100)
    # a line every 10 iterations; the epoch's last prints its in-epoch counter as 0 ("[1/400]-[0/100]")
    assert len(curves.train_iter) == 4000 and curves.train_iter[:10] == list(range(10, 101, 10))
    assert curves.train_iter[-1] == 40000
    first = {key: values[0] for key, values in curves.train.items()}
    assert first == {"loss": 1.0093, "soft_iou": 0.9996, "mse": 0.0968, "lr": 0.0001}
    assert first["loss"] == pytest.approx(first["soft_iou"] + 0.1 * first["mse"], abs=1e-4)
    assert curves.val_iter == list(range(100, 40001, 100)), "one validation at the end of each epoch"
    assert set(curves.val) == {"mIoU", "F1"}
    early = [v for i, v in zip(curves.val_iter, curves.val["mIoU"]) if i <= 2000]
    assert len(early) == 20 and max(early) < 0.01, "mIoU stays near 0 for the first 20 epochs"
    assert curves.val["mIoU"][0] == 0.0008 and curves.val["mIoU"][-1] == 0.6715
    assert curves.best() == (17400, 0.693)                  # "mIoU: 0.xxxx/0.6930" from epoch 174 on
    assert curves.best("F1") == (17400, 0.8187)


def test_release_nudt_log_places_mid_epoch_and_epoch_end_validations():
    curves = read_curves(release_log("SIRST-NUDT_log.txt"))
    assert curves.iterations_per_epoch == 83
    assert len(curves.train_iter) == 3320 and curves.train_iter[-1] == 33200
    assert curves.train_iter[8:11] == [90, 100, 110], "'[2/400]-[7/83]' is global iteration 90"
    # every 100 iterations (save_iter_step=100) and at each epoch's end (83, 166, ...)
    assert curves.val_iter[:8] == [83, 100, 166, 200, 249, 300, 332, 400]
    assert len(curves.val_iter) == 728 and curves.val_iter == sorted(set(curves.val_iter))
    assert curves.val_iter[-1] == 33200
    assert curves.best()[1] == 0.9187 and curves.best("F1")[1] == 0.9577


def test_a_log_in_neither_format_or_a_missing_one_is_named(tmp_path):
    other = tmp_path / "train_output.txt"
    other.write_text("Epoch 1: loss=0.5\nEpoch 2: loss=0.4\n")
    with pytest.raises(LogFormatError, match="train_output.txt: neither a log.txt of this project"):
        read_curves(other)
    with pytest.raises(FileNotFoundError, match="absent.txt does not exist"):
        read_curves(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        read_curves(tmp_path)


def test_figure_is_written_atomically(project_run, tmp_path):
    runs = [read_curves(project_run)]
    if RELEASE_LOGS.is_dir():
        runs.append(read_curves(RELEASE_LOGS / "IRSTD-1K_log.txt"))
    out = plot_curves(runs, tmp_path / "figures" / "curves.png", title="check", max_iteration=3000)
    assert out == tmp_path / "figures" / "curves.png"
    data = out.read_bytes()
    assert len(data) > 10_000 and data.startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"], "no temporary file is left behind"


def test_after_a_single_validation_every_label_fits_and_fa_has_ticks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    one = "".join(PROJECT_LOG.splitlines(keepends=True)[:6])              # a log with one validation, whose
    (run / "log.txt").write_text(one.replace("mIoU 0.0006,", "mIoU 0.0001,"))  # mIoU gets wide tick labels
    figure = curves_figure([read_curves(run)])
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    page = figure.bbox
    for ax in figure.axes:
        if not ax.axison:
            continue
        box = ax.get_tightbbox(renderer)            # the panel with its tick labels and title
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, \
            (ax.get_title(), box, page)
    fa = next(ax for ax in figure.axes if ax.get_title().startswith("validation Fa"))
    low, high = fa.get_ylim()
    ticks = [t for t in fa.get_yticks() if low <= t <= high]
    assert len(ticks) >= 2 and low <= 12.34 <= high, (ticks, low, high)     # Fa 12.34e-6 between ticks


def test_refreshing_a_runs_curves_notes_a_failure_instead_of_raising(project_run, tmp_path):
    notes = []
    assert refresh_run_curves(project_run, notes.append) == project_run / "curves.png"
    assert (project_run / "curves.png").stat().st_size > 0 and notes == []
    (tmp_path / "empty").mkdir()
    assert refresh_run_curves(tmp_path / "empty", notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("note: ") and "curves.png not drawn" in notes[0]
    assert "\n" not in notes[0]


def _plot_curves(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "plot_curves.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_plot_curves_command(project_run, tmp_path):
    out = tmp_path / "cmp.png"
    done = _plot_curves(str(project_run), str(project_run / "log.txt"), "--out", str(out), "--labels", "a", "b")
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0 and "best mIoU 0.2500 at iteration 40" in done.stdout

    unknown = tmp_path / "notes.txt"
    unknown.write_text("nothing to see\n")
    for args, message in [((str(tmp_path / "absent"), "--out", str(tmp_path / "x.png")), "absent does not exist"),
                          ((str(unknown), "--out", str(tmp_path / "x.png")), "notes.txt: neither a log.txt"),
                          ((str(project_run), "--out", str(out)), "cmp.png exists; pass --overwrite"),
                          ((str(project_run), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"), "--labels")]:
        failed = _plot_curves(*args)
        assert failed.returncode == 2, args
        assert failed.stderr.startswith("plot_curves.py: ") and message in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert not (tmp_path / "x.png").exists()
    assert _plot_curves(str(project_run), "--out", str(out), "--overwrite").returncode == 0


@pytest.mark.slow
def test_a_training_run_draws_its_curves(tmp_path):
    from run_0 import main
    from utils.data.synthetic_sets import write_dataset

    write_dataset(tmp_path / "data", "tiny", n_trainval=8, n_test=4, size=32, seed=3)
    out = tmp_path / "run"
    assert main(["--dataset", "tiny", "--data-root", str(tmp_path / "data"), "--out", str(out), "--epochs", "2",
                 "--batch-size", "4", "--base-size", "32", "--stage-num", "1", "--vis-images", "0"]) == 0
    png = out / "curves.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert "not drawn" not in (out / "log.txt").read_text()
    curves = read_curves(out)
    assert curves.format == "project" and curves.val_iter == [2, 4] and curves.train_iter == [2, 4]


def test_overwrite_takes_away_the_old_runs_curves(tmp_path):
    from utils.train.config import parse_command_line
    from utils.train.run_dir import prepare_run_dir

    for name in ("latest.pkl", "log.txt", "curves.png"):
        (tmp_path / name).write_bytes(b"old run")
    config = parse_command_line(["--out", str(tmp_path), "--overwrite"])[0]
    prepare_run_dir(config)
    assert not (tmp_path / "curves.png").exists(), "a new run must not show the replaced run's curves"


def test_false_targets_on_background_frames_get_a_panel_of_their_own(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = PROJECT_LOG.replace("AUC 0.6000 -", "AUC 0.6000, FT/frame 0.5000, FT-frames 0.2500 -")
    (run / "log.txt").write_text(lines)                       # counted at the first validation only
    curves = read_curves(run)
    figure = curves_figure([curves])
    panel = next(ax for ax in figure.axes if ax.get_title() == "held-out false targets per background frame")
    assert [list(line.get_xdata()) for line in panel.get_lines()] == [[20]]
    assert [list(line.get_ydata()) for line in panel.get_lines()] == [[0.5]]
    (run / "log.txt").write_text(PROJECT_LOG)
    plain = curves_figure([read_curves(run)])
    assert not any(ax.get_title().startswith("held-out false targets") for ax in plain.axes)
