"""Counters of the cache hierarchy, kept on the device as one int64 vector and read on demand."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch

# Index of each counter in a cache's device-side int64 vector (same order in the CUDA kernels).
REQUESTS, UNIQUE, HITS, MISSES, CONFLICTS, EVICTIONS, WRITEBACKS = range(7)
N_COUNTERS = 7


@dataclass
class CacheStats:
    """What a table's caches did since creation (or the last ``reset_stats()``).

    Counts are per lookup step: ``requested`` counts every index, ``unique`` the distinct rows
    of each batch; ``hits + misses == unique``. A conflict miss found no evictable way in its
    set and was served from L2 for that step. The ``bytes_*`` fields count row bytes moved
    between tiers (weights and optimizer state); ``bytes_l3_read_ahead`` is the part of
    ``bytes_l3_to_l2`` that prefetched batches' steps took from reads started ahead of them.
    ``bytes_l2_to_l1`` counts every fill's row, including those the CUDA backend computes from
    the id instead of reading (a never-written row of a table in host memory): an upper bound
    on what crossed PCIe, equal on both backends.
    """

    requested: int = 0
    unique: int = 0
    hits: int = 0
    misses: int = 0
    conflict_misses: int = 0
    evictions: int = 0
    writebacks: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    l2_evictions: int = 0
    l2_writebacks: int = 0
    bytes_l2_to_l1: int = 0
    bytes_l1_to_l2: int = 0
    bytes_l2_read_direct: int = 0
    bytes_l3_to_l2: int = 0
    bytes_l2_to_l3: int = 0
    bytes_l3_read_ahead: int = 0

    @property
    def hit_ratio(self) -> float:
        """Share of requested indices whose row was in L1: ``1 - misses / requested``, the
        request hit ratio of libCacheSim (repeats of a row inside a batch count as hits, as
        they cost no move). The same name in ``tierstore run`` and ``tierstore replay``."""
        return (self.requested - self.misses) / self.requested if self.requested else 0.0

    @property
    def unique_hit_ratio(self) -> float:
        """L1 hits per distinct row looked up (``hits / unique``: each batch's repeats once)."""
        return self.hits / self.unique if self.unique else 0.0

    @property
    def hit_rate(self) -> float:
        """Deprecated name of :attr:`unique_hit_ratio`."""
        _deprecated("hit_rate", "unique_hit_ratio")
        return self.unique_hit_ratio

    @property
    def request_hit_rate(self) -> float:
        """Deprecated name of :attr:`hit_ratio`."""
        _deprecated("request_hit_rate", "hit_ratio")
        return self.hit_ratio

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"CacheStats.{old} is deprecated, use CacheStats.{new} (the name tierstore run and "
        "tierstore replay print)",
        DeprecationWarning,
        stacklevel=3,
    )


def new_counters(device: torch.device | str) -> torch.Tensor:
    """A zeroed device-side counter vector."""
    return torch.zeros(N_COUNTERS, dtype=torch.int64, device=device)
