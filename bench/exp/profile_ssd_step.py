"""Research: where the DLRM-shaped step's time goes with an SSD tier (issue 23), against the same
step without one: ``bench_ssd_step.py``'s model, tables and batches (4 tables of 2 M x 64 at
``--scale 1``, batch 2 048, L1 = 10 %), L2 at ``--l2`` of the rows over L3 written whole.

For each of the two (no SSD tier, SSD tier) and each loop (plain, ``ts.prefetching(depth=2)``)
after warm-up steps: the median wall time of a step, the host synchronisations a step
(``torch.cuda.set_sync_debug_mode("warn")``'s warnings, counted; CUDA only), the device's busy
time a step (kernels and copies of any stream under ``torch.profiler``, overlaps merged) beside
the wall time, so that a step the host holds up shows as an idle device, and the host
functions of tierstore that took most of the main thread's time (``cProfile``, per step).

    python3 bench/exp/profile_ssd_step.py [--scale 0.25] [--l2 0.5] [--steps 20] [--top 15]

Runs on the CPU too (``--device cpu``, the default without CUDA: no sync count, no device
time); ``--scale 0.02`` takes seconds there.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_ssd_step as bss  # noqa: E402

import tierstore as ts  # noqa: E402


def _tables(run: bss.Run, l2_share: float | None) -> list[ts.TieredEmbeddingBag]:
    """The 4 tables, L1 = 10 %, over an SSD tier holding ``l2_share`` of the rows in L2 (None:
    no SSD tier), written whole as DLRM initialises them."""
    rows = run.rows(bss.DLRM_ROWS)
    tables = [
        ts.TieredEmbeddingBag(
            rows, bss.DLRM_DIM, mode="sum", device=run.device,
            cache=ts.CacheConfig(rows=max(1, rows // 10)), optimizer=ts.SGD(lr=0.05),
            ssd=None if l2_share is None else run.ssd(f"t{k}", round(l2_share * rows)),
        )
        for k in range(bss.DLRM_TABLES)
    ]  # fmt: skip
    bss.write_initial(tables)
    return tables


def _device_busy_ms(prof: torch.profiler.profile) -> float:
    """The device's busy time under ``prof``: its kernels, copies and sets on any stream, in
    ms, overlapping spans merged."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if a > end:
            busy, end = busy + b - a, b
        elif b > end:
            busy, end = busy + b - end, b
    return busy / 1e3


def debug_syncs(cuda: bool, mode: int | str) -> None:
    """``torch.cuda.set_sync_debug_mode(mode)`` where there is CUDA."""
    if cuda:
        torch.cuda.set_sync_debug_mode(mode)


def profile(run: bss.Run, tables: list, steps: int, depth: int, top: int) -> None:
    """Warm-up steps, then the loop (``depth`` 0: plain) timed, counted and profiled."""
    model = bss.DLRMShaped(tables, bss.DLRM_DIM, run.device)
    opt = torch.optim.SGD(model.dense_parameters(), lr=0.05)
    batches = bss.DLRMBatches(run, run.rows(bss.DLRM_ROWS), max(128, round(2048 * run.scale)))

    def step(b) -> None:
        dense, target, sparse = b
        loss = nn.functional.binary_cross_entropy(torch.sigmoid(model(dense, sparse)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def loop(block: list):
        if not depth:
            return iter(block)
        per_table = [ts.prefetching([b[2][k] for b in block], t, depth=depth)
                     for k, t in enumerate(tables)]  # fmt: skip
        return ((b[0], b[1], list(sparse)) for b, *sparse in zip(block, *per_table))

    for b in loop(batches(run.warm)):
        step(b)
    cuda = run.device.type == "cuda"
    times: list[float] = []
    host = cProfile.Profile()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    device_trace = torch.profiler.profile(activities=activities) if cuda else None
    with device_trace or contextlib.nullcontext(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = loop(batches(steps))
        run.sync()
        while True:
            t0 = time.perf_counter()
            debug_syncs(cuda, "warn")  # the step's own synchronisations, not the timing's
            host.enable()
            try:
                b = next(it, None)
                if b is not None:
                    step(b)
            finally:
                host.disable()
                debug_syncs(cuda, 0)
            run.sync()
            if b is None:
                break
            times.append(1e3 * (time.perf_counter() - t0))
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    what = "plain" if not depth else f"prefetching(depth={depth})"
    wall = statistics.median(times)
    per_step = (
        f"device busy {_device_busy_ms(device_trace) / len(times):.2f} ms a step "
        f"(mean); host syncs {syncs / len(times):.1f} a step"
        if cuda
        else "(no device on the CPU)"
    )
    print(f"  {what}: {wall:.2f} ms a step (median of {len(times)}); {per_step}")
    stats = pstats.Stats(host)
    rows = [(fn, st) for fn, st in stats.stats.items() if "tierstore" in fn[0]]
    rows.sort(key=lambda kv: -kv[1][3])  # cumulative time
    for (path, line, name), (_, calls, tottime, cumtime, _) in rows[:top]:
        short = path.split("tierstore/")[-1]
        print(f"    {1e3 * cumtime / len(times):7.3f} ms cum {1e3 * tottime / len(times):7.3f} "
              f"ms own {calls / len(times):6.1f} calls  {short}:{line}({name})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="factor on rows and batch")
    parser.add_argument("--l2", type=float, default=0.5, help="L2's share of the rows")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps a loop")
    parser.add_argument("--top", type=int, default=15, help="host functions listed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bench_ssd_step does on the CPU
    root = Path(tempfile.mkdtemp(prefix="profile_ssd_step."))
    run = bss.Run(device, args.scale, True, root)
    try:
        for l2 in (None, args.l2):
            print("no SSD tier" if l2 is None else f"SSD tier, L2 = {l2:.0%}", flush=True)
            tables = _tables(run, l2)
            for depth in (0, 2):
                profile(run, tables, args.steps, depth, args.top)
            bss.close_dropping(tables)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
