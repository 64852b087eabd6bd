"""Research: where a steady-state training step with a partial L1 goes (issue 23): the
``bench_steady.py`` table (20 M x 128, Zipf(1.05) batches of 65 536 x 32 ids, RowWiseAdagrad)
with L1 at ``--l1`` of the rows, warm-up steps, then three steps under ``torch.profiler``: the
device time by kernel and the host time by op, after the mean wall time per step. With
``--depth D`` the loop runs under ``ts.prefetching(depth=D)`` (the pipelined loop); with
``--trace PATH`` the profiled steps are also written as a Chrome trace (chrome://tracing or
Perfetto), whose stream rows show what runs beside what.

    python3 bench/exp/profile_steady.py [--l1 0.2] [--rows 20000000] [--depth 1]
        [--trace $OUT/steady.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_steady as bs  # noqa: E402

import tierstore as ts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--uniform", action="store_true", help="uniform ids, not Zipf")
    parser.add_argument("--depth", type=int, default=0, help="prefetching depth (0: plain)")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    emb = ts.TieredEmbeddingBag(
        args.rows, bs.D, mode="sum", cache=ts.CacheConfig(rows=int(args.l1 * args.rows)),
        optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda",
    )  # fmt: skip
    if args.uniform:
        batches = [torch.randint(0, args.rows, (bs.B, bs.L), device="cuda") for _ in range(36)]
    else:
        zipf = bs.ZipfBatches(args.rows)
        batches = [zipf() for _ in range(36)]
    g = torch.randn(bs.B, bs.D, device="cuda")

    def train(x):
        emb(x).backward(g)

    loop = "plain" if not args.depth else f"prefetching(depth={args.depth})"
    if args.depth:
        ms = bs.pipelined_ms(emb, train, batches[:33], 30, args.depth)
    else:
        ms = bs.stream_ms(train, batches[:33], 30)
    print(f"L1 {args.l1:.0%}, {loop}: {ms:.2f} ms a step (mean of 3 after 30 warm-up)")
    last = batches[33:]
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for x in ts.prefetching(last, emb, depth=args.depth) if args.depth else last:
            train(x)
        torch.cuda.synchronize()
    t = time.perf_counter()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                    max_name_column_width=70))  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                    max_name_column_width=70))  # fmt: skip
    print(f"(tables printed in {time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
