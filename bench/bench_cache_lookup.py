"""The CUDA cache's lookup alone: unique ids resolved to slots in a 32-way cache of 4 M rows
that holds every one of them (all hits).

    python3 bench/bench_cache_lookup.py [--quick] [--json out.json]

Rows: the read-only ``find_slots`` kernel (``CudaCache.find``), and the whole lookup step (the
probe that stamps and locks each hit, the grouping of misses, the victims, the counters) with
its release, for 1 M unique ids and for every cached id (about 3.1 M). Target (issue 4):
``find_slots`` >= 4 G ids/s; the baseline is HierarchicalKV's ``find`` on the same card,
3.3-3.7 G keys/s (docs/DESIGN.md, "Ceilings").
"""

from __future__ import annotations

import common
import torch
from common import Table, note, t_ms

from tierstore import cuda

ROWS, WAYS = 1 << 22, 32


def bench_lookup(quick: bool) -> Table:
    it = 20 if quick else 50
    table = Table(
        f"cache lookup, {WAYS}-way cache of {ROWS:,} rows, all hits",
        "int64 ids (unique, sorted)", "1 M and ~3.1 M unique ids a call", "G ids/s",
    )  # fmt: skip
    cache = cuda.new_cache(ROWS, WAYS, "lru", torch.device("cuda"))
    ids = torch.unique(torch.randint(0, 1 << 40, (3 << 20,), device="cuda"))
    for lo in range(0, ids.numel(), 1 << 20):  # fill the cache, 1 M ids a step
        part = ids[lo : lo + (1 << 20)]
        cache.release(cache.lookup(part, torch.ones_like(part)).slots)
    cached = ids[cache.find(ids) >= 0]
    note(f"{cached.numel():,} of {ids.numel():,} ids cached")
    for n in (1 << 20, cached.numel()):
        q = cached[torch.randperm(cached.numel(), device="cuda")[:n]].sort().values
        ones = torch.ones_like(q)
        t = t_ms(lambda q=q: cache.find(q), it)
        table.row(
            f"find_slots kernel, {n:,} unique ids", n / t / 1e6, None, "HKV find 3.3-3.7 G/s",
            ">= 4 G ids/s",
        )  # fmt: skip

        def step(q=q, ones=ones):
            cache.release(cache.lookup(q, ones).slots)

        t = t_ms(step, it)
        table.row(f"whole lookup step + release, {n:,} unique ids", n / t / 1e6)
    return table


if __name__ == "__main__":
    common.main(__doc__, {"lookup": bench_lookup})
