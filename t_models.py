"""Export DCONet predictions and targets: results/<name>/{img,mat}/<name>.{png,mat} and detections.csv.

    python t_models.py --dataset NUDT-SIRST                     # Weight/NUDT-SIRST/best.pkl on its test split
    python t_models.py --dataset IRSTD-1k --weights best.pkl    # a release best.pkl: 256x256, as the release
    python t_models.py --input flight.mp4 --weights best.pkl --annotate   # a video: table + annotated video
    python t_models.py --input frames/ --weights best.pkl --visualize     # a folder of images or frames
    python t_models.py --weights best.pkl --onnx dconet.onnx              # an ONNX model, checked (docs/export.md)
    python t_models.py --dataset IRSTD-1k --backend onnxruntime           # run through ONNX Runtime

By default every image is resized as the release does (8-bit INTER_LINEAR, then / 255) to the size the weights
were trained at: a checkpoint of this project says its size, a release best.pkl means 256x256. --resize S
picks another size; --native keeps each image's own size (this project's: padded to a multiple of 32 by
reflection, cropped back, frames larger than --tile run tile by tile). The first line printed says which
geometry runs and why.

Every target (8-connected component of sigmoid(T) > --threshold) goes to detections.csv, one row each: the
image or video, the frame index and time (videos, or folders with --fps), the target's id, centroid (x, y),
box (x0, y0, x1, y1, exclusive ends), area and peak and mean probability, in the input's pixels.
Exit status: 0 when every image or frame was written, 1 when some could not be read (they are listed and
counted), 2 on a user error (the message says what to fix).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from utils.cli import run_script, starting
from utils.io.cpu_memory import limit_openmp_spinning

limit_openmp_spinning()   # before torch loads: spinning idle threads slow exports on a busy CPU several times

with starting("t_models.py", active=__name__ == "__main__"):     # a Ctrl-C while torch loads: one line
    from model import load_model
    from utils.export.onnx_runtime import BACKENDS, prepare_backend
    from utils.export.outputs import check_not_inputs
    from utils.export.predict import Geometry, trained_geometry
    from utils.export.writer import SHIPPED_WEIGHTS, ExportOptions, dataset_images, default_weights, export
    from utils.io.images import quiet_opencv
    from utils.io.runtime import add_runtime_arguments, runtime_from_args
    from utils.io.video import FrameSource

GPU_BATCH = 8   # images per forward pass on a GPU unless --batch-size says otherwise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring "
                                     "(t_models.py) and README.md for the outputs.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="data set name: reads <data-root>/NAME/test/images")
    source.add_argument("--input", type=Path, help="an image, a folder of images or frames, or a video file")
    source.add_argument("--onnx", type=Path, metavar="PATH",
                        help="write the deploy form of --weights as an ONNX model to PATH (dynamic batch, height and "
                             "width, multiples of 32), checked against PyTorch at the training size (or --resize) "
                             "and two other sizes; refused (no file) when T is off by more than 1e-4 x max(1, max |T|)")
    parser.add_argument("--onnx-outputs", choices=("T", "BTD"), default="T",
                        help="with --onnx: the graph's outputs, T alone or B, T, D of the last stage (default: T)")
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch",
                        help="run the network in PyTorch or, exported to ONNX and checked, in ONNX Runtime on the "
                             "CPU (needs onnx, onnxscript and onnxruntime; default: pytorch)")
    parser.add_argument("--data-root", type=Path, default=Path("datasets"),
                        help="folder holding the data sets (default: datasets)")
    parser.add_argument("--weights", type=Path,
                        help="a checkpoint of this project or a release best.pkl (default: Weight/<dataset>/best.pkl)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<data set, or input name>)")
    geometry = parser.add_mutually_exclusive_group()
    geometry.add_argument("--resize", type=int, metavar="SIZE",
                          help="resize every image to SIZE x SIZE as the release does (default: the size the weights "
                               "were trained at; 256 for a release best.pkl)")
    geometry.add_argument("--native", action="store_true",
                          help="keep each image's own size: pad to a multiple of 32, tile large frames (this "
                               "project's geometry, not the release's)")
    parser.add_argument("--tile", type=int, default=Geometry.tile,
                        help="with --native: run inputs larger than this (px) tile by tile; 0: never (default: 512)")
    parser.add_argument("--overlap", type=int, default=Geometry.overlap,
                        help="with --native: overlap of neighbouring tiles in px (default: 128)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a pixel is target when sigmoid(T) > THRESHOLD (default: 0.5, i.e. T > 0)")
    parser.add_argument("--json", action="store_true", help="also write the targets as JSON Lines (detections.jsonl)")
    parser.add_argument("--save-masks", action="store_true", help="also write masks/<name>.png, the thresholded map")
    parser.add_argument("--annotate", nargs="?", type=Path, const=True, default=None, metavar="PATH",
                        help="write the input with the targets drawn: a video (.avi, .mp4, .mkv) or a folder of "
                             "PNG frames (default path: <out>/annotated.avi for a video, <out>/annotated/ else)")
    parser.add_argument("--maps", choices=("auto", "on", "off"), default="auto",
                        help="write img/ and mat/ per image or frame; auto: for images, not for a video "
                             "(default: auto)")
    parser.add_argument("--fps", type=float, help="frame rate of a folder of frames: gives rows a frame index and time")
    parser.add_argument("--masks", type=Path,
                        help="ground truth for --visualize (default with --dataset: <data-root>/NAME/test/masks)")
    parser.add_argument("--visualize", action="store_true", help="also write a decomposition panel per image to vis/")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images (of the same size) or tiles per forward pass (default: 1 on the CPU, where "
                             "one at a time keeps the full-resolution layers in the caches and runs fastest; "
                             f"{GPU_BATCH} on a GPU)")
    parser.add_argument("--plain", action="store_true",
                        help="run the model's own forward instead of its deploy form (the same outputs to about "
                             "1e-6, slower; for comparison)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="write over results already in the output folder")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted export in the same output folder: images whose results are "
                             "complete are kept and skipped, the rest are done (needs the maps: img/ and mat/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)
    return parser.parse_args(argv)


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.resolve().name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_opencv()
    return run_script("t_models.py", lambda: export_command(args))


def onnx_command(args: argparse.Namespace) -> int:
    """--onnx PATH: the deploy form as an ONNX model, kept only when it agrees with PyTorch at three sizes."""
    from utils.export.onnx_export import check_shapes, export_onnx, require_onnx
    require_onnx("--onnx")
    if args.weights is None:
        raise ValueError("--onnx needs --weights: the checkpoint or release best.pkl to export")
    if args.native:
        raise ValueError("--onnx takes --resize SIZE (the size it is checked at first), not --native")
    model, info = load_model(args.weights)
    size = trained_geometry(info, args.resize)[0].resize
    shapes = ", ".join(f"{n}x{h}x{w}" for n, h, w in check_shapes(size))
    print(f"exporting {args.weights} (K = {info['config']['stage_num']}, size {size}) to {args.onnx}, outputs "
          f"{args.onnx_outputs}; checking against PyTorch at N x H x W = {shapes}", flush=True)
    report = export_onnx(model, args.onnx, size, outputs=args.onnx_outputs, overwrite=args.overwrite)
    for check in report.checks:
        print(f"  {check.describe()}")
    print(f"wrote {args.onnx}: input image (N, 1, H, W) float32 in [0, 1], H and W multiples of 32")
    return 0


def export_command(args: argparse.Namespace) -> int:
    if args.onnx:
        return onnx_command(args)
    Geometry(args.resize, args.tile, args.overlap)        # flag values first, before any file is read
    runtime = runtime_from_args(args)
    if args.dataset:
        folder, mask_dir = dataset_images(args.data_root, args.dataset)
    else:
        folder, mask_dir = args.input, None
    source = FrameSource(folder, fps=args.fps)
    out = args.out or Path("results") / (args.dataset or _name(args.input))
    annotate = args.annotate
    if annotate is True:
        annotate = out / ("annotated.avi" if source.kind == "video" else "annotated")
    options = ExportOptions(batch_size=args.batch_size or 1, maps={"auto": None, "on": True, "off": False}[args.maps],
                            threshold=args.threshold, json=args.json, save_masks=args.save_masks,
                            visualize=args.visualize, mask_dir=args.masks or mask_dir, annotate=annotate,
                            fps=args.fps, strict=args.strict, overwrite=args.overwrite, resume=args.resume,
                            progress=not args.no_progress)
    check_not_inputs([source.path, options.mask_dir, args.weights], out, options)
    weights = args.weights or default_weights(args.dataset)
    shipped = Path(weights).resolve() == SHIPPED_WEIGHTS
    print(f"weights: {weights}" + (" (the NUAA-SIRST model shipped with this project; --weights FILE runs another)"
                                   if shipped else ""), flush=True)
    model, info = load_model(weights)
    geometry, why = trained_geometry(info, args.resize, args.native, args.tile, args.overlap)
    print(f"geometry: {why}", flush=True)
    device, memory = runtime.setup()
    print(f"model: {info['kind']} layout, K = {info['config']['stage_num']}; backend: {args.backend}; "
          f"device: {'cpu' if args.backend == 'onnxruntime' else device} "
          f"({memory}); {source.kind} {source.path}, {source.frame_count or 'unknown number of'} "
          f"{'frame' if source.kind == 'video' else 'image'}(s); "
          f"{geometry.describe()}; writing to {out}", flush=True)
    batch = args.batch_size or (1 if device.type == "cpu" else GPU_BATCH)     # decided here, once
    checked_at = geometry.resize or trained_geometry(info)[0].resize     # the onnxruntime backend's first check
    if args.backend == "onnxruntime":
        print(f"onnxruntime: exporting the deploy form to ONNX and checking it against PyTorch at {checked_at}x"
              f"{checked_at} and two other sizes first", flush=True)
    net = prepare_backend(model, args.backend, device, training_size=checked_at, bf16=runtime.bf16,
                          compile=runtime.compile, plain=args.plain, sub_batch=batch)
    options = replace(options, batch_size=batch)
    summary = export(net, source, out, geometry, options)
    unit = "frame(s)" if source.kind == "video" else "image(s)"
    kept = f" (and kept the {summary.kept} an earlier export had finished)" if summary.kept else ""
    print(f"wrote {summary.written} {unit}{kept} to {out} in {summary.seconds:.1f} s "
          f"({summary.per_second:.2f} {unit[:-3]}/s); "
          f"{summary.detections} target(s) in " + ", ".join(str(p) for p in summary.files)
          + (f"; {summary.panels} panel(s) in {out / 'vis'}" if args.visualize else ""))
    if summary.unread:
        print(f"t_models.py: error: {summary.unread} {unit} could not be read and were skipped (the first listed above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
