"""Rows moved between L2 (the whole table in pinned host memory) and L1 (HBM): 1 M unique
misses a step, every one a fill, with clean victims and then with dirty ones written back.

    python3 bench/bench_moves.py [--quick] [--json out.json]

Rows of 128 floats (SGD, 512 B) and of 129 floats (RowWiseAdagrad, 516 B: L1 keeps the one
float of state in the way's record). The figure is bytes moved (fills plus writebacks) per
second of ``move_rows``, CUDA events around it alone. Target (issue 4): >= 30 GB/s; baselines
from docs/DESIGN.md's ceilings: a naive zero-copy gather 16.6 GB/s, a CPU gather + DMA 22.7,
the DMA ceiling 55.
"""

from __future__ import annotations

import common
import numpy as np
import torch
from common import D, N, Table, free, note

import tierstore as ts
from tierstore import cuda

MISSES = 1 << 20


def bench_moves(quick: bool) -> list[Table]:
    tables = []
    for width, opt in (
        ("128 floats (SGD)", ts.SGD(lr=0.01)),
        ("129 floats (RowWiseAdagrad)", ts.RowWiseAdagrad(lr=0.01)),
    ):
        table = Table(
            f"rows moved L2 (pinned host) <-> L1, rows of {width}",
            f"{N:,} x {D} fp32 table, L1 of {MISSES:,} rows", f"{MISSES:,} unique misses a step",
            "GB/s",
        )  # fmt: skip
        emb = ts.TieredEmbeddingBag(
            N, D, mode="sum", cache=ts.CacheConfig(rows=MISSES), optimizer=opt, device="cuda"
        )
        store = emb.store
        row_bytes = store.layout.row_bytes
        for dirty in (False, True):
            fills, times = [], []
            for k in range(6 if quick else 12):
                ids = torch.unique(torch.randint(0, N, (1_100_000,), device="cuda"))[:MISSES]
                batch_ids, counts = torch.unique(ids, return_counts=True)
                found = cuda.lookup(store.l1, batch_ids, counts)
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                cuda.move_rows(store, found, batch_ids)
                e.record()
                torch.cuda.synchronize()
                f = found.trimmed()
                if k >= 2:  # the first two steps fill an empty cache: no victims
                    fills.append((f.fill_index.numel(), int(f.victim_dirty.sum())))
                    times.append(s.elapsed_time(e))
                store.l1.release(found.slots)
                if dirty:
                    store.l1.mark_dirty(found.slots)
            t = float(np.median(times))
            nf, nwb = np.median([f for f, _ in fills]), np.median([w for _, w in fills])
            gbs = (nf + nwb) * row_bytes / (t / 1e3) / 1e9
            what = "fill + dirty writeback" if dirty else "fill (clean victims)"
            table.row(
                f"{what}: {int(nf):,} fills, {int(nwb):,} writebacks", gbs, None,
                "zero-copy 16.6, CPU+DMA 22.7", ">= 30 GB/s",
            )  # fmt: skip
            note(f"{t:.3f} ms per step")
        tables.append(table)
        del emb, store, found
        free()
    return tables


if __name__ == "__main__":
    common.main(__doc__, {"moves": bench_moves})
