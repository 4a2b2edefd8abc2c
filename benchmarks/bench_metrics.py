"""Time utils.score.metrics.Evaluator on seeded synthetic sets, both protocols.

    python benchmarks/bench_metrics.py                      # 1,000 images of 256x256 and 200 of 512x512
    python benchmarks/bench_metrics.py --sets 100x256       # any list of <images>x<side>

Each synthetic image has 0-3 small targets (discs of radius 1-4 px) and logits that are low noise
around -6, with Gaussian blobs over most targets (some shifted, some missing) and a few false-alarm blobs.
Only the Evaluator calls are timed, not the generation of the maps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.score.metrics import Evaluator  # noqa: E402
from utils.score.protocols import PRESETS  # noqa: E402


def synthetic_pair(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One (logits (side, side) float32, mask (side, side) bool) pair."""
    rows, cols = np.ogrid[:side, :side]
    mask = np.zeros((side, side), dtype=bool)
    logits = (-6.0 + rng.normal(0.0, 1.0, (side, side))).astype(np.float32)
    blobs = []
    for _ in range(rng.integers(0, 4)):
        r, c, radius = rng.uniform(8, side - 8), rng.uniform(8, side - 8), rng.uniform(1, 4)
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2
        if rng.random() < 0.8:  # detected, possibly off-centre
            blobs.append((r + rng.normal(0, 1.5), c + rng.normal(0, 1.5), radius))
    for _ in range(rng.integers(0, 3)):  # false alarms
        blobs.append((rng.uniform(0, side), rng.uniform(0, side), rng.uniform(1, 3)))
    for r, c, radius in blobs:
        logits += (12.0 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * radius ** 2))).astype(np.float32)
    return logits, mask


def bench(images: int, side: int, seed: int = 0) -> dict[str, float]:
    """Seconds spent in Evaluator.update + compute per protocol for one synthetic set."""
    rng = np.random.default_rng(seed)
    evaluators = {name: Evaluator(config) for name, config in PRESETS.items()}
    seconds = dict.fromkeys(evaluators, 0.0)
    for i in range(images):
        logits, mask = synthetic_pair(rng, side)
        for name, evaluator in evaluators.items():
            start = time.perf_counter()
            evaluator.update(logits, mask, f"{i:06d}")
            seconds[name] += time.perf_counter() - start
    for name, evaluator in evaluators.items():
        start = time.perf_counter()
        scores = evaluator.compute()
        seconds[name] += time.perf_counter() - start
        print(f"  {name:>8}: {seconds[name]:6.2f} s  "
              + "  ".join(f"{key} {value:.4g}" for key, value in scores.items()))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["1000x256", "200x512"], help="<images>x<side> per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for spec in args.sets:
        images, side = (int(part) for part in spec.split("x"))
        print(f"{images} images of {side}x{side}:")
        seconds = bench(images, side, args.seed)
        print(f"  both protocols: {sum(seconds.values()):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
