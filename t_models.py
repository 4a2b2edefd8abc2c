"""Export DCONet predictions: results/<name>/img/<stem>.png, mat/<stem>.mat and, with --visualize, vis/<stem>.png.

    python t_models.py --dataset NUDT-SIRST                      # Weight/NUDT-SIRST/best.pkl on its test split
    python t_models.py --dataset IRSTD-1k --weights best.pkl     # a release best.pkl: 256x256, as the release
    python t_models.py --input frames/ --weights best.pkl --out results/frames --visualize

By default every image is resized as the release does (8-bit INTER_LINEAR, then / 255) to the size the weights
were trained at: a checkpoint of this project says its size, a release best.pkl means 256x256. ``--resize S``
picks another size; ``--native`` keeps each image's own size (this project's: padded to a multiple of 32 by
reflection, cropped back, frames larger than ``--tile`` run tile by tile). The first line printed says which
geometry runs and why. Exit status: 0 on success, 2 on a user error (the message says what to fix).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import CheckpointError, load_model
from utils.cpu_memory import MODES, configure_cpu_malloc
from utils.inference import (ExportError, Geometry, check_output, dataset_images, default_weights, export,
                             input_images, prepare_model, resolve_device, trained_geometry)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="data set name: reads <data-root>/NAME/test/images")
    source.add_argument("--input", type=Path, help="an image file or a folder of images, instead of --dataset")
    parser.add_argument("--data-root", type=Path, default=Path("datasets"), help="folder holding the data sets")
    parser.add_argument("--weights", type=Path,
                        help="a checkpoint of this project or a release best.pkl (default: Weight/<dataset>/best.pkl)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<dataset or input folder name>)")
    parser.add_argument("--masks", type=Path,
                        help="masks for --visualize with --input (default with --dataset: <data-root>/NAME/test/masks)")
    geometry = parser.add_mutually_exclusive_group()
    geometry.add_argument("--resize", type=int, default=None, metavar="SIZE",
                          help="resize every image to SIZE x SIZE as the release does (default: the size the weights "
                               "were trained at; 256 for a release best.pkl)")
    geometry.add_argument("--native", action="store_true",
                          help="keep each image's own size: pad to a multiple of 32, tile large frames (this "
                               "project's, not the release's geometry)")
    parser.add_argument("--tile", type=int, default=Geometry.tile,
                        help="with --native: run inputs larger than this (px) tile by tile; 0: never")
    parser.add_argument("--overlap", type=int, default=Geometry.overlap, help="overlap of neighbouring tiles (px)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4, help="images (of the same size) or tiles per forward")
    parser.add_argument("--bf16", action="store_true",
                        help="BSGU and reconstruction in bfloat16: faster on CPUs with AVX512-BF16; T within "
                             "2%% of max |T| of float32 (with --plain: the whole forward under autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (compiling takes minutes)")
    parser.add_argument("--plain", action="store_true",
                        help="run the model's own forward instead of the folded inference module (same outputs to "
                             "about 1e-6, slower; for comparison)")
    parser.add_argument("--cpu-malloc", default="auto", choices=MODES,
                        help="CPU memory (glibc): keep freed memory for reuse instead of returning large blocks to "
                             "the system (auto: keep when running on the CPU); system: the C library's defaults")
    parser.add_argument("--visualize", action="store_true", help="also write a decomposition panel per image to vis/")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that holds results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def _folder_name(path: Path) -> str:
    return (path if path.is_dir() else path.parent).resolve().name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        Geometry(args.resize, args.tile, args.overlap)      # flag values first, before any file is read
        device = resolve_device(args.device)
        if args.dataset:
            files, mask_dir = dataset_images(args.data_root, args.dataset)
        else:
            files = input_images(args.input)
            mask_dir = None
        mask_dir = args.masks or mask_dir
        weights = args.weights or default_weights(args.dataset)
        model, info = load_model(weights)
        geometry, why = trained_geometry(info, args.resize, args.native, args.tile, args.overlap)
        print(f"geometry: {why}", flush=True)
        print("t_models.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), flush=True)
        malloc = configure_cpu_malloc(args.cpu_malloc, device.type)
        out = args.out or Path("results") / (args.dataset or _folder_name(args.input))
        check_output(out, args.overwrite)
    except ValueError as error:     # ExportError, CheckpointError, a flag value the message explains
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"weights: {weights} ({info['kind']} layout, K = {info['config']['stage_num']}); device: {device}; "
          f"{len(files)} image(s), {geometry.describe()}; {malloc}; writing to {out}", flush=True)
    net = prepare_model(model, device, bf16=args.bf16, compile=args.compile, fast=not args.plain)
    try:
        summary = export(net, files, out, geometry, batch_size=args.batch_size, strict=args.strict,
                         visualize=args.visualize, mask_dir=mask_dir, progress=not args.no_progress)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.written} prediction(s) to {out}/img and {out}/mat"
          + (f", {summary.panels} panel(s) to {out}/vis" if args.visualize else "")
          + f" in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable image(s), listed above", file=sys.stderr)
    if not summary.written:
        print("error: no image could be read", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
