"""The training step against the L1 cache's size: a Zipf(1.05) RowWiseAdagrad training step
with a fresh batch each step, L1 at 1, 5, 20 and 100 % of the table (L2: the whole table in
pinned host memory).

    python3 bench/bench_sweep.py [--quick] [--json out.json]

Each size warms its cache with half of the batches, then times the other half (CUDA events
around each step, the median) and prints the hit rate of the timed steps (L1 hits per unique
row; the request hit rate, the conflict misses and the writebacks below each size). The table
starts never written, so the warm-up also meets each row for the first time.
"""

from __future__ import annotations

import common
import numpy as np
import torch
from common import B, D, L, N, Table, free, note, trace

import tierstore as ts


def bench_sweep(quick: bool) -> Table:
    table = Table(
        "cache size sweep: Zipf(1.05), RowWiseAdagrad train step, a fresh batch each step",
        f"{N:,} x {D} fp32 rows, int64 ids", f"{B} bags x {L} ids", "ms",
    )  # fmt: skip
    batches = [trace("zipf", B * L, seed=100 + k).view(B, L) for k in range(8 if quick else 16)]
    g = torch.randn(B, D, device="cuda")
    half = len(batches) // 2
    for pct in (1, 5, 20, 100):
        emb = ts.TieredEmbeddingBag(
            N,
            D,
            mode="sum",
            cache=ts.CacheConfig(rows=N * pct // 100),
            optimizer=ts.RowWiseAdagrad(lr=0.01),
            device="cuda",
        )
        for x in batches[:half]:  # warm the cache
            emb(x).backward(g)
        emb.reset_stats()
        times = []
        for x in batches[half:]:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            emb(x).backward(g)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        st = emb.stats()
        table.row(f"cache {pct:>3} % of the table: step time", float(np.median(times)))
        table.row(f"cache {pct:>3} % of the table: hit rate (unique rows)", st.unique_hit_ratio, "")
        note(
            f"request hit ratio {st.hit_ratio:.3f}, conflict misses "
            f"{st.conflict_misses:,}, writebacks {st.writebacks:,}"
        )
        del emb
        free()
    return table


if __name__ == "__main__":
    common.main(__doc__, {"sweep": bench_sweep})
