#!/usr/bin/env bash
# The headline GPU benchmarks (bench/README.md lists them), one script after another, on the GPU
# machine, from the repository root:
#   bash bench/gpu_bench.sh                     # every script with --quick (the default)
#   BENCH_ARGS="" bash bench/gpu_bench.sh       # the full runs
#   BENCH_ARGS="--quick --only train" SCRIPTS="bench_step" bash bench/gpu_bench.sh
# Each script's table goes to $OUT/<script>.txt and its figures to $OUT/<script>.json ($OUT: the
# device tool's output folder when set, else ./out). The tests are bench/gpu_tests.sh's.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
if [ -d .wheels ]; then  # lmdb and zstandard (shared/tools/device-prep)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl &&
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# bench_steady.py: steady-state training with a partial L1 and prefetch (issue 23)
# bench_collection.py: 26 Criteo tables and 856 mixed tables in one collection against one
#   TieredEmbeddingBag / nn.EmbeddingBag per table (issue 27), step times and kernels per step
# bench_replay_engine.py takes its own arguments (below): the engine's cache replayed on the GPU
scripts=${SCRIPTS:-bench_step bench_cache_lookup bench_moves bench_sweep bench_steady bench_collection bench_replay_engine}
rc=0
for s in $scripts; do
  if [ ! -f "bench/$s.py" ]; then
    echo "bench/$s.py not present: skipped"
    continue
  fi
  if [ "$s" = bench_replay_engine ]; then  # 10 M requests a trace; --quick: Zipf 0.8 alone
    args="--device cuda --repeat 2"
    case " ${BENCH_ARGS---quick} " in *" --quick "*) args="$args --alphas 0.8" ;; esac
    echo "== bench/$s.py $args"
    # shellcheck disable=SC2086
    python3 "bench/$s.py" $args 2>&1 | tee "$out/$s.txt"
    [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
    continue
  fi
  echo "== bench/$s.py ${BENCH_ARGS---quick}"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  python3 "bench/$s.py" ${BENCH_ARGS---quick} --json "$out/$s.json" 2>&1 | tee "$out/$s.txt"
  [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
done
exit "$rc"
