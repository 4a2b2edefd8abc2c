"""Export DCONet predictions and targets: results/<name>/{img,mat}/<name>.{png,mat} and detections.csv.

    python t_models.py --dataset NUDT-SIRST                     # Weight/NUDT-SIRST/best.pkl on its test split
    python t_models.py --dataset IRSTD-1k --weights best.pkl    # a release best.pkl: 256x256, as the release
    python t_models.py --input flight.mp4 --weights best.pkl --annotate   # a video: table + annotated video
    python t_models.py --input frames/ --weights best.pkl --visualize     # a folder of images or frames
    python t_models.py --weights best.pkl --onnx dconet.onnx              # an ONNX model, checked (docs/export.md)
    python t_models.py --dataset IRSTD-1k --backend onnxruntime           # exported and checked, run in ONNX Runtime
    python t_models.py --input frames/ --onnx-model dconet.onnx           # a saved ONNX model, as it is

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
    import torch
    from model import load_model
    from utils.export.maps import Geometry, chosen_geometry, trained_geometry, training_size
    from utils.export.onnx_runtime import (BACKENDS, DEFAULT_THRESHOLD, OnnxRuntimeNet, onnxruntime_device,
                                           prepare_backend)
    from utils.export.outputs import add_output_arguments, check_not_inputs, export_options, input_name
    from utils.export.writer import SHIPPED_WEIGHTS, dataset_images, default_weights, export
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
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="run the network in PyTorch or in ONNX Runtime on the CPU: exported to ONNX and checked "
                             "at start, or the --onnx-model file (needs onnx, onnxscript and onnxruntime; default: "
                             "onnxruntime with --onnx-model, else pytorch)")
    parser.add_argument("--onnx-model", type=Path, metavar="FILE",
                        help="run this ONNX model (written by --onnx, checked then) in ONNX Runtime as it is, "
                             "without exporting again; its metadata gives the training size and the threshold")
    parser.add_argument("--data-root", type=Path, default=Path("datasets"),
                        help="folder holding the data sets (default: datasets)")
    parser.add_argument("--weights", type=Path,
                        help="a checkpoint of this project or a release best.pkl (default: Weight/<dataset>/best.pkl)")
    add_output_arguments(parser)
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)
    return parser.parse_args(argv)


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
    size = args.resize or training_size(info)[0]
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"--threshold is a probability in [0, 1), got {threshold}")
    shapes = ", ".join(f"{n}x{h}x{w}" for n, h, w in check_shapes(size))
    print(f"exporting {args.weights} (K = {info['config']['stage_num']}, size {size}) to {args.onnx}, outputs "
          f"{args.onnx_outputs}; checking against PyTorch at N x H x W = {shapes}", flush=True)
    report = export_onnx(model, args.onnx, size, outputs=args.onnx_outputs, overwrite=args.overwrite,
                         threshold=threshold)
    for check in report.checks:
        print(f"  {check.describe()}")
    print(f"wrote {args.onnx}: input image (N, 1, H, W) float32 in [0, 1], H and W multiples of 32; its metadata "
          f"holds the size to run at ({size}) and the threshold ({threshold:g}): run it with --onnx-model "
          f"{args.onnx} here, or with onnx_detect.py where PyTorch is not installed")
    return 0


def saved_onnx_model(args: argparse.Namespace) -> tuple[OnnxRuntimeNet, Geometry, str]:
    """--onnx-model FILE: the saved graph in an ONNX Runtime session, the geometry to run it at and why."""
    if args.weights is not None:
        raise ValueError(f"--onnx-model runs {args.onnx_model} as it is (made from its weights when it was "
                         f"written); drop --weights, or drop --onnx-model to run the weights")
    if args.plain or args.bf16 or args.compile:
        raise ValueError("--onnx-model runs the float32 deploy form as ONNX Runtime does: drop --plain, --bf16 and "
                         "--compile, or run the weights with the pytorch backend")
    net = OnnxRuntimeNet.from_file(args.onnx_model, threads=torch.get_num_threads())
    if args.visualize and net.outputs == ["T"]:
        raise ValueError(f"{args.onnx_model} gives T alone; --visualize shows B, T and D: write the graph with "
                         f"--onnx-outputs BTD, or leave out --visualize")
    geometry, why = chosen_geometry(net.training_size, "the size this ONNX model's weights were trained at",
                                    args.resize, args.native, args.tile, args.overlap)
    print(f"weights: {net.describe()}", flush=True)
    return net, geometry, why


def export_command(args: argparse.Namespace) -> int:
    if args.onnx:
        return onnx_command(args)
    Geometry(args.resize, args.tile, args.overlap)        # flag values first, before any file is read
    backend = args.backend or ("onnxruntime" if args.onnx_model else "pytorch")
    if args.onnx_model and backend != "onnxruntime":
        raise ValueError("--onnx-model runs in ONNX Runtime: drop --backend pytorch, or drop --onnx-model")
    runtime = runtime_from_args(args)
    if backend == "onnxruntime":
        runtime = replace(runtime, device=onnxruntime_device(runtime.device))     # auto means the CPU there
    if args.dataset:
        folder, mask_dir = dataset_images(args.data_root, args.dataset)
    else:
        folder, mask_dir = args.input, None
    source = FrameSource(folder, fps=args.fps)
    out = args.out or Path("results") / (args.dataset or input_name(args.input))
    check_not_inputs([source.path, args.masks or mask_dir, args.weights, args.onnx_model], out,
                     export_options(args, source.kind == "video", out, DEFAULT_THRESHOLD))
    if args.onnx_model:
        net, geometry, why = saved_onnx_model(args)
        threshold = net.threshold if args.threshold is None else args.threshold
    else:
        weights = args.weights or default_weights(args.dataset)
        shipped = Path(weights).resolve() == SHIPPED_WEIGHTS
        print(f"weights: {weights}" + (" (the NUAA-SIRST model shipped with this project; --weights FILE runs "
                                       "another)" if shipped else ""), flush=True)
        model, info = load_model(weights)
        geometry, why = trained_geometry(info, args.resize, args.native, args.tile, args.overlap)
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    print(f"geometry: {why}", flush=True)
    device, memory = runtime.setup()
    batch = args.batch_size or (1 if device.type == "cpu" else GPU_BATCH)     # decided here, once
    options = export_options(args, source.kind == "video", out, threshold, batch_size=batch,
                             visualize=args.visualize, mask_dir=args.masks or mask_dir, progress=not args.no_progress)
    layout = "ONNX" if args.onnx_model else f"{info['kind']} layout, K = {info['config']['stage_num']}"
    print(f"model: {layout}; backend: {backend}; device: {device} ({memory}); {source.kind} {source.path}, "
          f"{source.frame_count or 'unknown number of'} {'frame' if source.kind == 'video' else 'image'}(s); "
          f"{geometry.describe()}; writing to {out}", flush=True)
    if not args.onnx_model:
        checked_at = geometry.resize or trained_geometry(info)[0].resize     # the onnxruntime backend's first check
        if backend == "onnxruntime":
            print(f"onnxruntime: exporting the deploy form to ONNX and checking it against PyTorch at {checked_at}x"
                  f"{checked_at} and two other sizes first (--onnx FILE once, then --onnx-model FILE, skips "
                  f"this)", flush=True)
        net = prepare_backend(model, backend, device, training_size=checked_at, bf16=runtime.bf16,
                              compile=runtime.compile, plain=args.plain, sub_batch=batch)
    summary = export(net, source, out, geometry, options)
    return summary.report("t_models.py", source.kind == "video", out)


if __name__ == "__main__":
    sys.exit(main())
