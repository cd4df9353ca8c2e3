#!/usr/bin/env bash
# Checks on a lent CUDA machine, in two parts that each fit one 600 s device call (their
# timeouts add up to 570 s and 540 s, each with the native core's build first):
#   scripts/gpu_check.sh core    CUDA tests, the overhead benchmark, hook times and floors
#   scripts/gpu_check.sh extra   the example, DDP on NCCL, CPU tests on this torch and the
#                                gradient-statistics benchmark
# Within a part the most wanted results come first: a run cut short still returns them.
# Everything goes under $OUT (default ./gpu-out). Uses the torch installed there; gradtrace
# comes from this checkout via PYTHONPATH (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-core}
case "$part" in
  core | extra) ;;
  *) echo "usage: scripts/gpu_check.sh [core|extra]" >&2; exit 2 ;;
esac
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  git log --oneline -1 2>/dev/null || true
} > "$out/device.txt" 2>&1

# The native core is built once (about a minute) into the checkout; later steps load it.
export GRADTRACE_CACHE="$PWD/.gradtrace-cache"
build_core() {
  timeout 120 python -m gradtrace info > "$out/native_core_$part.txt" 2>&1
  echo "native core build exit $?" >> "$out/native_core_$part.txt"
}

core() {
  build_core

  timeout 120 python -m pytest -q -m cuda tests/test_cuda.py -rA -p no:cacheprovider \
    > "$out/cuda_tests.txt" 2>&1
  echo "cuda tests exit $?" >> "$out/cuda_tests.txt"

  timeout 170 python scripts/bench_overhead.py --device cuda --steps 20 --rounds 3 \
    --json "$out/bench.json" > "$out/bench.md" 2>&1
  echo "bench exit $?" >> "$out/bench.md"

  # Host time inside each hook per GPT-2-small step: launch-bound steps pay it one to one.
  for level in light full; do
    timeout 50 python scripts/bench_overhead.py --device cuda --hook-time --profile-model gpt \
      --profile-level "$level" --profile-steps 50 > "$out/hook_time_$level.md" 2>&1
    echo "hook time exit $?" >> "$out/hook_time_$level.md"
  done

  # What the mechanisms alone cost on GPT-2-small: can the CUDA budgets be met at all?
  timeout 60 python scripts/bench_overhead.py --device cuda --floors --models gpt --steps 20 \
    --rounds 3 --json "$out/bench_floors.json" > "$out/bench_floors.md" 2>&1
  echo "floors exit $?" >> "$out/bench_floors.md"

  tail -n 5 "$out"/native_core_core.txt
  tail -n 3 "$out"/cuda_tests.txt
  tail -n 25 "$out"/bench.md
  tail -n 16 "$out"/hook_time_*.md
  tail -n 12 "$out"/bench_floors.md
}

extra() {
  build_core
  COLUMNS=110 timeout 60 python -m gradtrace run --out "$out/example-run" \
    examples/inplace_bug.py > "$out/example.txt" 2>&1
  echo "example exit $?" >> "$out/example.txt"

  # Distributed on NCCL, world size 1, with the cross-rank check (its all_reduce on the GPU).
  DDP_BACKEND=nccl timeout 90 python -m gradtrace run --out "$out/ddp-nccl" \
    --nproc-per-node 1 --check-ranks tests/distributed/ddp_clean.py > "$out/ddp_nccl.txt" 2>&1
  echo "ddp nccl exit $?" >> "$out/ddp_nccl.txt"

  # In-process CPU tests on the device's torch (the subprocess corpus is too slow to fit here).
  timeout 120 python -m pytest -q tests/test_grads.py tests/test_api.py tests/test_analysis.py \
    -p no:cacheprovider > "$out/cpu_tests_on_this_torch.txt" 2>&1
  echo "cpu tests exit $?" >> "$out/cpu_tests_on_this_torch.txt"

  # Gradient statistics off / on / with the update ratio, and their time per recorded step
  # against the bandwidth limit (a device-to-device copy measured in the same run).
  timeout 150 python scripts/bench_overhead.py --device cuda --grad-stats --steps 20 \
    --rounds 3 --json "$out/bench_grad_stats.json" > "$out/bench_grad_stats.md" 2>&1
  echo "grad-stats bench exit $?" >> "$out/bench_grad_stats.md"

  tail -n 3 "$out"/example.txt "$out"/cpu_tests_on_this_torch.txt "$out"/ddp_nccl.txt
  tail -n 12 "$out"/bench_grad_stats.md
}

"$part"
