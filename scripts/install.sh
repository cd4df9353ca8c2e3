#!/usr/bin/env bash
# Install gradtrace into the current Python environment; with --test, its test tools too.
#
# torch is installed only when missing, and then pinned: an unpinned torch would pull a
# multi-GB CUDA build. A torch you already have is never replaced. Override the pin with
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c "import torch" >/dev/null 2>&1; then
  "$python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi

extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
fi
"$python" -m pip install --quiet --editable ".${extras}"
# Build the native core now (about a minute, once per torch), not on the first traced run.
"$python" -m gradtrace info
