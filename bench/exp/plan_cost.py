"""What planning a batch costs L2 over an SSD tier (``HostCache.acquire``): the compiled plan
(``tierstore/cache_plan.py``) against the torch specification's, on a full 32-way cache of
``--rows`` rows and batches of ``--ids`` unique ids drawn from twice as many rows. Medians of
three passes over 50 batches; runs on the CPU.

    python3 bench/exp/plan_cost.py [--rows 1000000] [--ids 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tierstore import cache as cache_module
from tierstore.cache_compiled import CompiledCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cache = CompiledCache(args.rows, 32, "lru")
    universe = 2 * args.rows
    for _ in range(3 * universe // 40_000):  # fill it: every set full, scores spread
        ids = torch.unique(torch.from_numpy(rng.integers(0, universe, 40_000)))
        cache.release(cache.lookup(ids, torch.ones_like(ids)).slots)
    batches = [
        torch.unique(torch.from_numpy(rng.integers(0, universe, args.ids))) for _ in range(50)
    ]

    def ms() -> float:
        cache.plan(batches[0])  # compiles on first use
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for b in batches:
                cache.plan(b)
            times.append((time.perf_counter() - t0) / len(batches) * 1e3)
        return statistics.median(times)

    compiled = ms()
    cache_module.COMPILED_STEP = False
    torch_plan = ms()
    print(
        f"plan of {args.ids:,} ids in a full {cache.capacity:,}-row 32-way cache: "
        f"compiled {compiled:.3f} ms, torch {torch_plan:.3f} ms ({torch_plan / compiled:.1f}x)"
    )


if __name__ == "__main__":
    main()
