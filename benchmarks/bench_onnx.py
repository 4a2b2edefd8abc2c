"""Speed of the two inference backends side by side: PyTorch's deploy form and its ONNX graph in ONNX Runtime.

    python benchmarks/bench_onnx.py                 # idle, then beside a busy process (a few minutes on 2 cores)
    python benchmarks/bench_onnx.py --no-busy       # idle only

In one process, for the release's model (K = 5, 32 channels; seeded weights: the speed does not depend on them):
the PyTorch deploy form (``model.deploy``: folded, channels_last, one image per pass on the CPU, as t_models.py
runs it) and the checked ONNX export of the same deploy form (``utils.export.onnx_export``) in ONNX Runtime with
the CPU provider, both with --threads threads, at batch 1 and 8 and at 256x256 and 512x512. Each cell: one
warm-up call, then the fastest of at least --repeats timed calls (more while under --seconds); images/s.
With busy on, the table is measured a second time while a second process runs a two-thread PyTorch matrix-product
loop (stopped right after, and in any case after 15 minutes). The table goes to stdout and, with the machine's CPU
type, to benchmarks/out/bench_onnx.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.io.cpu_memory import limit_openmp_spinning  # noqa: E402

limit_openmp_spinning()   # before torch loads, as t_models.py does

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model import DCONet, DCONetConfig, deploy  # noqa: E402
from utils.export.onnx_export import export_onnx  # noqa: E402
from utils.export.onnx_runtime import OnnxRuntimeNet  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "bench_onnx.json"
BUSY_LOOP = ("import time, torch\ntorch.set_num_threads(2)\na = torch.rand(1024, 1024)\nend = time.time() + 900\n"
             "while time.time() < end:\n    a @ a\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_time(run, x, repeats: int, seconds: float) -> float:
    run(x)                                                     # warm-up
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > 4 * seconds:
            break
    return min(times)


def measure(backends: dict, sizes: list[int], batches: list[int], repeats: int, seconds: float) -> list[dict]:
    rows = []
    for size in sizes:
        for batch in batches:
            x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(size + batch))
            row = {"size": size, "batch": batch}
            for name, run in backends.items():
                t = best_time(run, x, repeats, seconds)
                row[name] = {"seconds": t, "images_per_s": batch / t}
            print(f"  {size}x{size} batch {batch}: " + ", ".join(
                f"{name} {row[name]['seconds']:.3f} s ({row[name]['images_per_s']:.2f} img/s)" for name in backends),
                flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], title: str) -> str:
    lines = [title, "| size | batch | PyTorch deploy (img/s) | ONNX Runtime (img/s) | ORT / PyTorch |",
             "|---|---|---|---|---|"]
    for r in rows:
        pt, ort = r["pytorch"]["images_per_s"], r["onnxruntime"]["images_per_s"]
        lines.append(f"| {r['size']}x{r['size']} | {r['batch']} | {pt:.2f} | {ort:.2f} | {ort / pt:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per cell at least (default: 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="keep timing a cell while under this (default: 3)")
    parser.add_argument("--no-busy", action="store_true", help="skip the measurement beside a busy process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DCONet(DCONetConfig()).eval()
    pytorch = deploy(model, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        report = export_onnx(model, Path(folder) / "dconet.onnx", 256)
        export_s = time.perf_counter() - t0
        runtime = OnnxRuntimeNet.from_file(report.path, threads=args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch {torch.__version__}, {args.threads} threads; "
          f"export and check {export_s:.0f} s: {report.describe()}", flush=True)
    backends = {"pytorch": lambda x: pytorch(x)[1], "onnxruntime": lambda x: runtime.run_T(x.numpy())}
    x = torch.rand(2, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    agree = float(np.abs(runtime.run_T(x.numpy()) - pytorch(x)[1].numpy()).max())
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
              "max_abs_T_diff_256": agree, "export_check": report.describe()}
    print("idle:", flush=True)
    result["idle"] = measure(backends, args.sizes, args.batches, args.repeats, args.seconds)
    if not args.no_busy:
        print("beside a busy process (a two-thread 1024x1024 matrix-product loop):", flush=True)
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        try:
            time.sleep(2.0)
            result["busy"] = measure(backends, args.sizes, args.batches, args.repeats, args.seconds)
        finally:
            busy.terminate()
            busy.wait(timeout=30)
    print(f"\nmax |T(ONNX Runtime) - T(PyTorch)| at 2x256x256: {agree:.2e}")
    print(table(result["idle"], "\nidle:"))
    if "busy" in result:
        print(table(result["busy"], "\nbeside a busy process:"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
