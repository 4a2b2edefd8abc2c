"""What an export may write and where: its options and the command-line flags that set them (the same in
t_models.py and onnx_detect.py), the results it must not replace, the inputs it must never touch, and what an
interrupted export already finished (``resume``).

An export is finished frame by frame: a frame's ``mat/<name>.mat`` is the last file written for it (atomically),
so a frame whose .mat exists has all its files and its rows in the detection table; ``resume`` skips those and
drops the table rows of any other frame before going on.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from utils.export.maps import Geometry

MAP_FOLDERS = ("img", "mat", "vis", "masks")
TABLE_NAME = "detections"


class ExportError(ValueError):
    """A problem the user has to fix before or during an export (paths, existing results, unreadable images)."""


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C during an export; its message says what was kept and how to finish the rest."""


@dataclass(frozen=True)
class ExportOptions:
    """What an export writes besides the detection table.

    Args:
        batch_size: images of the same size (or tiles) per forward pass.
        maps: write img/ and mat/; None: for images yes, for a video no.
        threshold: a pixel is target when sigmoid(T) > threshold (0.5: T > 0).
        json: also write the table as JSON Lines (detections.jsonl).
        save_masks: write masks/<name>.png, the thresholded map.
        visualize: write vis/<name>.png, a decomposition panel (with the ground truth of ``mask_dir``).
        mask_dir: masks for the panels, matched by name.
        annotate: a video file (.avi, .mp4, .mkv) or a folder for frames with the detections drawn.
        fps: frame rate of a folder of frames (gives them times); a video's own rate is used for it.
        strict: stop at the first image or frame that cannot be read instead of skipping it.
        overwrite: write over existing results.
        resume: finish an interrupted export in the same folder: frames whose results are complete are kept and
            skipped, the others done.
        progress: a progress bar (images or frames per second).
    """

    batch_size: int = 1
    maps: bool | None = None
    threshold: float = 0.5
    json: bool = False
    save_masks: bool = False
    visualize: bool = False
    mask_dir: Path | None = None
    annotate: Path | None = None
    fps: float | None = None
    strict: bool = False
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ExportError(f"the batch size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.threshold < 1.0:
            raise ExportError(f"the threshold is a probability in [0, 1), got {self.threshold}")
        if self.resume and self.overwrite:
            raise ExportError("--resume and --overwrite exclude each other: --resume keeps the finished results, "
                              "--overwrite replaces them")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of where results go, the geometry, the threshold and what is written; ``export_options`` reads
    them back."""
    parser.add_argument("--out", type=Path, help="output folder (default: results/<data set, or input name>)")
    geometry = parser.add_mutually_exclusive_group()
    geometry.add_argument("--resize", type=int, metavar="SIZE",
                          help="resize every image to SIZE x SIZE as the release does (default: the size the weights "
                               "were trained at, as a checkpoint or an ONNX model of this project records it; 256 "
                               "for a release best.pkl)")
    geometry.add_argument("--native", action="store_true",
                          help="keep each image's own size: pad to a multiple of 32, tile large frames (this "
                               "project's geometry, not the release's)")
    parser.add_argument("--tile", type=int, default=Geometry.tile,
                        help="with --native: run inputs larger than this (px) tile by tile; 0: never (default: 512)")
    parser.add_argument("--overlap", type=int, default=Geometry.overlap,
                        help="with --native: overlap of neighbouring tiles in px (default: 128)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="a pixel is target when sigmoid(T) > THRESHOLD (default: the one an ONNX model "
                             "records, else 0.5, i.e. T > 0)")
    parser.add_argument("--json", action="store_true", help="also write the targets as JSON Lines (detections.jsonl)")
    parser.add_argument("--save-masks", action="store_true", help="also write masks/<name>.png, the thresholded map")
    parser.add_argument("--annotate", nargs="?", type=Path, const=True, default=None, metavar="PATH",
                        help="write the input with the targets drawn: a video (.avi, .mp4, .mkv) or a folder of "
                             "PNG frames (default path: <out>/annotated.avi for a video, <out>/annotated/ else)")
    parser.add_argument("--maps", choices=("auto", "on", "off"), default="auto",
                        help="write img/ and mat/ per image or frame; auto: for images, not for a video "
                             "(default: auto)")
    parser.add_argument("--fps", type=float, help="frame rate of a folder of frames: gives rows a frame index and time")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="write over results already in the output folder")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted export in the same output folder: images whose results are "
                             "complete are kept and skipped, the rest are done (needs the maps: img/ and mat/)")


def input_name(path: Path) -> str:
    """The name of an input's results folder: a file's stem, a folder's own name."""
    return path.stem if path.is_file() else path.resolve().name


def export_options(args: argparse.Namespace, video: bool, out: Path, threshold: float, **more) -> ExportOptions:
    """The ``ExportOptions`` that ``add_output_arguments``' flags describe, for a source that is a ``video`` or
    not, written to ``out``; ``more``: the other fields (batch_size, visualize, mask_dir, progress)."""
    annotate = args.annotate
    if annotate is True:
        annotate = out / ("annotated.avi" if video else "annotated")
    return ExportOptions(maps={"auto": None, "on": True, "off": False}[args.maps], threshold=threshold,
                         json=args.json, save_masks=args.save_masks, annotate=annotate, fps=args.fps,
                         strict=args.strict, overwrite=args.overwrite, resume=args.resume, **more)


def output_paths(out_dir: Path, options: ExportOptions) -> list[Path]:
    """The files and folders an export with ``options`` writes into (besides the per-image folders)."""
    paths = [out_dir / f"{TABLE_NAME}.csv"] + ([out_dir / f"{TABLE_NAME}.jsonl"] if options.json else [])
    return paths + ([options.annotate] if options.annotate is not None else [])


def check_output(out_dir: str | Path, options: ExportOptions) -> None:
    """Refuse to write where results exist already, unless ``options.overwrite`` (or ``resume``); the message
    names the results it keeps."""
    out_dir = Path(out_dir)
    found = sorted(p for sub in MAP_FOLDERS if (out_dir / sub).is_dir() for p in (out_dir / sub).iterdir())
    found += [p for p in output_paths(out_dir, options) if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if found and not (options.overwrite or options.resume):
        others = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ExportError(f"results exist already and are kept: {found[-1]}{others}; pass --resume to finish an "
                          f"interrupted export, --overwrite to write over them, or --out to choose another folder")


def check_not_inputs(inputs: list[Path | None], out_dir: str | Path, options: ExportOptions) -> None:
    """Refuse (even with --overwrite) any output that is an input: the image, video or folder read, or the masks."""
    out_dir = Path(out_dir)
    protected = [Path(p).resolve() for p in inputs if p is not None and Path(p).exists()]
    outputs = [out_dir / sub for sub in MAP_FOLDERS] + output_paths(out_dir, options)
    for output in outputs:
        target = output.resolve()
        for source in protected:
            # a folder of annotated frames writes <name>.png: over an input image that lies in it
            if target == source or (output == options.annotate and source.is_file() and source.parent == target):
                raise ExportError(f"{output} is an input of this export ({source}) and would be destroyed; it is "
                                  f"never written, even with --overwrite: choose another --annotate or --out")


def finished_frames(out_dir: Path, options: ExportOptions, maps: bool, video: bool) -> set[str]:
    """The names of the frames an interrupted export finished (their .mat exists), for ``resume``; an export
    whose progress cannot be told from its files is refused."""
    if not maps:
        raise ExportError(f"--resume tells finished frames by their mat/<name>.mat, which this export does not "
                          f"write: add --maps on, or start again with --overwrite (the results in {out_dir} are "
                          f"kept until then)")
    if options.annotate is not None and Path(options.annotate).suffix.lower() in (".avi", ".mp4", ".mkv"):
        raise ExportError(f"--resume cannot continue the annotated video {options.annotate}: annotate into a "
                          f"folder of frames, or start again with --overwrite")
    mat = out_dir / "mat"
    return {p.stem for p in mat.glob("*.mat")} if mat.is_dir() else set()


def keep_rows_of(path: Path, finished: set[str]) -> int:
    """Rewrite the table at ``path`` (atomically) with only the rows of ``finished`` frames, which an interrupted
    export had completed; returns the rows kept."""
    if not path.exists():
        return 0
    with open(path, newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(handle)
            header = next(reader, None)
            lines = [row for row in reader if row]
        else:
            header, lines = None, [json.loads(line) for line in handle if line.strip()]

    def frame_name(row) -> list[str]:
        source, frame = (row["source"], row["frame"]) if header is None else (row[0], row[1])
        stem = Path(source).stem
        return [stem] + ([f"{stem}_{int(frame):06d}"] if frame not in (None, "") else [])

    if header is not None and header[:2] != ["source", "frame"]:
        raise ExportError(f"{path}: not a detection table this project wrote (columns {header[:4]}); move it "
                          f"away or pass --overwrite")
    kept = [row for row in lines if any(name in finished for name in frame_name(row))]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        if header is not None:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerows([header] + kept)
        else:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in kept)
    os.replace(tmp, path)
    return len(kept)
