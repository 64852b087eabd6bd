"""Cache replacement policies as small strategy objects.

Every policy reduces to one int64 *score* per cached way: a full set replaces its lowest score,
ties broken by way index (HierarchicalKV's idea). A policy only says what score a row gets when
it is touched at step ``t`` and how scores age; the cache code (CPU in ``cache.py``, CUDA in
``kernels/``) is the same for all of them. Adding a policy is one class here and one registry
line, plus one score functor in ``kernels/policy.cuh``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .errors import InvalidInputError
from .hashing import mix64, mix64_np, reduce_range, reduce_range_np


class Policy(ABC):
    """How a set-associative cache scores its ways (lowest score is evicted first)."""

    name: str
    kernel_id: int  # the template argument that selects the same functor in the CUDA kernels
    uses_frequency: bool = False

    @abstractmethod
    def score(
        self, step: int, freq: torch.Tensor | None, n: int, device: torch.device
    ) -> torch.Tensor:
        """Scores (int64, shape ``(n,)``) of ``n`` rows touched at ``step``; ``freq`` holds their
        frequency estimates when ``uses_frequency``."""

    def age(self, stamps: torch.Tensor) -> None:
        """Ages the stored scores in place when the frequency sketch halves (no-op by default)."""


class LRU(Policy):
    """Least recently used: the score is the step of the last access."""

    name = "lru"
    kernel_id = 0

    def score(self, step, freq, n, device):
        return torch.full((n,), step, dtype=torch.int64, device=device)


class LFU(Policy):
    """Least frequently used: the score is the row's frequency from a count-min sketch, which
    keeps a row's history after eviction at a bounded cost (no per-table-row counter)."""

    name = "lfu"
    kernel_id = 1
    uses_frequency = True

    def score(self, step, freq, n, device):
        return freq.to(torch.int64)

    def age(self, stamps):
        # The sketch halves its counters; halve the stored scores too so that old and fresh
        # frequencies stay comparable.
        stamps >>= 1


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU}


def make_policy(policy: str | Policy) -> Policy:
    """Returns the policy named ``policy`` (``"lru"`` or ``"lfu"``), or ``policy`` itself."""
    if isinstance(policy, Policy):
        return policy
    try:
        return POLICIES[str(policy).lower()]()
    except KeyError:
        raise InvalidInputError(
            f"policy must be one of {sorted(POLICIES)}, got {policy!r}"
        ) from None


# Salts of the sketch's rows: arbitrary odd 64-bit constants (as int64).
_SKETCH_SALTS = (0x2545F4914F6CDD1D, 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x27BB2EE687B0B0FD)


class FrequencySketch:
    """A count-min sketch of access counts with periodic halving (TinyLFU's aging).

    ``depth`` rows of ``width`` int32 counters; a row id's estimate is the minimum of its
    ``depth`` counters. After ``sample_size`` additions every counter is halved, so the
    estimate follows recent popularity. Memory is ``4 * depth * width`` bytes, independent of
    the table's size.
    """

    depth = len(_SKETCH_SALTS)

    def __init__(self, width: int, sample_size: int, device: torch.device | str = "cpu"):
        self.width = int(width)
        self.sample_size = int(sample_size)
        self.counters = torch.zeros((self.depth, self.width), dtype=torch.int32, device=device)
        self.salts = torch.tensor(
            [s - (1 << 64) if s >= 1 << 63 else s for s in _SKETCH_SALTS],
            dtype=torch.int64,
            device=device,
        )
        # additions since the last halving, kept on the device with the counters
        self.additions = torch.zeros((), dtype=torch.int64, device=device)

    @classmethod
    def for_cache(cls, cache_rows: int, device: torch.device | str = "cpu") -> FrequencySketch:
        """A sketch sized for a cache of ``cache_rows`` rows: width the next power of two of
        twice the rows (at least 1024), halving after ten additions per cached row."""
        width = 1 << max(10, (2 * cache_rows - 1).bit_length())
        return cls(width, sample_size=10 * max(cache_rows, 64), device=device)

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Counter index of each row in each sketch row, shape ``(depth, n)``."""
        if rows.device.type == "cpu":  # numpy's unsigned shifts: the same bits, 40 % faster
            u64 = np.uint64
            keys = rows.to(torch.int64).contiguous().numpy().view(u64)
            h = mix64_np(keys[None, :] ^ self.salts.numpy().view(u64)[:, None])
            return torch.from_numpy(reduce_range_np(h, self.width))
        return reduce_range(mix64(rows.unsqueeze(0) ^ self.salts.unsqueeze(1)), self.width)

    def add(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Adds ``counts`` accesses of each (unique) row and returns their new estimates."""
        pos = self.positions(rows)
        counts = counts.to(torch.int32)
        for d in range(self.depth):  # depth is 4: a loop over sketch rows, not over ids
            self.counters[d].index_add_(0, pos[d], counts)
        self.additions += counts.sum()
        return self.counters.gather(1, pos).min(0).values

    def estimate(self, rows: torch.Tensor) -> torch.Tensor:
        """Current estimates of ``rows`` (no change)."""
        return self.counters.gather(1, self.positions(rows)).min(0).values

    def age_if_due(self) -> bool:
        """Halves every counter once ``sample_size`` additions have accumulated; says whether it did."""
        if int(self.additions) < self.sample_size:
            return False
        self.counters >>= 1
        self.additions.zero_()
        return True
