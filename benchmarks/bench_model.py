"""Speed and memory of DCONet: inference and training steps, plain and optimised, next to the release.

    python benchmarks/bench_model.py            # full table (about 45 minutes on 2 CPU cores)
    python benchmarks/bench_model.py --quick    # the headline rows only (a few minutes)

Every configuration runs in a fresh subprocess, so that peak memory (RSS on the CPU, max allocated on CUDA)
belongs to that configuration alone. Each child times its work (warm-up, then the minimum of several calls)
and, in the same process, a yardstick: a 1024x1024 float32 matrix product (3 warm-ups, then the minimum of
10), before and after. ``units`` = time / yardstick compares runs on a busy or a different machine.
See benchmarks/README.md for the columns.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "bench_model.json"

# The release (tustAilab/DCONet) on this machine type: 2-core AMD EPYC Zen 4, PyTorch 2.14, 2 threads,
# 256x256, K = 5. Inference units are measured; training units are its seconds over the 11.2 ms yardstick
# that the inference rows imply (0.44 s / 40, 9.5 s / 830).
RELEASE = {
    ("infer", 1): {"time": 0.44, "units": 40.0, "peak_gb": 0.8},
    ("infer", 8): {"time": 9.5, "units": 830.0, "peak_gb": 1.4},
    ("train", 2): {"time": 3.0, "units": 3.0 / 0.0112, "peak_gb": 5.0},
    ("train", 8): {"time": 35.0, "units": 35.0 / 0.0112, "peak_gb": 12.1},
}
# The release's work per 256x256 image at K = 5 (torch.utils.flop_counter): forward; forward plus backward.
RELEASE_GFLOP = {"infer": 49.36, "train": 170.85}
# Per stage, counted the same way on the release's formulation: stage 1, and each later stage (conv_c added).
STAGE_GFLOP = {"infer": (8.860, 10.068), "train": (31.169, 34.895)}

# Every variant but "paper" runs the model with its speed kernels on (DCONet.use_kernels(True), as run_0.py
# trains); "paper" runs the forward as the paper's equations read, to show what the kernels save.
INFER_VARIANTS = {
    "paper": "DCONet.eval() under no_grad, float32, NCHW, speed kernels off",
    "plain": "DCONet.eval().use_kernels(True) under no_grad, float32, NCHW",
    "plain-cl": "DCONet.set_channels_last(True)",
    "plain-bf16": "DCONet under torch.autocast(bfloat16)",
    "deploy": "deploy(model): folded, channels_last, one image at a time on CPU",
    "deploy-nchw": "deploy(model, channels_last=False)",
    "deploy-batch": "deploy(model, sub_batch=<whole batch>)",
    "deploy-bf16": "deploy(model, bf16=True)",
    "deploy-compile": "deploy(model, compile=True)",
    "deploy-bf16-compile": "deploy(model, bf16=True, compile=True)",
}
# Training rows take one step as run_0.py does: the trainer's model, optimizer and loss scaler
# (utils.train.engine.training_parts: fused Adam on CUDA) through train_one_epoch (SoftIoU + 0.1 MSE), with the
# run_0.py settings named here.
TRAIN_VARIANTS = {
    "paper": "--kernels plain: the paper's forward, float32, NCHW",
    "plain": "run_0.py's defaults: --kernels fast, float32, NCHW",
    "cl": "--memory-format channels_last",
    "ckpt": "--checkpointing",
    "cl-ckpt": "--memory-format channels_last --checkpointing",
    "cl-bf16": "--memory-format channels_last --bf16 (torch.autocast(bfloat16))",
}


def work_gflop(kind: str, batch: int, size: int, stages: int) -> float:
    """The release's work for one call, scaled from its 256x256, K = 5 count (linear in pixels)."""
    first, later = STAGE_GFLOP[kind]
    per_image = RELEASE_GFLOP[kind] * (first + later * (stages - 1)) / (first + later * 4)
    return per_image * batch * size * size / 256 ** 2


