"""Held-out scores of trained weights, through the export path: the measures by which a shipped model is chosen.

    python benchmarks/heldout_scores.py --weights runs/native_s1/best.pkl Weight/NUAA-SIRST/best.pkl \
        --data-root ../shared/data --seed 1 --negatives ../shared/data/SIRST-V2-backgrounds --json out.json

For each weights file, at its default export geometry (``t_models.py``'s) unless --geometry says otherwise:
- targets: the standard protocol's mIoU, nIoU, Pd and Fa on the NUAA-SIRST trainval frames that ``--val-split``
  and ``--seed`` hold out (``run_0.py``'s split), and on the part of them that ``--subset-split`` would hold out
  (a smaller split of the same seed is contained in a larger one: frames that a run with that split never saw);
- clutter: false targets per frame (8-connected components of sigmoid(T) > 0.5, each a false alarm) and the
  fraction of frames with any, on the background frames that ``--negative-val-split`` and ``--seed`` hold out
  (``run_0.py --negatives``' split, by whole groups).
Never reads the test split. docs/training.md states the rule these numbers feed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import load_model                                                      # noqa: E402
from utils.data.negatives import find_negatives, split_negatives                   # noqa: E402
from utils.data.splits import locate_split, split_train_val                       # noqa: E402
from utils.export.predict import Geometry, iter_predictions, prepare_model, trained_geometry   # noqa: E402
from utils.io.images import read_image, read_mask                                 # noqa: E402
from utils.score.components import components                                     # noqa: E402
from utils.score.metrics import Evaluator                                         # noqa: E402
from utils.score.protocols import PRESETS                                         # noqa: E402
from utils.train.engine import false_target_rates                                 # noqa: E402


def held_out_pairs(data_root: Path, dataset: str, fraction: float, seed: int):
    return split_train_val(locate_split(data_root, dataset, "trainval"), fraction, seed)[1].pairs


def target_scores(net, geometry: Geometry, pairs) -> dict[str, float]:
    images = {p.stem: p for p in pairs}
    evaluator = Evaluator(PRESETS["standard"])
    for prediction in iter_predictions(net, ((s, read_image(p.image)) for s, p in images.items()), geometry):
        evaluator.update(prediction.T, read_mask(images[prediction.name].mask), name=prediction.name)
    scores = evaluator.compute()
    return {k: scores[k] for k in ("mIoU", "nIoU", "Pd", "Fa")} | {"frames": len(pairs)}


def clutter_scores(net, geometry: Geometry, paths) -> dict[str, float]:
    counts = [components(prediction.T > 0).n for prediction in
              iter_predictions(net, ((p.stem, read_image(p)) for p in paths), geometry)]
    return false_target_rates(counts) | {"frames": len(counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, nargs="+", required=True)
    parser.add_argument("--data-root", type=Path, default=Path("datasets"))
    parser.add_argument("--dataset", default="NUAA-SIRST")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--subset-split", type=float, default=0.1)
    parser.add_argument("--negatives", type=Path, required=True)
    parser.add_argument("--negative-val-split", type=float, default=0.2)
    parser.add_argument("--geometry", choices=("default", "native", "resize"), default="default",
                        help="default (the same as resize): resized to each weights file's training size, "
                             "t_models.py's default; native: each frame at its own size, tiled as t_models.py's "
                             "--native")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    pairs = held_out_pairs(args.data_root, args.dataset, args.val_split, args.seed)
    subset = {p.stem for p in held_out_pairs(args.data_root, args.dataset, args.subset_split, args.seed)}
    _, clutter = split_negatives(find_negatives(args.negatives), args.negative_val_split, args.seed)
    print(f"seed {args.seed}: {len(pairs)} held-out target frames ({len(subset)} in the {args.subset_split} split), "
          f"{len(clutter)} held-out background frames ({', '.join(clutter.groups())})")
    results = []
    for weights in args.weights:
        model, info = load_model(weights)
        geometry, why = trained_geometry(info, native=args.geometry == "native")
        net = prepare_model(model, "cpu")
        row = {"weights": str(weights), "geometry": geometry.describe(), "why": why,
               "targets": target_scores(net, geometry, pairs),
               "targets_subset": target_scores(net, geometry, [p for p in pairs if p.stem in subset]),
               "clutter": clutter_scores(net, geometry, clutter.paths)}
        results.append(row)
        t, s, c = row["targets"], row["targets_subset"], row["clutter"]
        print(f"{weights} ({row['geometry']}): held-out mIoU {t['mIoU']:.4f} nIoU {t['nIoU']:.4f} Pd {t['Pd']:.4f} "
              f"Fa {t['Fa'] * 1e6:.2f}e-6; subset mIoU {s['mIoU']:.4f} Pd {s['Pd']:.4f}; clutter FT/frame "
              f"{c['FT/frame']:.3f} ({c['FT-frames']:.0%} of frames)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "clutter_groups": clutter.groups(), "runs": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
