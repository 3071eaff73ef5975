#!/usr/bin/env bash
# One command to verify the fused kernels on a machine with a CUDA GPU:
#   1. environment report (GPU, torch, nvcc),
#   2. build the extension in place (setup.py build_ext), or rely on the JIT build,
#   3. pytest -m gpu tests/kernels  (fused vs reference: outputs, gradients, dtypes, odd sizes),
#   4. tools/bench_kernels.py       (GB/s, % of copy bandwidth, eager and torch.compile times),
#   5. tools/bench_train.py llama-1b (seq 2048, bf16) with reference ops, then fused ops: tokens/s, MFU,
#   6. the same with fused ops for each recompute mode (none, selective, full) and with train.compile=true.
# Usage: tools/gpu_check.sh [--quick]    (--quick: short benchmark)
# Logs go to ${OUT:-build/gpu_check_logs}/; the exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-build/gpu_check_logs}"
mkdir -p "$LOG_DIR"
BENCH_ARGS=("$@")
status=0

step() {  # step NAME CMD...: run, tee to LOG_DIR/NAME.log, remember the first failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

step env bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"; nvcc --version | tail -2'
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device visible to torch: nothing to check"; exit 2; }

# In-place build of megalite._C (what `pip install --no-build-isolation -e .` does); if it fails,
# the tests still try the JIT build, so the log of both attempts is kept.
step build env MAX_JOBS="${MAX_JOBS:-8}" python setup.py build_ext --inplace \
  || echo "setup.py build failed; megalite.kernels will try the JIT build"
step load python -c "
import logging; logging.basicConfig(level=logging.INFO)
from megalite.kernels import fused; ok, why = fused.load(); print('fused kernels:', ok, why); raise SystemExit(0 if ok else 1)"
step tests env MEGALITE_KERNELS=fused python -m pytest -m gpu tests/kernels -q -rs
step bench python tools/bench_kernels.py "${BENCH_ARGS[@]}"
TRAIN_ARGS=(llama-1b train.precision=bf16 data.seq_len=2048 train.micro_batch_size="${MICRO_BATCH:-4}")
STEPS=(--steps "${TRAIN_STEPS:-20}" --warmup 5)
step train_reference env MEGALITE_KERNELS=reference python tools/bench_train.py "${TRAIN_ARGS[@]}" "${STEPS[@]}"
step train_fused env MEGALITE_KERNELS=auto python tools/bench_train.py "${TRAIN_ARGS[@]}" "${STEPS[@]}"
for mode in none selective full; do  # what each recompute mode costs in tokens/s (and saves in memory)
  step "train_recompute_$mode" env MEGALITE_KERNELS=auto python tools/bench_train.py "${TRAIN_ARGS[@]}" \
    train.activation_checkpointing="$mode" "${STEPS[@]}"
done
step train_compile env MEGALITE_KERNELS=auto python tools/bench_train.py "${TRAIN_ARGS[@]}" train.compile=true \
  "${STEPS[@]}"
echo "gpu_check: exit $status (logs in $LOG_DIR/)"
exit "$status"