def plan(quick: bool, devices: list[str]) -> list[dict]:
    """The configurations to run, in order."""
    cases: list[dict] = []

    def add(device, kind, variant, batch, size=256, stages=5, reps=None, group="main"):
        if reps is None:
            reps = 3 if batch * size * size * stages <= 8 * 256 ** 2 * 5 else 2
            if quick:
                reps = max(2, reps - 1)
        cases.append(dict(device=device, kind=kind, variant=variant, batch=batch, size=size, stages=stages,
                          reps=reps, group=group))

    for device in devices:
        if quick:
            for batch in (1, 8):
                for variant in ("plain", "deploy", "deploy-bf16"):
                    add(device, "infer", variant, batch)
            for variant in ("plain", "cl", "cl-ckpt"):
                add(device, "train", variant, 2)
            add(device, "train", "cl-ckpt", 8, reps=1)
            add(device, "infer", "deploy", 1, size=512, group="size")
            add(device, "infer", "deploy", 1, stages=1, group="stages")
            continue
        for batch in (1, 8):
            for variant in INFER_VARIANTS:
                if "compile" not in variant or batch == 8:     # compiling takes minutes per configuration
                    add(device, "infer", variant, batch)
        for batch in (2, 8):
            for variant in TRAIN_VARIANTS:
                if variant != "paper" or batch == 2:
                    add(device, "train", variant, batch, reps=2 if batch == 8 else None)
        for size in (256, 512, 1024):
            for variant in ("plain", "deploy", "deploy-bf16"):
                add(device, "infer", variant, 1, size=size, group="size")
            for variant in ("plain", "cl-ckpt") if size < 1024 else ("cl-ckpt",):   # plain at 1024: > 24 GB
                add(device, "train", variant, 1, size=size, group="size", reps=2)
        for stages in range(1, 8):
            add(device, "infer", "deploy", 1, stages=stages, group="stages")
            if stages % 2:
                add(device, "train", "cl-ckpt", 1, stages=stages, group="stages", reps=2)
    return cases


# ----------------------------------------------------------------------------------------------------------
# Child: one configuration
# ----------------------------------------------------------------------------------------------------------

def _yardstick() -> float:
    """Minimum time of a 1024x1024 float32 matrix product on the CPU (3 warm-ups, then the minimum of 10)."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def _build(case: dict):
    """A callable that runs one call (an inference, or a training step)."""
    import torch

    sys.path.insert(0, str(REPO))
    from model import DCONet, DCONetConfig
    from model import deploy

    device = torch.device(case["device"])
    torch.manual_seed(0)
    if case["kind"] == "train":
        return _build_training_step(case, device)
    model = DCONet(DCONetConfig(stage_num=case["stages"])).to(device).use_kernels(case["variant"] != "paper")
    x = torch.rand(case["batch"], 1, case["size"], case["size"], device=device)
    variant = case["variant"]
    bf16 = "bf16" in variant
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not variant.startswith("deploy"))
    model.eval()
    if variant == "plain-cl":
        model.set_channels_last(True)
    if variant.startswith("deploy"):
        net = deploy(model, bf16=bf16, channels_last=variant != "deploy-nchw", compile="compile" in variant,
                     sub_batch=case["batch"] if variant == "deploy-batch" else None)
    else:
        net = model

    def run():
        with torch.no_grad(), autocast:
            return net(x)
    return run


def _build_training_step(case: dict, device):
    """One training step as run_0.py takes it with the variant's settings (``TRAIN_VARIANTS``)."""
    import torch
    from model import DCONetConfig
    from utils.io.runtime import RuntimeOptions
    from utils.train.config import TrainConfig
    from utils.train.engine import autocast_context, train_one_epoch, training_parts
    from utils.train.schedule import poly_scheduler

    variant = case["variant"]
    config = TrainConfig(model=DCONetConfig(stage_num=case["stages"]),
                         kernels="plain" if variant == "paper" else "fast",
                         memory_format="channels_last" if variant.startswith("cl") else "contiguous",
                         checkpointing="ckpt" in variant,
                         runtime=RuntimeOptions(device=case["device"], bf16="bf16" in variant))
    model, optimizer, scaler = training_parts(config, device)
    scheduler = poly_scheduler(optimizer, 10 ** 6, config.poly_power)
    x = torch.rand(case["batch"], 1, case["size"], case["size"], device=device)
    batch = [{"image": x, "mask": (torch.rand_like(x) > 0.995).float()}]

    def run():
        return train_one_epoch(model, batch, optimizer, scheduler, device=device, scaler=scaler,
                               autocast=lambda: autocast_context(device, config.runtime.bf16, config.amp,
                                                                 config.amp_dtype))
    return run


