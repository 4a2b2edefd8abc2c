#!/usr/bin/env bash
# Whether the CUDA path works on this machine and how fast it is, in at most about 8 minutes:
#
#   bash benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU at tiny sizes (CI runs it)
#
# Steps: the CUDA tests (tests/test_cuda.py on the GPU; in the dry run on the CPU with the GPU's code paths
# forced, the slow ones left to the whole suite); the training step at batch 8, 256x256, K = 5 in float32 (TF32
# convolutions) and with --amp, as the trainer builds it, against the release's 0.35 s per iteration, with the GPU
# memory peak; one epoch of run_0.py on a synthetic IRSTD-1k-sized set (800 images, 256x256), timed after its
# first log line, and the projected 400-epoch time; inference images/s; DistributedDataParallel on two ranks where
# two GPUs are present. Times and memory peaks leave the warm-up out. Each result is appended to results.jsonl
# (one JSON object a line) as it is measured, and a verdict table ends the run.
#
# A fresh clone needs nothing else: without ../shared the tests that compare against the release's reference data
# skip and say so. Each run writes a new folder, $OUT/gpu_check/<time> (default benchmarks/out/gpu_check/<time>),
# so it can be run again. GPU_CHECK_SECONDS sets the whole budget (default 460 s; 1200 s for --dry-run, whose CPU
# steps are slower: its CUDA tests step may take up to 600 s on a busy machine). Exit status: 0 when every step
# passed or was skipped, 1 when one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
