"""Replay through the engine's own set-associative cache code, batch by batch.

The set-associative LRU and LFU here are not models of the engine: they are the engine's
``SetAssociativeCache`` (CPU backend) or its CUDA kernels, stepped with the same unique ids
and counts that ``TieredEmbeddingBag`` would give them, so the counters equal ``stats()`` of
a training run on the same batches. With ``host_rows``, a second cache stands for L2 (inclusive
of L1, as in the engine) and every unique lookup is attributed to L1, L2 or L3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .. import stats as st
from ..cache import EMPTY, SetAssociativeCache


@dataclass
class EngineResult:
    """Counters of one replay, as ``CacheStats`` counts them (per unique id in a batch)."""

    policy: str
    cache_rows: int
    requests: int = 0
    unique: int = 0
    hits: int = 0
    misses: int = 0
    conflicts: int = 0
    evictions: int = 0
    l2_hits: int = 0  # L1 misses found in L2 (two-level replay only)
    l3_reads: int = 0  # L1 misses that L2 did not hold either
    l2_conflicts: int = 0  # rows L2 could not place (the engine would raise CapacityError)
    seconds: float = 0.0

    @property
    def hit_ratio(self) -> float:
        """L1 hits per unique id looked up."""
        return self.hits / self.unique if self.unique else 0.0

    @property
    def request_hit_ratio(self) -> float:
        """Requests whose row was in L1 (repeats within a batch count as hits)."""
        return (self.requests - self.misses) / self.requests if self.requests else 0.0


def _backend(device: str):
    if device == "cuda":
        from .. import cuda

        if not cuda.available():
            raise RuntimeError("--device cuda needs a CUDA device and CuPy")
        return cuda
    from .. import cpu

    return cpu


def replay_engine(
    batches: Iterable[np.ndarray | torch.Tensor],
    cache_rows: int,
    policy: str = "lru",
    ways: int = 32,
    host_rows: int | None = None,
    device: str = "cpu",
) -> EngineResult:
    """Steps the engine's cache with each batch of ids (one training step each) and counts.

    Args:
        batches: id arrays, one per step (``--batch`` ids each).
        cache_rows, ways, policy: the L1 cache, as ``TieredEmbeddingBag`` takes them.
        host_rows: size of an L2 cache in front of L3 (``None``: L2 holds everything).
        device: ``"cpu"`` (torch) or ``"cuda"`` (the engine's kernels).
    """
    import time

    backend = _backend(device)
    dev = torch.device(device)
    l1 = backend.new_cache(cache_rows, ways, policy, dev)
    l2 = SetAssociativeCache(host_rows, 32, policy, "cpu") if host_rows else None
    home = torch.full((l1.capacity,), -1, dtype=torch.int64)  # L2 slot of each L1 slot
    res = EngineResult(policy, l1.capacity)
    t0 = time.perf_counter()
    for batch in batches:
        ids = torch.as_tensor(batch, dtype=torch.int64).to(dev)
        # the replay needs no inverse (nor the transpose the training path builds)
        uniq, counts = torch.unique(ids, return_counts=True)
        if l2 is not None:
            cpu_uniq = uniq.cpu()
            before = l2.counters.clone()
            found2 = l2.lookup(cpu_uniq, torch.ones_like(cpu_uniq))
            l2_slots = found2.slots
            res.l2_conflicts += int(l2.counters[st.CONFLICTS] - before[st.CONFLICTS])
        found = backend.lookup(l1, uniq, counts)
        if l2 is not None:
            fill_slots = found.fill_slots.cpu()
            evicted = (found.victim_ids != EMPTY).cpu()
            missed = ~found.hit.cpu()  # conflict misses included
            in_l2 = found2.hit[missed]  # L1 misses that L2 already held
            res.l2_hits += int(in_l2.sum())
            res.l3_reads += int((~in_l2).sum())
            # inclusion, as in the engine: rows in L1 stay pinned in L2
            old = home[fill_slots[evicted]]
            l2.locks.view(-1)[old[old >= 0]] -= 1
            new = l2_slots[found.fill_index.cpu()]
            l2.locks.view(-1)[new[new >= 0]] += 1
            home[fill_slots] = new
            l2.release(l2_slots)
        l1.release(found.slots)
    res.seconds = time.perf_counter() - t0
    c = l1.counters.tolist()
    res.requests, res.unique, res.hits = c[st.REQUESTS], c[st.UNIQUE], c[st.HITS]
    res.misses, res.conflicts, res.evictions = c[st.MISSES], c[st.CONFLICTS], c[st.EVICTIONS]
    return res
