"""Where the time goes: one configuration of bench_model.py, profiled by operator with torch.profiler.

    python benchmarks/profile_model.py --kind infer --variant deploy --batch 8
    python benchmarks/profile_model.py --kind train --variant cl-ckpt --batch 8 --rows 30
    python benchmarks/profile_model.py --counts > /tmp/ops_a.txt    # in the other checkout: > /tmp/ops_b.txt; then diff

Prints the operators sorted by their own time, grouped by input shape, for one call after two warm-up calls.
With --counts it prints instead how many times each operator ran, sorted by name and without times: the same
list from two versions of the code means they do the same work, which timings on a busy machine cannot show
to a few percent.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import INFER_VARIANTS, TRAIN_VARIANTS, _build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("infer", "train"), default="infer")
    parser.add_argument("--variant", default="deploy",
                        help=f"infer: {', '.join(INFER_VARIANTS)}; train: {', '.join(TRAIN_VARIANTS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--counts", action="store_true",
                        help="print each operator's number of calls, by name, and no times (to diff two versions)")
    args = parser.parse_args()
    known = INFER_VARIANTS if args.kind == "infer" else TRAIN_VARIANTS
    if args.variant not in known:
        parser.error(f"--variant for {args.kind}: one of {', '.join(known)}")

    import torch
    from torch.profiler import ProfilerActivity, profile
    if args.threads:
        torch.set_num_threads(args.threads)
    case = dict(kind=args.kind, variant=args.variant, batch=args.batch, size=args.size, stages=args.stages,
                device=args.device)
    run = _build(case)
    run()
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run()
        if args.device == "cuda":
            torch.cuda.synchronize()
    if args.counts:
        counts = {event.key: event.count for event in prof.key_averages()}
        for name in sorted(counts):
            print(f"{name} {counts[name]}")
        print(f"total {sum(counts.values())} calls of {len(counts)} operators")
        return
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.rows,
                                                             max_name_column_width=36, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
