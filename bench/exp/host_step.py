"""Research: where the host's time goes in the eager training step, every row in L1 (the
headline table of ``bench_step.py``: 10 M x 128 fp32, 65 536 bags x 32 uniform ids), so that two
trees can be compared on one machine: the step's wall time back to back, the CUDA kernels it
launches, the synchronising torch calls it makes, and the functions by own and cumulative host
time (``cProfile``: a wait for the device shows as the own time of the call that waits).

It imports ``tierstore`` from ``sys.path`` as given (no checkout is put first), so that
``PYTHONPATH=<another tree> python3 bench/exp/host_step.py`` profiles that tree's package:

    python3 bench/exp/host_step.py [--optimizer sgd|rowwise] [--steps 20] [--top 25] [--batches 8]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import warnings

import torch

import tierstore as ts

N, D, B, L = 10_000_000, 128, 65_536, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("sgd", "rowwise"), default="sgd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--batches", type=int, default=8,
        help="distinct batches stepped in turn (1: bench_step.py's case, every row a hit)",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"tierstore from {ts.__file__}")
    rule = ts.SGD(lr=0.01) if args.optimizer == "sgd" else ts.RowWiseAdagrad(lr=0.01)
    try:
        cache = {"cache": ts.CacheConfig(rows=N)}
    except AttributeError:  # a tree from before the config dataclasses
        cache = {"cache_rows": N}
    emb = ts.TieredEmbeddingBag(N, D, mode="sum", optimizer=rule, device="cuda", **cache)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [
        torch.randint(0, N, (B, L), device="cuda", generator=gen) for _ in range(args.batches)
    ]
    grad = torch.randn(B, D, device="cuda")

    def step(k: int) -> None:
        emb(batches[k % len(batches)]).backward(grad)

    for k in range(10):
        step(k)
    walls = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for k in range(args.steps):
            step(k)
        torch.cuda.synchronize()
        walls.append(1e3 * (time.perf_counter() - t) / args.steps)
    print(f"{args.optimizer}: {statistics.median(walls):.3f} ms a step back to back (median of 5)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(0)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{len(kernels)} device activities a step (kernels, copies, sets)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # the waits torch sees (not CuPy's or events')
        step(1)
        torch.cuda.set_sync_debug_mode(0)
    print(f"{sum('synchroniz' in str(w.message) for w in caught)} synchronising torch calls")
    host = cProfile.Profile()
    host.enable()
    for k in range(args.steps):
        step(k)
    torch.cuda.synchronize()
    host.disable()
    stats = pstats.Stats(host)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # own time
    print("host time a step by function (own, cumulative, calls):")
    for (path, line, name), (_, calls, own, cum, _) in rows[: args.top]:
        where = path.split("tierstore/")[-1] if "tierstore" in path else path.split("/")[-1]
        print(f"  {1e3 * own / args.steps:7.3f} {1e3 * cum / args.steps:7.3f} ms "
              f"{calls / args.steps:6.1f}  {where}:{line}({name})")  # fmt: skip


if __name__ == "__main__":
    main()
