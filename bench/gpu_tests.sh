#!/usr/bin/env bash
# Every GPU test, on the GPU machine, from the repository root:
#   bash bench/gpu_tests.sh [pytest args...]
# Compiles every kernel with nvcc first where nvcc is installed (a syntax error fails it), then
# runs `python3 -m pytest -q -m gpu tests`. Logs go to $OUT (the device tool's output folder)
# when set, else to ./out. The benchmarks are bench/gpu_bench.sh's.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
if [ -d .wheels ]; then  # lmdb and zstandard for the SSD-tier tests (shared/tools/device-prep)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl &&
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if command -v nvcc >/dev/null 2>&1; then
  python3 -m tierstore.kernel_loader --nvcc 2>&1 | tee "$out/nvcc.txt"
  rc=${PIPESTATUS[0]}
else
  echo "nvcc not found: the kernels were not compiled ahead (CuPy compiles them at run time)" |
    tee "$out/nvcc.txt"
fi
python3 -m pytest -q -m gpu -p no:cacheprovider "$@" tests 2>&1 | tee "$out/pytest.txt"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -ne 0 ] && rc=$test_rc
exit "$rc"
