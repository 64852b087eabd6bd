"""The set-associative cache: the semantics every backend shares (DESIGN.md, "L1").

This is the CPU backend and the specification: torch ops, vectorised, no Python loop per id.
The CUDA backend (``tierstore/cuda.py``) keeps the same state in HBM and must end every step in
the same tags, scores, dirty bits, locks and counters.

State, per set and way (``S`` sets x ``W`` ways):
    tags    (S, W) int64   row id held by the way, ``EMPTY`` when none
    stamps  (S, W) int64   the policy's score; lowest is evicted first, ties by way index
    dirty   (S, W) bool    written since it was filled: must go back to the tier below
    locks   (S, W) int32   batches in flight that still need the row; locked ways are never evicted
A row's slot is ``set * W + way``; the row data lives in whatever tier owns the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import stats as st
from .errors import CapacityError, InvalidInputError
from .hashing import set_index
from .policy import FrequencySketch, Policy, make_policy

EMPTY = -(1 << 63)  # tag of an empty way; the one int64 that is not a valid row id
_NOT_EVICTABLE = (1 << 63) - 1
_LOOKUP_CHUNK = 1 << 18  # ids compared at once: bounds the (chunk, W) temporary


@dataclass
class Lookup:
    """What one step of the cache decided, for the ``U`` unique ids of a batch (ascending).

    ``slots[i]`` is the slot now holding ``ids[i]``, or -1 for a conflict miss. ``fill_*`` list
    the rows inserted this step in ascending id order (the order that reads the tier below
    fastest), with the row each one evicted (``EMPTY`` if none) and whether that victim was dirty
    and must be written back before its slot is reused.
    """

    ids: torch.Tensor  # (U,) int64
    slots: torch.Tensor  # (U,) int64, -1 = conflict miss
    fill_index: torch.Tensor  # (F,) positions in ids of the inserted rows
    fill_slots: torch.Tensor  # (F,) int64
    victim_ids: torch.Tensor  # (F,) int64, EMPTY where the way was empty
    victim_dirty: torch.Tensor  # (F,) bool
    hit: torch.Tensor  # (U,) bool: the id was cached before this step

    @property
    def fill_ids(self) -> torch.Tensor:
        """Ids of the inserted rows, ascending."""
        return self.ids[self.fill_index]


def cache_shape(rows: int, ways: int) -> tuple[int, int]:
    """``(sets, ways)`` of a cache of ``rows`` rows: ``ceil(rows / ways)`` sets, and no more ways
    than rows (a 1-row cache is one set of one way)."""
    if rows < 1:
        raise InvalidInputError(f"a cache needs at least one row, got {rows}")
    if ways < 1 or ways > 64:
        raise InvalidInputError(f"ways must be in [1, 64], got {ways}")
    ways = min(ways, rows)
    return math.ceil(rows / ways), ways


class SetAssociativeCache:
    """Tags, scores, dirty bits and locks of a set-associative cache, and its batch step.

    Args:
        rows: capacity asked for; the cache holds ``sets * ways`` rows (rounded up).
        ways: associativity (default 32, as FBGEMM's LRU/LFU cache).
        policy: ``"lru"``, ``"lfu"`` or a :class:`~tierstore.policy.Policy`.
        device: where the state lives.
    """

    def __init__(
        self,
        rows: int,
        ways: int = 32,
        policy: str | Policy = "lru",
        device: torch.device | str = "cpu",
    ):
        self.sets, self.ways = cache_shape(rows, ways)
        self.capacity = self.sets * self.ways
        self.policy = make_policy(policy)
        self.device = torch.device(device)
        shape = (self.sets, self.ways)
        self.tags = torch.full(shape, EMPTY, dtype=torch.int64, device=self.device)
        self.stamps = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.dirty = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.locks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.counters = st.new_counters(self.device)
        self.sketch = (
            FrequencySketch.for_cache(self.capacity, self.device)
            if self.policy.uses_frequency
            else None
        )
        self.step = 0

    # ----------------------------------------------------------------- queries (no change)
    def find(self, ids: torch.Tensor, sets: torch.Tensor | None = None) -> torch.Tensor:
        """Slot of each id, or -1 where it is not cached (``sets``: their sets, if known).
        Changes nothing."""
        sets = set_index(ids, self.sets) if sets is None else sets
        slots = torch.full_like(ids, -1)
        for lo in range(0, ids.numel(), _LOOKUP_CHUNK):  # chunks bound the (n, W) temporary
            hi = lo + _LOOKUP_CHUNK
            match = self.tags[sets[lo:hi]] == ids[lo:hi, None]
            hit = match.any(1)
            way = match.to(torch.uint8).argmax(1)
            slots[lo:hi] = torch.where(hit, sets[lo:hi] * self.ways + way, -1)
        return slots

    # ------------------------------------------------------------------------ the step
    def lookup(self, ids: torch.Tensor, counts: torch.Tensor, strict: bool = False) -> Lookup:
        """One step for a batch's unique ids (ascending) and their occurrence counts.

        Hits take the policy's score and a lock; misses are grouped by set and fill evictable
        ways (unlocked, not used in this step): empty ways first, then the lowest score, ties
        by way index; within a set, misses are served in ascending id order. A miss that finds
        no evictable way is a conflict miss. Every row that got a slot is locked until
        :meth:`release`. With ``strict``, a conflict miss raises :class:`CapacityError` before
        anything changes (for a tier that must hold every row of a batch).
        """
        return self.commit(self.plan(ids, strict), counts)

    def plan(self, ids: torch.Tensor, strict: bool = False) -> Lookup:
        """The decisions of :meth:`lookup` without changing anything: which ids hit, which way
        each miss takes and what it evicts. Valid until the state next changes; a tier that
        must do fallible I/O (L2 over SSD) plans, does the I/O, then calls :meth:`commit`."""
        n = ids.numel()
        sets = set_index(ids, self.sets)
        cached = self.find(ids, sets)
        hit = cached >= 0
        miss = (~hit).nonzero().squeeze(1)
        # Group misses by set; the stable sort keeps ascending ids within a set.
        miss = miss[torch.sort(sets[miss], stable=True).indices]
        miss_sets = sets[miss]
        touched, per_set = torch.unique_consecutive(miss_sets, return_counts=True)
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=self.device), per_set)
        rank = (
            torch.arange(miss.numel(), device=self.device)
            - (torch.cumsum(per_set, 0) - per_set)[group]
        )
        # Evictable ways of each touched set, best victim first. Hits of this step lock their
        # way, so they are excluded here as "used by step t".
        busy = self.locks.view(-1).clone()
        busy[cached[hit]] += 1
        busy = busy.view(self.sets, self.ways)[touched] > 0
        key = torch.where(self.tags[touched] == EMPTY, -1, self.stamps[touched])
        key = torch.where(busy, _NOT_EVICTABLE, key)
        way_order = torch.sort(key, dim=1, stable=True).indices
        n_free = (~busy).sum(1)
        placed = rank < n_free[group]
        if strict and not bool(placed.all()):
            short = int((per_set - n_free).max())
            raise CapacityError(
                f"the batch needs {n} unique rows in a cache of {self.capacity} rows "
                f"({self.sets} sets x {self.ways} ways) but up to {short} of them find no "
                "evictable way in their set: make host_rows larger or the batch smaller"
            )
        slots = cached.clone()
        slots[miss[placed]] = miss_sets[placed] * self.ways + way_order[group[placed], rank[placed]]
        # The fills in ascending id order (the fast order for reading the tier below): the
        # newly placed positions, in position order.
        fill = ((slots >= 0) & ~hit).nonzero().squeeze(1)
        fill_slots = slots[fill]
        victim_ids = self.tags.view(-1)[fill_slots]
        victim_dirty = self.dirty.view(-1)[fill_slots] & (victim_ids != EMPTY)
        return Lookup(ids, slots, fill, fill_slots, victim_ids, victim_dirty, hit)

    def commit(self, plan: Lookup, counts: torch.Tensor) -> Lookup:
        """Applies a :meth:`plan` made on the current state: scores, locks, tags, counters."""
        ids, hit, fill, fill_slots = plan.ids, plan.hit, plan.fill_index, plan.fill_slots
        n = ids.numel()
        self.step += 1
        freq = self.sketch.add(ids, counts) if self.sketch is not None else None
        score = self.policy.score(self.step, freq, n, self.device)
        hit_slots = plan.slots[hit]
        flat_stamps, flat_locks = self.stamps.view(-1), self.locks.view(-1)
        flat_stamps[hit_slots] = score[hit]
        flat_locks[hit_slots] += 1
        self.tags.view(-1)[fill_slots] = ids[fill]
        flat_stamps[fill_slots] = score[fill]
        self.dirty.view(-1)[fill_slots] = False
        flat_locks[fill_slots] = 1
        n_hit = int(hit.sum())
        self.counters += torch.tensor(
            [
                int(counts.sum()),
                n,
                n_hit,
                n - n_hit,
                n - n_hit - fill.numel(),
                int((plan.victim_ids != EMPTY).sum()),
                int(plan.victim_dirty.sum()),
            ],
            dtype=torch.int64,
            device=self.device,
        )
        if self.sketch is not None and self.sketch.age_if_due():
            self.policy.age(self.stamps)
        return plan

    def release(self, slots: torch.Tensor) -> None:
        """Unlocks the slots a finished batch held (-1 entries are ignored)."""
        slots = slots[slots >= 0]
        self.locks.view(-1)[slots] -= 1

    def mark_dirty(self, slots: torch.Tensor) -> None:
        """Marks slots as written (their rows must go back to the tier below)."""
        self.dirty.view(-1)[slots[slots >= 0]] = True

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, ids)`` of every dirty way, which are marked clean (the caller writes them back)."""
        slots = self.dirty.view(-1).nonzero().squeeze(1)
        self.dirty.view(-1)[slots] = False
        return slots, self.tags.view(-1)[slots]

    def reset_counters(self) -> None:
        """Zeroes the counters."""
        self.counters.zero_()
