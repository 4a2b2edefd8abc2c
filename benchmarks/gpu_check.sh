#!/usr/bin/env bash
# The checks to run once on a machine with a CUDA GPU, in under 8 minutes all told:
#   1. the CUDA tests (tests/test_cuda.py: reference parity, deploy form, training, the release pipeline) on the GPU;
#   2. python benchmarks/bench_model.py --quick on the GPU;
#   3. NUAA-SIRST at the recipe (K = 5, 256x256, batch 8, lr 1e-4) for the minutes left, then its log.
#
#   bash benchmarks/gpu_check.sh [SHARED]     # SHARED holds data/NUAA-SIRST and reference/ (default: ../shared)
#
# On a machine where the repository's ../shared is absent, copy what the checks read into an ignored folder of
# the checkout (e.g. .device/shared, listed in .git/info/exclude) and pass that folder: ../shared then points to
# it. Under 64 MiB: data/NUAA-SIRST, reference/dconet_k2_seed0.pt, reference/pipeline_nuaa/{weights_release.pkl,
# expected.json} (release_T.npz may stay behind; the test then checks the printed numbers only).
#
# Output goes to $OUT/gpu_check (or benchmarks/out/gpu_check): test log, bench JSON, the training run's log.
# GPU_CHECK_SECONDS sets the whole budget (default 460 s); each step gets what the earlier ones left.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SHARED=$(cd "${1:-../shared}" 2>/dev/null && pwd) || { echo "no folder ${1:-../shared}"; exit 2; }
DATA_ROOT=$SHARED/data
LOGS=${OUT:-benchmarks/out}/gpu_check
BUDGET=${GPU_CHECK_SECONDS:-460}
mkdir -p "$LOGS"
left() { echo $((BUDGET - SECONDS)); }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, cv2, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'opencv', cv2.__version__, 'numpy',
numpy.__version__)"
[ -e ../shared ] || ln -s "$SHARED" ../shared         # the tests read the reference data from ../shared

echo "== 1. CUDA tests ($(left) s left)"
timeout $((150 < $(left) ? 150 : $(left))) python3 -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$LOGS/tests.txt"

echo "== 2. bench_model.py --quick on cuda ($(left) s left)"
timeout $((170 < $(left) ? 170 : $(left))) python3 benchmarks/bench_model.py --quick --device cuda \
  --out "$LOGS/bench_cuda.json" 2>&1 | tee "$LOGS/bench.txt"

echo "== 3. NUAA-SIRST at the recipe for the $(left) s left"
if [ ! -d "$DATA_ROOT/NUAA-SIRST" ]; then
  echo "no $DATA_ROOT/NUAA-SIRST: skipped"
elif [ "$(left)" -gt 40 ]; then
  timeout -s INT $(($(left) - 15)) python3 run_0.py --dataset NUAA-SIRST --data-root "$DATA_ROOT" --device cuda \
    --out "$LOGS/nuaa_run" --log-every 10 > "$LOGS/nuaa_stdout.txt" 2>&1
  echo "exit status $? (130: stopped by the time limit, as planned)"
  grep -E "iterations per epoch|it/s|validation|done" "$LOGS/nuaa_run/log.txt" | tail -n 25
fi
echo "== done in $SECONDS s"
