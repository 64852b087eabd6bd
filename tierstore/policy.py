"""Cache replacement policies as small strategy objects.

Every policy reduces to one int64 *score* per cached way: a full set replaces its lowest score,
ties broken by way index (HierarchicalKV's idea). A policy only says what score a row gets when
it is touched at step ``t`` and how scores age; the cache code (CPU in ``cache.py``, CUDA in
``kernels/``) is the same for all of them. Adding a policy is one class here and one registry
line (the replay takes every registered policy), plus, for the kernels, one score functor in
``kernels/policy.cuh`` that the class declares.

A policy object is the one authority on how it runs. Its :meth:`~Policy.score` and
:meth:`~Policy.age` are the specification, which the torch step (``cache.py``) runs; beside
them it declares its fast paths, and every backend reads them from it (never from its name):

    cuda_functor     its score functor in ``kernels/policy.cuh``, which the CUDA cache's kernels
                     take as a template argument (``cuda_functor.CudaFunctor``)
    compiled_score   the score rule of the compiled CPU step (``CompiledCache`` in
                     ``cache_compiled.py``, and the replay's ``replay/single.py``) that
                     computes the same scores

``None`` declares that there is none. Then, explicitly: the CUDA cache steps the policy as
torch ops (reading the device each step, so no CUDA graph), and on the CPU ``cpu.new_cache``
makes the torch specification, ``SetAssociativeCache``, rather than ``CompiledCache``; a
:class:`~tierstore.errors.FallbackWarning` says so when an L1 cache is made with it.
Declarations are not inherited: a subclass that does not declare its own gets ``None`` (it may
score differently from its base, and the fast paths would not know), so a user-defined policy
never runs on kernels it did not name.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from .cuda_functor import CudaFunctor
from .errors import InvalidInputError
from .hashing import mix64, mix64_np, reduce_range, reduce_range_np

# The declarations of the fast paths: per class, never inherited (Policy.__init_subclass__)
_FAST_PATHS = ("cuda_functor", "compiled_score")


class CompiledScore(enum.Enum):
    """The score rules the compiled CPU step implements (``cache_compiled.CompiledCache``): a
    policy that computes the same scores declares one as its ``compiled_score``."""

    STEP = "step"  # the step of the last access; scores never age (LRU)
    FREQUENCY = "frequency"  # the sketch's estimate; scores halve with the sketch (LFU)


class Policy(ABC):
    """How a set-associative cache scores its ways (lowest score is evicted first).

    ``cuda_functor`` and ``compiled_score`` declare the policy's fast paths, ``None`` that it
    has none (the module docstring says what runs then); a subclass declares its own or gets
    ``None``."""

    name: str
    uses_frequency: bool = False
    cuda_functor: ClassVar[CudaFunctor | None] = None
    compiled_score: ClassVar[CompiledScore | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr in _FAST_PATHS:
            if attr not in vars(cls):
                setattr(cls, attr, None)

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
    cuda_functor = CudaFunctor("LruPolicy", "lru")
    compiled_score = CompiledScore.STEP

    def score(self, step, freq, n, device):
        return torch.full((n,), step, dtype=torch.int64, device=device)


class LFU(Policy):
    """Least frequently used: the score is the row's frequency from a count-min sketch, which
    keeps a row's history after eviction at a bounded cost (no per-table-row counter)."""

    name = "lfu"
    uses_frequency = True
    cuda_functor = CudaFunctor("LfuPolicy", "lfu")
    compiled_score = CompiledScore.FREQUENCY

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