def child(case: dict) -> dict:
    sys.path.insert(0, str(REPO))
    from utils.io.cpu_memory import limit_openmp_spinning
    limit_openmp_spinning()                                 # before torch loads, as every script
    from utils.io.runtime import RuntimeOptions
    # the scripts' one set-up: TF32 convolutions and cudnn.benchmark on a GPU, the memory setting on the CPU
    RuntimeOptions(device=case["device"], cpu_malloc=case.get("cpu_malloc", "system")).setup(fixed_sizes=True)
    import torch
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    cuda = case["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    yard_before = _yardstick()
    start = time.perf_counter()
    run = _build(case)
    run()                                                   # warm-up (and compilation, if any)
    sync()
    first = time.perf_counter() - start
    if case["kind"] == "train" or case["batch"] == 1:
        run()                                               # a second warm-up: allocator and caches settle
        sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()                # the peak of the timed calls, not of cuDNN's trials
    times = []
    for _ in range(case["reps"]):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    yard = min(yard_before, _yardstick())
    out = {"time": min(times), "times": times, "first_call": first, "yard": yard,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,   # Linux: KiB
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if cuda:
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["gpu"] = torch.cuda.get_device_name()
    return out


# ----------------------------------------------------------------------------------------------------------
# Parent: run, tabulate, write JSON
# ----------------------------------------------------------------------------------------------------------

def run_case(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def derive(case: dict, result: dict) -> dict:
    """Per-image time, throughput, effective GFLOP/s, yardstick units and ratios to the release."""
    if "error" in result:
        return {}
    kind, batch = case["kind"], case["batch"]
    d = {"per_image": result["time"] / batch, "images_per_s": batch / result["time"],
         "gflops": work_gflop(kind, batch, case["size"], case["stages"]) / result["time"]}
    if case["device"] == "cpu":
        d["units"] = result["time"] / result["yard"]
        d["peak_gb"] = result["peak_rss_gb"]
    else:
        d["peak_gb"] = result["cuda_peak_gb"]
    ref = RELEASE.get((kind, batch)) if case["size"] == 256 and case["stages"] == 5 else None
    if ref and case["device"] == "cpu":
        d["speedup_units"] = ref["units"] / d["units"]     # > 1: faster than the release
        d["speedup_time"] = ref["time"] / result["time"]
        d["memory_ratio"] = d["peak_gb"] / ref["peak_gb"]   # < 1: less memory than the release
    return d


COLUMNS = [("device", 6), ("work", 5), ("variant", 17), ("batch", 5), ("size", 5), ("K", 2), ("s/call", 7),
           ("s/img", 6), ("img/s", 6), ("GFLOP/s", 7), ("units", 6), ("x rel", 6), ("peak GB", 7),
           ("mem/rel", 7)]


def _fmt(value, width: int, digits: int = 3) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        text = f"{value:.{digits}g}" if value < 1000 else f"{value:.0f}"
        return text.rjust(width)
    return str(value).rjust(width)


def table_row(case: dict, result: dict, d: dict) -> str:
    if "error" in result:
        head = [case["device"], case["kind"], case["variant"], case["batch"], case["size"], case["stages"]]
        return " ".join(_fmt(v, w) for v, (_, w) in zip(head, COLUMNS)) + "  ERROR " + result["error"]
    values = [case["device"], case["kind"], case["variant"], case["batch"], case["size"], case["stages"],
              result["time"], d["per_image"], d["images_per_s"], d["gflops"], d.get("units"),
              d.get("speedup_units"), d["peak_gb"], d.get("memory_ratio")]
    return " ".join(_fmt(v, w) for v, (_, w) in zip(values, COLUMNS))


def main() -> None:
    variants = "\n".join(f"  {kind} {name:<18} {text}" for kind, table in (("infer", INFER_VARIANTS),
                                                                         ("train", TRAIN_VARIANTS))
                          for name, text in table.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants (the model's speed kernels are on in all but 'paper', as in "
                                            "training):\n" + variants)
    parser.add_argument("--quick", action="store_true", help="headline rows only, fewer repetitions")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, and CUDA when present (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--only", default=None, help="run only the rows whose 'work variant' contains this text")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per configuration")
    parser.add_argument("--cpu-malloc", choices=("system", "keep"), default="system",
                        help="the children's C library: its defaults (as the release was measured), or keeping "
                             "freed memory for reuse, as run_0.py and t_models.py do on the CPU (utils/io/cpu_memory.py)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO)})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    import torch
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cases = plan(args.quick, devices)
    if args.only:
        cases = [c for c in cases if args.only in f"{c['kind']} {c['variant']}"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"DCONet benchmark: {len(cases)} configurations, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {load}"
          + f", CPU malloc: {args.cpu_malloc}")
    print("release (2-core Zen 4, 2 threads, 256x256, K=5): " + ", ".join(
        f"{k[0]} b{k[1]} {v['time']} s ({v['units']:.0f} units, {v['peak_gb']} GB)" for k, v in RELEASE.items()))
    print(" ".join(name.rjust(width) for name, width in COLUMNS))
    rows = []
    for case in cases:
        case["threads"], case["cpu_malloc"] = args.threads, args.cpu_malloc
        result = run_case(case, args.timeout)
        d = derive(case, result)
        rows.append({"case": case, "result": result, "derived": d})
        print(table_row(case, result, d), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "cpus": os.cpu_count(), "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
              "cpu_malloc": args.cpu_malloc, "release": {
                  f"{k[0]}_b{k[1]}": v for k, v in RELEASE.items()}, "release_gflop_per_image": RELEASE_GFLOP,
              "variants": {"infer": INFER_VARIANTS, "train": TRAIN_VARIANTS}, "rows": rows}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
