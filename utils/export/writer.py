"""Export: images, folders of frames or videos in; maps, a table of targets and pictures out.

    source = FrameSource("datasets/NUDT-SIRST/test/images")          # or a video, or one image
    summary = export(net, source, "results/NUDT-SIRST", geometry, ExportOptions(visualize=True))

For every image or frame, under the output folder:

- ``img/<name>.png`` (round(sigmoid(T) x 255), 8-bit) and ``mat/<name>.mat`` (T logits, B and D of the last
  stage, float32), the release's layout, at the export geometry (written by default for images; for a video
  only with ``maps=True``: one .mat a frame adds up fast);
- one row per detected target in ``detections.csv`` (and ``detections.jsonl`` with ``json=True``), see
  ``utils.export.detections``. Targets are found on the exported map (the one ``cal_from_mask.py`` scores), as
  8-connected components of sigmoid(T) > ``threshold``; their coordinates and areas are given in the input
  image's pixels (scaled back from the map when the export geometry resized the image);
- optionally ``masks/<name>.png`` (the thresholded map, 0/255), ``vis/<name>.png`` (a decomposition panel) and an
  annotated video or folder of frames with the detections drawn.

Nothing is overwritten without ``overwrite``; memory stays constant whatever the length of the source.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import SHIPPED_MODEL
from utils.export.detection_table import DetectionTable
from utils.export.outputs import (MAP_FOLDERS, TABLE_NAME, ExportError, ExportInterrupted, ExportOptions,  # noqa: F401
                                  check_output, finished_frames, keep_rows_of, output_paths)
from utils.export.detections import detect, draw_detections, to_image_pixels, write_mask
from utils.io.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_mask, release_image, \
    resize_mask_centres, resize_nearest, to_unit, write_png
from utils.export.maps import Geometry, Prediction, iter_predictions, write_prediction
from utils.io.frame_writer import FrameWriter
from utils.io.video import FrameSource, list_frames

@dataclass
class ExportSummary:
    """What an export did: images or frames written, those an interrupted export had finished and ``resume``
    kept (``kept``), how many could not be read (``unread``; the first few reasons in ``skipped``), targets found,
    seconds."""

    written: int = 0
    kept: int = 0
    unread: int = 0
    skipped: list[str] = field(default_factory=list)
    detections: int = 0
    panels: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else math.nan

    def report(self, script: str, video: bool, out: Path) -> int:
        """Print what was written (stdout) and what could not be read (stderr); the script's exit status: 1 when
        some images or frames could not be read, else 0."""
        unit = "frame(s)" if video else "image(s)"
        kept = f" (and kept the {self.kept} an earlier export had finished)" if self.kept else ""
        print(f"wrote {self.written} {unit}{kept} to {out} in {self.seconds:.1f} s ({self.per_second:.2f} "
              f"{unit[:-3]}/s); {self.detections} target(s) in " + ", ".join(str(p) for p in self.files)
              + (f"; {self.panels} panel(s) in {out / 'vis'}" if self.panels else ""))
        if self.unread:
            print(f"{script}: error: {self.unread} {unit} could not be read and were skipped (the first listed above)",
                  file=sys.stderr)
            return 1
        return 0


# ----------------------------------------------------------------------------------------------------------
# Files out
# ----------------------------------------------------------------------------------------------------------

def find_mask(mask_dir: Path | None, stem: str) -> Path | None:
    """<mask_dir>/<stem>.<any image suffix>, or None."""
    if mask_dir is None or not mask_dir.is_dir():
        return None
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        path = mask_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _mask_for_panel(path: Path, image_shape: tuple[int, int], geometry: Geometry,
                    warn: Callable[[str], None]) -> np.ndarray | None:
    """A mask brought to the prediction's size, or None (with a note) when unreadable."""
    try:
        mask = read_mask(path)
    except ImageReadError as error:
        warn(f"mask not shown: {error}")
        return None
    if geometry.resize:
        return resize_nearest(mask, (geometry.resize, geometry.resize)) > 0     # the release's geometry
    return resize_mask_centres(mask, tuple(image_shape)) > 0


