"""Whether the CUDA path works on this machine and how fast it is, in at most about 8 minutes; run it through
benchmarks/gpu_check.sh (the options are there). Each step runs in its own process with its own time limit and
appends its result to results.jsonl as soon as it is measured; a verdict table ends the run. The exit status is 1
when any step failed, 0 otherwise (a step skipped says why).

Steps: the CUDA tests (tests/test_cuda.py on the GPU); the training step at batch 8, 256x256, K = 5 in float32
(TF32 convolutions, the default) and with --amp, against the release's 0.35 s; one epoch of run_0.py on a
synthetic IRSTD-1k-sized set (800 images, 256x256), timed after its first log line, with the projected 400-epoch
time; inference images/s (the deploy form); DistributedDataParallel on two ranks where two GPUs are present.
Every time and GPU memory peak is taken after warm-up. ``--dry-run`` runs the same steps on the CPU at tiny sizes
(the tests on the CPU with the GPU's code paths forced, but for the slow ones; DDP with two gloo ranks), to test
this script.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE_STEP_S = 0.35                       # the authors' logs: s per iteration, batch 8, 256x256, K = 5
RELEASE_400_EPOCHS = "4 h 18 min (IRSTD-1k), 3 h 50 min (NUDT-SIRST)"
FULL = {"batch": 8, "size": 256, "stages": 5, "steps": 10, "images": 800, "test_images": 16, "infer_reps": 10,
        "log_every": 10}
TINY = {"batch": 2, "size": 32, "stages": 1, "steps": 2, "images": 16, "test_images": 4, "infer_reps": 2,
        "log_every": 2}


# ----------------------------------------------------------------------------------------------------------
# Children: one measurement each, printed as one JSON line
# ----------------------------------------------------------------------------------------------------------

def _set_up(device_name: str):
    sys.path.insert(0, str(REPO))
    from utils.io.cpu_memory import limit_openmp_spinning
    limit_openmp_spinning()
    from utils.io.runtime import RuntimeOptions
    device, _ = RuntimeOptions(device=device_name).setup(fixed_sizes=True)     # the scripts' own set-up
    return device


def child_step(device_name: str, sizes: dict, amp: bool) -> dict:
    """Seconds per training iteration through the engine, as run_0.py trains (the trainer's model, optimizer and
    loss scaler: speed kernels, fused Adam on CUDA; the loss read every 10 iterations)."""
    device = _set_up(device_name)
    import torch
    from model import DCONetConfig
    from utils.io.runtime import amp_dtype, gpu_paths
    from utils.train.config import TrainConfig
    from utils.train.engine import autocast_context, train_one_epoch, training_parts
    from utils.train.schedule import poly_scheduler

    torch.manual_seed(0)
    config = TrainConfig(model=DCONetConfig(stage_num=sizes["stages"]), amp=amp)
    model, optimizer, scaler = training_parts(config, device)
    scheduler = poly_scheduler(optimizer, 10 ** 6, config.poly_power)
    dtype = amp_dtype(device) if amp and gpu_paths(device) else torch.float32
    x = torch.rand(sizes["batch"], 1, sizes["size"], sizes["size"], device=device)
    batch = {"image": x, "mask": (torch.rand_like(x) > 0.995).float()}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(steps: int) -> dict:
        return train_one_epoch(model, [batch] * steps, optimizer, scheduler, device=device, scaler=scaler,
                               autocast=lambda: autocast_context(device, amp=amp), read_at=lambda s: s % 10 == 0)

    run(3)                                          # warm-up: cuDNN's algorithm search, the allocator
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stats = run(sizes["steps"])
    sync()
    seconds = (time.perf_counter() - start) / sizes["steps"]
    out = {"s_per_iter": seconds, "loss": stats["loss"], "dtype": str(dtype).replace("torch.", ""),
           "fused_adam": bool(optimizer.param_groups[0]["fused"])}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def child_infer(device_name: str, sizes: dict) -> dict:
    """Images per second of the deploy form at the training batch and size (and on CUDA its memory peak)."""
    device = _set_up(device_name)
    import torch
    from model import DCONet, DCONetConfig, deploy

    torch.manual_seed(0)
    net = deploy(DCONet(DCONetConfig(stage_num=sizes["stages"])).eval().to(device))
    x = torch.rand(sizes["batch"], 1, sizes["size"], sizes["size"], device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        net(x)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(sizes["infer_reps"]):
        net(x)
    sync()
    out = {"images_per_s": sizes["batch"] * sizes["infer_reps"] / (time.perf_counter() - start)}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


# ----------------------------------------------------------------------------------------------------------
# The parent: run the steps, record, judge
# ----------------------------------------------------------------------------------------------------------

class Check:
    def __init__(self, folder: Path, budget: float):
        self.folder, self.budget, self.start = folder, budget, time.monotonic()
        self.results: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def record(self, step: str, status: str, summary: str, **values) -> None:
        row = {"step": step, "status": status, "summary": summary, **values,
               "at_s": round(time.monotonic() - self.start, 1)}
        self.results.append(row)
        with open(self.folder / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"-- {step}: {status}: {summary}", flush=True)

    def run(self, step: str, command: list[str], limit: float, env: dict | None = None):
        """Run ``command`` (its output to <step>.log); (returncode or None when out of time, output text)."""
        limit = min(limit, self.left())
        if limit < 5:
            return None, "no time left in the budget"
        log = self.folder / f"{step}.log"
        print(f"== {step} (at most {limit:.0f} s): {' '.join(command[:6])} ...", flush=True)
        try:
            done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit)
            text, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as error:
            text, code = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or ""), None
        log.write_text(text)
        return code, text


def _child(check: Check, step: str, args: list[str], limit: float) -> dict | None:
    code, text = check.run(step, [sys.executable, str(Path(__file__)), "--child", *args], limit)
    lines = [l for l in text.splitlines() if l.startswith("{")]
    if code != 0 or not lines:
        tail = text.strip().splitlines()[-1:] if text.strip() else ["no output"]
        check.record(step, "failed", f"exit {code if code is not None else 'timeout'}: {tail[0][:200]}")
        return None
    return json.loads(lines[-1])


def step_tests(check: Check, device: str) -> None:
    """tests/test_cuda.py: on a GPU its CUDA tests (every one, the slow ones too); in the dry run its CPU runs
    with the GPU's code paths forced, but for the slow ones (CI runs those in the whole suite)."""
    select = ["-k", "not cpu"] if device == "cuda" else ["-m", "not slow"]
    code, text = check.run("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                          "tests/test_cuda.py", *select], 240 if device == "cuda" else 600)
    summary = next((l for l in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped)", l)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    where = "on the GPU" if device == "cuda" else "on the CPU, GPU code paths forced"
    if code == 0 and counts.get("passed", 0) == 0:
        check.record("cuda_tests", "failed", f"{summary.strip()}: no test ran", **counts)
    else:
        check.record("cuda_tests", "passed" if code == 0 else "failed",
                     f"{summary.strip() or f'exit {code}'} ({where})", **counts)
    skipped = [l for l in text.splitlines() if l.startswith("SKIPPED")]
    if skipped:
        print("   " + "\n   ".join(skipped[:6]))


def step_train(check: Check, device: str, sizes: dict, amp: bool) -> None:
    name = "step_amp" if amp else "step_fp32"
    result = _child(check, name, ["step", device, json.dumps(sizes)] + (["--amp"] if amp else []), 90)
    if result is None:
        return
    s = result["s_per_iter"]
    dtype = "float32 (TF32 convolutions)" if result["dtype"] == "float32" and device == "cuda" else result["dtype"]
    adam = "fused Adam" if result["fused_adam"] else "Adam"
    where = f"batch {sizes['batch']}, {sizes['size']}x{sizes['size']}, K = {sizes['stages']}, {dtype}, {adam}"
    memory = f", GPU memory peak {result['peak_gib']:.2f} GiB" if "peak_gib" in result else ""
    against = (f"release {RELEASE_STEP_S} s: {RELEASE_STEP_S / s:.1f}x as fast" if sizes is FULL
               else "tiny sizes, not comparable with the release")
    check.record(name, "passed", f"{s:.3f} s/iteration ({where}); {against}{memory}", **result)


def _dataset(root: Path, name: str, n: int, n_test: int, size: int) -> None:
    sys.path.insert(0, str(REPO))
    from utils.data.synthetic_sets import write_dataset
    write_dataset(root, name, n_trainval=n, n_test=n_test, size=size, seed=1)


def step_epoch(check: Check, device: str, sizes: dict, data: Path) -> None:
    _dataset(data, "irstd1k_sized", sizes["images"], sizes["test_images"], sizes["size"])
    out = check.folder / "epoch_run"
    code, text = check.run("epoch", [sys.executable, "run_0.py", "--dataset", "irstd1k_sized", "--data-root",
                                     str(data), "--out", str(out), "--epochs", "1", "--batch-size",
                                     str(sizes["batch"]), "--base-size", str(sizes["size"]), "--stage-num",
                                     str(sizes["stages"]), "--save-iter-step", "0", "--log-every",
                                     str(sizes["log_every"]), "--vis-images", "0", "--device", device], 180)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    # (iteration, iterations/s since the start of the epoch) per log line; the window after the first line
    # leaves the warm-up out (cuDNN's algorithm search, the allocator, the loader's workers starting)
    lines = [(int(step), float(rate)) for step, rate in re.findall(r"iter (\d+)/\d+ .* - ([0-9.]+) it/s", log)]
    if code != 0 or len(lines) < 2:
        reason = "fewer than two log lines" if code == 0 else f"exit {code if code is not None else 'timeout'}"
        check.record("epoch", "failed", f"run_0.py: {reason}; see epoch.log")
        return
    (first, first_rate), (last, last_rate) = lines[0], lines[-1]
    s_per_iter = (last / last_rate - first / first_rate) / (last - first)
    iterations = last
    hours = 400 * iterations * s_per_iter / 3600
    against = f"release: {RELEASE_400_EPOCHS}" if sizes is FULL else "tiny sizes"
    check.record("epoch", "passed", f"{sizes['images']} images: {iterations} iterations, {s_per_iter:.3f} "
                                    f"s/iteration after the first {first}; 400 epochs about {hours:.2f} h "
                                    f"without validation ({against})", s_per_iter=s_per_iter,
                 iterations=iterations, warm_up_iterations=first, projected_400_epochs_h=hours)


def step_infer(check: Check, device: str, sizes: dict) -> None:
    result = _child(check, "inference", ["infer", device, json.dumps(sizes)], 60)
    if result is not None:
        memory = f", GPU memory peak {result['peak_gib']:.2f} GiB" if "peak_gib" in result else ""
        check.record("inference", "passed", f"{result['images_per_s']:.1f} images/s (deploy form, batch "
                                            f"{sizes['batch']}, {sizes['size']}x{sizes['size']}{memory})", **result)


def step_ddp(check: Check, device: str, data: Path) -> None:
    import torch
    if device == "cuda" and torch.cuda.device_count() < 2:
        check.record("ddp", "skipped", f"{torch.cuda.device_count()} GPU: DDP needs two")
        return
    _dataset(data, "ddp_tiny", 8, 2, 32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = check.folder / "ddp_run"
    code, _ = check.run("ddp", [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                                "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "run_0.py",
                                "--dataset", "ddp_tiny", "--data-root", str(data), "--out", str(out), "--epochs",
                                "1", "--batch-size", "2", "--base-size", "32", "--stage-num", "1", "--vis-images",
                                "0", "--device", device], 120, env={"OMP_NUM_THREADS": "1"})
    done = (out / "log.txt").is_file() and "done: best mIoU" in (out / "log.txt").read_text()
    backend = "NCCL" if device == "cuda" else "gloo"
    check.record("ddp", "passed" if code == 0 and done else "failed",
                 f"two {backend} ranks, one epoch" + ("" if code == 0 and done else f": exit {code}; see ddp.log"))


def verdict(check: Check) -> int:
    print("\n" + "step".ljust(12) + "result".ljust(9) + "summary")
    for row in check.results:
        print(row["step"].ljust(12) + row["status"].ljust(9) + row["summary"])
    failed = [row["step"] for row in check.results if row["status"] == "failed"]
    print(f"\nverdict: {'FAILED: ' + ', '.join(failed) if failed else 'every step passed or was skipped'} "
          f"({time.monotonic() - check.start:.0f} s; results in {check.folder / 'results.jsonl'})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, device, sizes = args.child[0], args.child[1], json.loads(args.child[2])
        result = child_step(device, sizes, args.amp) if kind == "step" else child_infer(device, sizes)
        print(json.dumps(result), flush=True)
        return 0

    import torch
    device, sizes = ("cpu", TINY) if args.dry_run else ("cuda", FULL)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(os.environ.get("OUT") or REPO / "benchmarks" / "out") / "gpu_check" / stamp
    n = 1
    while folder.exists():                          # two runs in one second: a new folder each
        folder, n = folder.with_name(f"{stamp}-{n}"), n + 1
    folder.mkdir(parents=True)
    # the whole budget: on a GPU about 8 minutes; the dry run's CPU steps are slower and may take longer
    check = Check(folder, float(os.environ.get("GPU_CHECK_SECONDS", "1200" if args.dry_run else "460")))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    check.record("machine", "passed" if gpu or args.dry_run else "failed",
                 f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}"
                 + (f" ({gpu}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
                    if gpu else "") + (", dry run on the CPU" if args.dry_run else ""))
    if not gpu and not args.dry_run:
        print("PyTorch sees no CUDA GPU: nothing to check here (bash benchmarks/gpu_check.sh --dry-run tests the "
              "script on the CPU)")
        return verdict(check)
    if not (REPO.parent / "shared").is_dir():
        print(f"note: {REPO.parent / 'shared'} is absent: the CUDA tests that compare against the release's "
              f"reference data and pipeline are skipped (they say so); everything else runs")
    data = Path(tempfile.mkdtemp(prefix="gpu_check_data_"))
    try:
        step_tests(check, device)
        step_train(check, device, sizes, amp=False)
        step_train(check, device, sizes, amp=True)
        step_epoch(check, device, sizes, data)
        step_infer(check, device, sizes)
        step_ddp(check, device, data)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return verdict(check)


if __name__ == "__main__":
    sys.exit(main())
