#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine: CUDA tests, the examples, and the overhead
# benchmark. Writes everything under $OUT (default ./gpu-out). Uses the torch already
# installed there; gradtrace is taken from this checkout via PYTHONPATH (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
} > "$out/device.txt" 2>&1

python -m pytest -q -m cuda tests/test_cuda.py -rA > "$out/cuda_tests.txt" 2>&1
echo "cuda tests exit $?" >> "$out/cuda_tests.txt"

python -m pytest -q -x tests/test_corpus.py tests/test_cli.py > "$out/cpu_tests_on_gpu_box.txt" 2>&1
echo "cpu tests exit $?" >> "$out/cpu_tests_on_gpu_box.txt"

COLUMNS=110 python -m gradtrace run --out "$out/example-run" examples/inplace_bug.py \
  > "$out/example.txt" 2>&1
echo "example exit $?" >> "$out/example.txt"

timeout 300 python scripts/bench_overhead.py --device cuda --json "$out/bench.json" \
  > "$out/bench.md" 2>&1
echo "bench exit $?" >> "$out/bench.md"
cat "$out"/device.txt "$out"/cuda_tests.txt "$out"/bench.md | tail -n 80
