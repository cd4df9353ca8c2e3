#!/usr/bin/env bash
# Install gradtrace into the current Python environment; with --test, its test tools too.
# numpy is installed too when missing (torch warns on every import without it).
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

# torch's CPU wheels do not depend on numpy, yet torch warns "Failed to initialize NumPy" on
# every import without it: numpy goes next to torch (torch itself is left as it is). torch
# before 2.3 was built against numpy 1.
if ! "$python" -c "import numpy" >/dev/null 2>&1; then
  numpy_spec=$("$python" -c "import torch; v = torch.__version__.split('+')[0].split('.'); \
print('numpy' if (int(v[0]), int(v[1])) >= (2, 3) else 'numpy<2')" 2>/dev/null)
  "$python" -m pip install --quiet "$numpy_spec"
fi

extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
fi
"$python" -m pip install --quiet --editable ".${extras}"
# Build the native core now (about a minute, once per torch), not on the first traced run.
"$python" -m gradtrace info