# ----------------------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------------------

def _check_names(source: FrameSource) -> None:
    if source.kind != "folder":
        return
    duplicates = sorted(stem for stem, count in Counter(p.stem for p in list_frames(source.path)).items()
                        if count > 1)
    if duplicates:
        raise ExportError(f"several input files share the name(s) {duplicates[:5]} (different suffixes); their "
                          f"results would overwrite each other: rename or move them")


def export(model, source: FrameSource, out_dir: str | Path, geometry: Geometry = Geometry(),
           options: ExportOptions = ExportOptions(), warn: Callable[[str], None] | None = None) -> ExportSummary:
    """Predict every image or frame of ``source`` with a prepared PyTorch model (``utils.export.predict.prepare_model``)
    or an ``ArrayNetwork`` (``utils.export.onnx_runtime.OnnxRuntimeNet``) and write what ``options`` asks for under
    ``out_dir``. An unreadable image or frame is reported through ``warn`` (default: stderr, above the progress
    bar) and skipped (``ExportError`` with ``options.strict``). Without ``options.progress`` nothing here needs
    tqdm (onnx_detect.py runs with numpy, OpenCV, SciPy and ONNX Runtime alone)."""
    out_dir = Path(out_dir)
    _check_names(source)
    check_output(out_dir, options)
    video = source.kind == "video"
    maps = (not video) if options.maps is None else options.maps
    sequence = video or options.fps is not None
    summary = ExportSummary()
    finished = finished_frames(out_dir, options, maps, video) if options.resume else set()
    waiting = {}
    bar = progress_bar(source.frame_count, "frame" if video else "img", options.progress)
    warn = warn or (lambda message: bar.write(message, file=sys.stderr))

    def frames() -> Iterator[tuple[str, np.ndarray]]:
        reported = 0
        for frame in source.frames():
            while reported < len(source.summary.errors):
                _skipped(source.summary.errors[reported])
                reported += 1
            if frame.name in finished:
                summary.kept += 1
                bar.update(1)
                continue
            waiting[frame.name] = frame
            yield frame.name, frame.image
        while reported < len(source.summary.errors):
            _skipped(source.summary.errors[reported])
            reported += 1
        summary.unread = source.summary.failed

    def _skipped(error: str) -> None:
        if options.strict:
            raise ExportError(f"{error} (stopped because of --strict; without it the image is skipped)")
        summary.skipped.append(error)
        warn(f"skipped: {error}")

    names = [f"{TABLE_NAME}.csv"] + ([f"{TABLE_NAME}.jsonl"] if options.json else [])
    for name in names if options.resume else []:
        keep_rows_of(out_dir / name, finished)          # the rows of frames not finished are written again
    tables = [DetectionTable(out_dir / name, overwrite=options.overwrite, append=options.resume) for name in names]
    annotated = None
    start = time.perf_counter()
    try:
        if options.annotate is not None:
            annotated = FrameWriter(options.annotate, fps=source.fps or options.fps or 25.0,
                                    overwrite=options.overwrite)
        for prediction in iter_predictions(model, frames(), geometry, options.batch_size,
                                           return_stages=options.visualize):
            frame = waiting.pop(prediction.name)
            probability = prediction.probability
            found = to_image_pixels(detect(probability, options.threshold), probability.shape, frame.image.shape)
            for table in tables:
                table.write(found, source=Path(frame.source).name, frame=frame.index if sequence else None,
                            time=frame.time if sequence else None)
            summary.detections += len(found)
            if options.save_masks:
                write_mask(out_dir / "masks" / f"{frame.name}.png", probability, options.threshold,
                           overwrite=options.overwrite)
            if annotated is not None:
                annotated.write(draw_detections(frame.image, found), frame.name)
            if options.visualize:
                _panel(out_dir, frame.image, prediction, geometry, options.mask_dir, warn)
                summary.panels += 1
            if maps:
                write_prediction(prediction, out_dir)     # last: a frame with its .mat is finished
            summary.written += 1
            bar.update(1)
    except KeyboardInterrupt:
        total = summary.written + summary.kept
        of = f" of {source.frame_count}" if source.frame_count else ""
        raise ExportInterrupted(
            f"{total}{of} {'frame' if video else 'image'}(s) finished, their results kept in {out_dir}"
            + ("; run the same command with --resume to do the rest" if maps and not (
                options.annotate and Path(options.annotate).suffix.lower() in (".avi", ".mp4", ".mkv"))
               else "; run it again with --overwrite to start afresh")) from None
    finally:
        bar.close()
        for table in tables:
            table.close()
        if annotated is not None:
            annotated.close()
    summary.seconds = time.perf_counter() - start
    summary.files = [t.path for t in tables] + ([options.annotate] if options.annotate is not None else [])
    return summary


