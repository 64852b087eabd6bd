"""CPU backend: ids looked up per second at 2 M ids a batch (Zipf(1.05) and uniform).

    python -m pytest bench/bench_lookup.py --benchmark-only

The step measured is the engine's whole lookup: unique, the cache step (hits, victims,
insertion), the row moves L2 -> L1 with writebacks, and the release. Target on a 2-core
machine: 5 M ids/s with Zipf ids.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import tierstore as ts
from tierstore.job import JobConfig, zipf_batches

ROWS, DIM, IDS = 10_000_000, 16, 2_000_000


def batches(kind: str, n: int = 6) -> list[torch.Tensor]:
    if kind == "zipf":
        cfg = JobConfig(rows=ROWS, bags=IDS // 32, pooling=32, steps=n, zipf=1.05, seed=1)
        return zipf_batches(cfg)
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, ROWS, (IDS,), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("kind", ["zipf", "uniform"])
@pytest.mark.parametrize("cache_pct", [5, 20])
def test_cpu_lookup(benchmark, kind, cache_pct):
    emb = ts.TieredEmbeddingBag(
        ROWS,
        DIM,
        mode="sum",
        cache=ts.CacheConfig(rows=ROWS * cache_pct // 100),
        optimizer=None,
        device="cpu",
    )
    data = batches(kind)
    for ids in data[:2]:  # warm the cache
        emb.store.release(emb.store.lookup(ids))
    cycle = itertools.cycle(data[2:])

    def step():
        emb.store.release(emb.store.lookup(next(cycle)))

    benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["M ids/s"] = round(IDS / seconds / 1e6, 2)
    benchmark.extra_info["hit rate"] = round(emb.stats().unique_hit_ratio, 3)
