#!/usr/bin/env bash
# Every GPU test and a short benchmark, in one device call (see bench/RESULTS.md).
#   from the repo root, on the GPU machine:  bash bench/gpu_all.sh [pytest args...]
# BENCH_ARGS="" runs the full benchmark (default: --quick). Logs go to $OUT (the device tool's output folder) when set, else to ./out.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
if [ -d .wheels ]; then  # lmdb and zstandard for the SSD-tier tests (shared/tools/device-prep)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl &&
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m tierstore.kernel_loader --nvcc 2>&1 | tee "$out/nvcc.txt"
python3 -m pytest -q --maxfail=25 -m gpu -p no:cacheprovider "$@" tests 2>&1 | tee "$out/pytest.txt"
rc=${PIPESTATUS[0]}
python3 bench/bench_cuda.py ${BENCH_ARGS---quick} --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
exit $rc