class _NoBar:
    """What ``export`` asks of a progress bar (tqdm's update, close and write), when none is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(message: str, file=None) -> None:
        print(message, file=file or sys.stdout, flush=True)


def progress_bar(total: int | None, unit: str, shown: bool):
    """A tqdm bar (drawn on terminals only) or, when not ``shown``, one that shows nothing and needs no tqdm."""
    if not shown:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, disable=None, dynamic_ncols=True)


def _panel(out_dir: Path, image: np.ndarray, prediction: Prediction, geometry: Geometry, mask_dir: Path | None,
           warn: Callable[[str], None]) -> None:
    from utils.export.panels import save_panel   # here: matplotlib loads only when panels are asked for
    mask_path = find_mask(mask_dir, prediction.name)
    mask = _mask_for_panel(mask_path, image.shape, geometry, warn) if mask_path else None
    shown = release_image(image, prediction.T.shape) if geometry.resize else to_unit(image)
    save_panel(out_dir / "vis" / f"{prediction.name}.png", shown, prediction, mask)


# ----------------------------------------------------------------------------------------------------------
# Where inputs and weights come from
# ----------------------------------------------------------------------------------------------------------

def dataset_images(data_root: str | Path, name: str) -> tuple[Path, Path]:
    """<data_root>/<name>/test/images and the folder of their masks."""
    root = Path(data_root)
    folder = root / name / "test" / "images"
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if (p / "test" / "images").is_dir()) if root.is_dir() else []
        raise ExportError(f"{folder}: no such folder. A data set lives in <data-root>/<name>/test/images "
                          f"(see datasets/README.md); data sets found under {root}: {known or 'none'}; "
                          f"use --data-root to look elsewhere, or --input for any folder of images")
    if not list_images(folder):
        raise ExportError(f"{folder}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return folder, root / name / "test" / "masks"


# The model this project ships: NUAA-SIRST, trained on two CPU cores (Weight/NUAA-SIRST/README.md).
SHIPPED_WEIGHTS = SHIPPED_MODEL / "best.pkl"


def default_weights(dataset: str | None, weight_root: str | Path = "Weight") -> Path:
    """Weight/<dataset>/best.pkl, which training writes (for NUAA-SIRST: the shipped model, unless the working
    folder is not the repository's and has a run of its own there); without a data set, the shipped model. An error that says what to do when it is absent."""
    if dataset is None or (dataset == "NUAA-SIRST" and not (Path(weight_root) / dataset / "best.pkl").is_file()):
        if not SHIPPED_WEIGHTS.is_file():
            raise ExportError(f"no weights given and the shipped model {SHIPPED_WEIGHTS} is missing: pass --weights "
                              f"FILE (a checkpoint of this project or a release best.pkl)")
        return SHIPPED_WEIGHTS
    path = Path(weight_root) / dataset / "best.pkl"
    if not path.is_file():
        raise ExportError(f"no weights given and {path} does not exist: train first "
                          f"(python run_0.py --dataset {dataset}) or pass --weights FILE "
                          f"(a checkpoint of this project or an authors' best.pkl)")
    return path
