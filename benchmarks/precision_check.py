"""What the inference paths change in the scores: the folded float32 module and bf16 against the model itself.

    python benchmarks/precision_check.py --weights Weight/NUAA-SIRST/best.pkl --dataset NUAA-SIRST --resize 256

Every test image of <data-root>/<dataset>/test is predicted three times with the same weights: the model's own
float32 forward (``prepare_model(plain=True)``), the deploy form (``prepare_model()``, what t_models.py and
validation run by default) and its bfloat16 variant (``--bf16``). The table gives each path's scores under both
protocols and, per path, the largest |T - T_model| over the set relative to the largest |T_model|, and the
largest |T - T_model| among the pixels with |T_model| < 2, where a change could move a pixel across the
threshold. It is also written as JSON (default benchmarks/out/precision_check.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import load_model  # noqa: E402
from utils.export.writer import ExportError, dataset_images, find_mask  # noqa: E402
from utils.io.images import list_images, read_image, read_mask  # noqa: E402
from utils.export.predict import Geometry, predict, prepare_model  # noqa: E402
from utils.score.metrics import Evaluator  # noqa: E402
from utils.score.protocols import PRESETS  # noqa: E402

PATHS = {"model fp32": dict(plain=True), "deploy fp32": dict(), "deploy bf16": dict(bf16=True)}
SHOWN = ("mIoU", "nIoU", "F1", "Pd", "Fa")
NEAR = 2.0      # logits |T| < NEAR (sigmoid between 0.12 and 0.88): where a change can flip a pixel


def run(args: argparse.Namespace) -> dict:
    folder, mask_dir = dataset_images(args.data_root, args.dataset)
    files = list_images(folder)
    model, info = load_model(args.weights)
    images = []
    for f in files:
        mask = find_mask(mask_dir, f.stem)
        if mask is None:
            raise ExportError(f"{f}: no mask named {f.stem}.* in {mask_dir}; every test image needs its mask")
        images.append((f.stem, read_image(f), read_mask(mask)))
    geometry = Geometry(resize=args.resize, tile=0)
    logits: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, options in PATHS.items():
        net = prepare_model(model, "cpu", **options)
        start = time.perf_counter()
        logits[name] = [predict(net, image, geometry).T for _, image, _ in images]
        seconds[name] = time.perf_counter() - start
    reference = logits["model fp32"]
    scale = max(float(np.abs(t).max()) for t in reference)
    result = {"weights": str(args.weights), "stage_num": info["config"]["stage_num"], "dataset": args.dataset,
              "images": len(images), "resize": args.resize, "max_abs_T": scale, "paths": {}}
    for name, maps in logits.items():
        scores = {}
        for protocol in ("standard", "paper"):
            evaluator = Evaluator(PRESETS[protocol])
            for (stem, _, mask), t in zip(images, maps):
                evaluator.update(t, mask, name=stem)
            scores[protocol] = evaluator.compute()
        worst = max(float(np.abs(t - r).max()) for t, r in zip(maps, reference))
        near = max(float(np.abs(t - r)[np.abs(r) < NEAR].max(initial=0.0)) for t, r in zip(maps, reference))
        result["paths"][name] = {"scores": scores, "max_dT_rel": worst / scale, "max_dT_near_0": near,
                                 "seconds": seconds[name]}
    return result


def print_table(result: dict) -> None:
    print(f"{result['dataset']}: {result['images']} test images, resize {result['resize'] or 'none (native)'}, "
          f"K = {result['stage_num']}, weights {result['weights']}, max |T| {result['max_abs_T']:.1f}")
    base = result["paths"]["model fp32"]["scores"]
    print(f"{'path':>11} {'protocol':>9} " + " ".join(f"{k:>8}" for k in SHOWN)
          + f" {'dmIoU pts':>10} {'max|dT|/max|T|':>15} {'|dT| |T|<2':>11} {'s':>6}")
    for name, entry in result["paths"].items():
        for protocol, scores in entry["scores"].items():
            values = " ".join(f"{scores[k] * 1e6:8.3f}" if k == "Fa" else f"{scores[k] * 100:8.3f}" for k in SHOWN)
            delta = (scores["mIoU"] - base[protocol]["mIoU"]) * 100
            print(f"{name:>11} {protocol:>9} {values} {delta:+10.3f} {entry['max_dT_rel']:15.2e} "
                  f"{entry['max_dT_near_0']:11.2e} {entry['seconds']:6.1f}")
    print(f"(mIoU, nIoU, F1, Pd in %; Fa x 1e-6; max|dT|/max|T| over the set, and max |dT| where |T| < {NEAR:g}, "
          "the logits a change could flip)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True,
                        help="a checkpoint of this project or a release best.pkl")
    parser.add_argument("--dataset", required=True, help="data set folder under --data-root")
    parser.add_argument("--data-root", type=Path, default=Path("datasets"))
    parser.add_argument("--resize", type=int, default=256, help="network input size (0: native size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/precision_check.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.resize = args.resize or None
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
