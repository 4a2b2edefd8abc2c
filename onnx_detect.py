"""Detect small targets with a DCONet ONNX model, without PyTorch: T maps and a table of targets from frames.

    python onnx_detect.py --model dconet.onnx --input frames/          # results/frames/{img,mat}/, detections.csv
    python onnx_detect.py --model dconet.onnx --input flight.mp4 --annotate

The model is a file that ``python t_models.py --weights best.pkl --onnx dconet.onnx`` wrote (and checked against
PyTorch); its metadata gives the size its weights were trained at, which is the default geometry as in
t_models.py, and the threshold. Frames are read, run and written as t_models.py reads, runs and writes them (the
same code): img/<name>.png, mat/<name>.mat (T; B and D too from a graph with those outputs) and detections.csv,
equal to t_models.py's with --onnx-model and to its PyTorch backend's up to float rounding. Needs numpy, OpenCV,
SciPy and ONNX Runtime, not PyTorch. Exit status: 0 when every image or frame was written, 1 when some could not
be read, 2 on a user error (the message says what to fix), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import run_script
from utils.export.maps import Geometry, chosen_geometry
from utils.export.onnx_runtime import OnnxRuntimeNet
from utils.export.outputs import add_output_arguments, check_not_inputs, export_options, input_name
from utils.export.writer import export
from utils.io.images import quiet_opencv
from utils.io.video import FrameSource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an ONNX model written by t_models.py --onnx")
    parser.add_argument("--input", type=Path, required=True,
                        help="an image, a folder of images or frames, or a video file")
    add_output_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="images of the same size per run (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime's threads (default: its own choice)")
    return parser.parse_args(argv)


def detect_command(args: argparse.Namespace) -> int:
    Geometry(args.resize, args.tile, args.overlap)        # flag values first, before any file is read
    source = FrameSource(args.input, fps=args.fps)
    out = args.out or Path("results") / input_name(args.input)
    video = source.kind == "video"
    net = OnnxRuntimeNet.from_file(args.model, threads=args.threads)
    threshold = net.threshold if args.threshold is None else args.threshold
    options = export_options(args, video, out, threshold, batch_size=args.batch_size, progress=False)
    check_not_inputs([source.path, args.model], out, options)
    geometry, why = chosen_geometry(net.training_size, "the size this ONNX model's weights were trained at",
                                    args.resize, args.native, args.tile, args.overlap)
    print(f"model: {net.describe()}", flush=True)
    print(f"geometry: {why}; {source.kind} {source.path}, "
          f"{source.frame_count or 'unknown number of'} {'frame' if video else 'image'}(s); writing to {out}",
          flush=True)
    summary = export(net, source, out, geometry, options)
    return summary.report("onnx_detect.py", video, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_opencv()
    return run_script("onnx_detect.py", lambda: detect_command(args))


if __name__ == "__main__":
    sys.exit(main())
