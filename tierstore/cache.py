"""The set-associative cache: the semantics every backend shares (docs/DESIGN.md, "L1").

This is the specification (and the CPU's L1 where numba is missing): torch ops, vectorised, no
Python loop per id.

L1 is one class per backend, each a subclass of this one that must end every step in the same
tags, scores, dirty bits, locks and counters: ``CudaCache`` (``tierstore/cuda_cache.py``) keeps
the state in HBM and steps it with kernels; ``CompiledCache`` (``tierstore/cache_compiled.py``),
the CPU's L1 where numba is installed, steps and plans with compiled loops (the same work in a
few passes rather than some thirty), which ``tests/test_cache_compiled.py`` checks equal to the
torch step and plan, state and ``Lookup`` bit for bit. This module imports neither;
``COMPILED_STEP = False`` keeps every ``CompiledCache`` on the torch code.

State, per set and way (``S`` sets x ``W`` ways):
    tags    (S, W) int64   row id held by the way, ``EMPTY`` when none
    stamps  (S, W) int64   the policy's score; lowest is evicted first, ties by way index
    dirty   (S, W) bool    written since it was filled: must go back to the tier below
    locks   (S, W) int32   batches in flight that still need the row; locked ways are never evicted
A row's slot is ``set * W + way``; the row data lives in whatever tier owns the cache. A
backend may lay tags, stamps, locks and dirty bits out as strided views of one record per way
(:meth:`SetAssociativeCache._way_state`); this module reaches them by slot through
:func:`by_slot`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import stats as st
from .errors import CapacityError, InvalidInputError
from .hashing import set_index
from .policy import FrequencySketch, Policy, make_policy

EMPTY = -(1 << 63)  # tag of an empty way; the one int64 that is not a valid row id
_NOT_EVICTABLE = (1 << 63) - 1
_KEY_LIMIT = 1 << 56  # scores within +-this pack with a way index into one distinct sort key
_KEY_LIMIT_32 = (1 << 25) - 1  # score ranges below this pack into an int32 key the same way
_NOT_EVICTABLE_32 = (1 << 31) - 1
_LOOKUP_CHUNK = 1 << 18  # ids compared at once: bounds the (chunk, W) temporary
# CompiledCache (cache_compiled.py) steps and releases with its compiled loops where they apply;
# False: with the torch code below (tests and benchmarks compare the two). Here, beside the
# specification, so that turning the twin off needs no import of it.
COMPILED_STEP = True


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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-D ``mask``, ascending. On the CPU numpy's
    ``flatnonzero``: about three times as fast as ``torch.nonzero`` there (and an
    ``index_select`` at these positions beats ``masked_select`` by as much)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def _sorted(keys: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``keys`` sorted ascending along ``dim``; they are distinct, so no stable sort is needed.
    On the CPU numpy's sort, several times faster than ``torch.sort`` there on these sizes."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.sort(keys.numpy(), axis=dim))
    return torch.sort(keys, dim=dim).values


def by_slot(state: torch.Tensor) -> torch.Tensor:
    """A per-way state ``(S, W)`` as a view ``(S * W,)`` indexed by slot; also where the state is
    a strided view (a field of a per-way record), whose ``view(-1)`` does not exist."""
    if state.is_contiguous():
        return state.view(-1)
    return state.as_strided((state.numel(),), (state.stride(1),), state.storage_offset())


def cache_shape(rows: int, ways: int) -> tuple[int, int]:
    """``(sets, ways)`` of a cache of ``rows`` rows: ``ceil(rows / ways)`` sets, and no more ways
    than rows (a 1-row cache is one set of one way; ``ways >= rows`` is fully associative).
    The CUDA kernels take at most 64 ways (``cuda.MAX_WAYS``)."""
    if rows < 1:
        raise InvalidInputError(f"a cache needs at least one row, got {rows}")
    if ways < 1:
        raise InvalidInputError(f"ways must be at least 1, got {ways}")
    ways = min(ways, rows)
    return math.ceil(rows / ways), ways


class SetAssociativeCache:
    """Tags, scores, dirty bits and locks of a set-associative cache, and its batch step.

    Args:
        rows: capacity asked for; the cache holds ``sets * ways`` rows (rounded up).
        ways: associativity (default 32, as FBGEMM's LRU/LFU cache).
        policy: ``"lru"``, ``"lfu"`` or a :class:`~tierstore.policy.Policy`.
        device: where the state lives.
        id_bound: every id is known to lie in ``[0, id_bound)``: the cache then also keeps the
            slot of each id (8 bytes per id), so that :meth:`find` is one gather instead of a
            compare with every way of the id's set. Same results; for the trace replay, whose
            ids are known, on the CPU.
    """

    def __init__(
        self,
        rows: int,
        ways: int = 32,
        policy: str | Policy = "lru",
        device: torch.device | str = "cpu",
        id_bound: int | None = None,
    ):
        self.sets, self.ways = cache_shape(rows, ways)
        self.capacity = self.sets * self.ways
        self.policy = make_policy(policy)
        self.device = torch.device(device)
        shape = (self.sets, self.ways)
        self.tags, self.stamps, self.locks, self.dirty = self._way_state(shape)
        self.counters = st.new_counters(self.device)
        self.sketch = (
            FrequencySketch.for_cache(self.capacity, self.device)
            if self.policy.uses_frequency
            else None
        )
        self.step = 0
        # (id_bound,) slot of each id, -1 where not cached; int32 (slots are below 2**31):
        # half the bytes that the random gathers and scatters into it touch
        self._slot_of = None
        if id_bound is not None:
            self._slot_of = torch.full((id_bound,), -1, dtype=torch.int32, device=self.device)

    def _way_state(self, shape: tuple[int, int]):
        """``(tags, stamps, locks, dirty)`` of a new, empty cache: four tensors here; a backend
        may return views of its own layout (their strides alike along the ways)."""
        tags = torch.full(shape, EMPTY, dtype=torch.int64, device=self.device)
        stamps = torch.zeros(shape, dtype=torch.int64, device=self.device)
        locks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        dirty = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return tags, stamps, locks, dirty

    def row_state(self, width: int) -> torch.Tensor | None:
        """A ``(capacity, width)`` float view of room in the cache's own per-way state where a
        store may keep each cached row's optimizer state, or None (here: none; the store keeps
        an array)."""
        return None

    # ----------------------------------------------------------------- a table's rows
    def hold_rows(self, dim: int, state_width: int) -> None:
        """Gives the cache the rows of a table's L1 (a replay's caches hold none):

        * ``weights (capacity, dim)``;
        * ``state (capacity, state_width)``, the optimizer's, apart from the weights (rows of
          128 weights then fill whole 128-byte lines, which a row and its state together do
          not: FBGEMM keeps its momentum apart too), in the way records where the cache has
          room for it (:meth:`row_state`);
        * ``home (capacity,)`` int64: the L2 address of the row in each slot (-1: none), where
          a dirty victim goes back (L2 is inclusive of L1, so it stays valid while cached).
        """
        self.weights = torch.empty((self.capacity, dim), device=self.device)
        state = self.row_state(state_width)
        if state is None:
            state = torch.empty((self.capacity, state_width), device=self.device)
        self.state = state
        self.home = torch.full((self.capacity,), -1, dtype=torch.int64, device=self.device)

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Whole rows ``(k, dim + state_width)`` (weights, then state) of ``slots``."""
        return torch.cat([self.weights[slots], self.state[slots]], 1)

    def set_rows(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Stores whole rows ``(k, dim + state_width)`` in ``slots``."""
        dim = self.weights.shape[1]
        self.weights[slots] = rows[:, :dim]
        self.state[slots] = rows[:, dim:]

    # ----------------------------------------------------------------- queries (no change)
    # Gathers and scatters here use index_select / index_copy_ / index_add_ rather than
    # advanced indexing: the same results, about twice as fast on the CPU for these sizes.
    def find(self, ids: torch.Tensor, sets: torch.Tensor | None = None) -> torch.Tensor:
        """Slot of each id, or -1 where it is not cached (``sets``: their sets, if known).
        Changes nothing."""
        if self._slot_of is not None:
            return self._slot_of.index_select(0, ids).long()
        sets = set_index(ids, self.sets) if sets is None else sets
        slots = torch.full_like(ids, -1)
        chunk = max(1, min(_LOOKUP_CHUNK, (_LOOKUP_CHUNK * 64) // self.ways))
        for lo in range(0, ids.numel(), chunk):  # chunks bound the (n, W) temporary
            part = sets[lo : lo + chunk]
            match = self.tags.index_select(0, part) == ids[lo : lo + chunk, None]
            row, way = match.nonzero(as_tuple=True)  # an id is in at most one way of its set
            slots.index_copy_(0, lo + row, part.index_select(0, row) * self.ways + way)
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

        This method is :meth:`plan` then :meth:`commit`; ``CompiledCache`` (the CPU's L1 with
        numba) does the same in compiled loops, for a policy that declares a
        ``compiled_score``, unless ``strict``.
        """
        return self.commit(self.plan(ids, strict), counts)

    def plan(self, ids: torch.Tensor, strict: bool = False) -> Lookup:
        """The decisions of :meth:`lookup` without changing anything: which ids hit, which way
        each miss takes and what it evicts. Valid until the state next changes; a tier that
        must do fallible I/O (L2 over SSD) plans, does the I/O, then calls :meth:`commit`."""
        n, dev, W = ids.numel(), self.device, self.ways
        if self._slot_of is not None:  # find needs no sets: hash the misses only
            cached = self.find(ids)
            miss = _positions(cached < 0)
            miss_sets = set_index(ids.index_select(0, miss), self.sets)
        else:
            sets = set_index(ids, self.sets)
            cached = self.find(ids, sets)
            miss = _positions(cached < 0)
            miss_sets = sets.index_select(0, miss)
        hit = cached >= 0
        hit_slots = cached.index_select(0, _positions(hit))
        # Group misses by set, ascending ids (= positions) within a set: one sort of the
        # distinct keys set * 2**32 + position (sets are below 2**31, positions below 2**32).
        grouped = _sorted((miss_sets << 32) | miss)
        miss_sets, miss = grouped >> 32, grouped & 0xFFFFFFFF
        touched, per_set = torch.unique_consecutive(miss_sets, return_counts=True)
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=dev), per_set)
        first = torch.cumsum(per_set, 0) - per_set
        rank = torch.arange(miss.numel(), device=dev) - first.index_select(0, group)
        # Evictable ways of each touched set, best victim first. Hits of this step lock their
        # way, so they are excluded here as "used by step t".
        busy = self.locks > 0
        busy.view(-1).index_fill_(0, hit_slots, True)
        busy = busy.index_select(0, touched)
        key = self.stamps.index_select(0, touched)
        key.masked_fill_(self.tags.index_select(0, touched) == EMPTY, -1)
        way_order = self._victim_order(key, busy)
        n_free = (~busy).sum(1)
        placed = rank < n_free.index_select(0, group)
        if strict and not bool(placed.all()):
            self._refuse(n, int((per_set - n_free).max()))
        at = _positions(placed)  # placed misses, in set order
        way = way_order.view(-1).index_select(
            0, group.index_select(0, at) * W + rank.index_select(0, at)
        )
        slots = cached.clone()
        slots.index_copy_(0, miss.index_select(0, at), miss_sets.index_select(0, at) * W + way)
        return self._planned(ids, slots, hit)

    def _refuse(self, n: int, short: int) -> None:
        """Raises the :class:`CapacityError` of a strict plan of ``n`` ids of which up to
        ``short`` in one set find no evictable way."""
        raise CapacityError(
            f"the batch needs {n} unique rows in a cache of {self.capacity} rows "
            f"({self.sets} sets x {self.ways} ways) but up to {short} of them find no "
            "evictable way in their set: make host_rows larger or the batch smaller"
        )

    def _planned(self, ids: torch.Tensor, slots: torch.Tensor, hit: torch.Tensor) -> Lookup:
        """The plan with each id's slot after the step and whether it hit: its fills in
        ascending id order (the fast order for reading the tier below: the newly placed
        positions, in position order) and what each evicts."""
        fill = _positions((slots >= 0) & ~hit)
        fill_slots = slots.index_select(0, fill)
        victim_ids = by_slot(self.tags).index_select(0, fill_slots)
        victim_dirty = by_slot(self.dirty).index_select(0, fill_slots) & (victim_ids != EMPTY)
        return Lookup(ids, slots, fill, fill_slots, victim_ids, victim_dirty, hit)

    def _victim_order(self, key: torch.Tensor, busy: torch.Tensor) -> torch.Tensor:
        """The ways of each row of ``key`` (T, W) in eviction order: unbusy ways by ascending
        key (empty ways have -1), ties by way index, busy ways last."""
        way = torch.arange(self.ways, device=self.device)
        lo, hi = torch.stack(list(torch.aminmax(key))).tolist() if key.numel() else (0, 0)
        # the way index takes the low bits: 6 up to 64 ways, more for wider sets (whose key
        # ranges shrink by as much)
        bits = max(6, (self.ways - 1).bit_length())
        if hi - lo < _KEY_LIMIT_32 >> (bits - 6):  # usually: 32-bit keys sort twice as fast
            packed = ((key - lo).int() << bits) | way.int()  # distinct within a row: not stable
            return _sorted(torch.where(busy, _NOT_EVICTABLE_32, packed), dim=1) & ((1 << bits) - 1)
        limit = _KEY_LIMIT >> (bits - 6)
        if -limit < lo and hi < limit:  # scores are steps or frequencies: they fit
            packed = ((key + 1) << bits) | way  # distinct within a row: no stable sort needed
            return _sorted(torch.where(busy, _NOT_EVICTABLE, packed), dim=1) & ((1 << bits) - 1)
        key = torch.where(busy, _NOT_EVICTABLE, key)
        return torch.sort(key, dim=1, stable=True).indices

    def commit(self, plan: Lookup, counts: torch.Tensor) -> Lookup:
        """Applies a :meth:`plan` made on the current state: scores, locks, tags, counters."""
        ids, hit, fill, fill_slots = plan.ids, plan.hit, plan.fill_index, plan.fill_slots
        n = ids.numel()
        self.step += 1
        freq = self.sketch.add(ids, counts) if self.sketch is not None else None
        score = self.policy.score(self.step, freq, n, self.device)
        # hits and fills at once: every id that has a slot now takes its score and a lock (a
        # fill's way was unlocked: only unlocked ways are evicted)
        placed_at = _positions(plan.slots >= 0)
        placed = plan.slots.index_select(0, placed_at)
        by_slot(self.stamps).index_copy_(0, placed, score.index_select(0, placed_at))
        by_slot(self.locks).index_add_(0, placed, torch.ones_like(placed, dtype=torch.int32))
        evicted = plan.victim_ids != EMPTY
        if self._slot_of is not None:  # victims are never in the batch (they are not hits)
            self._slot_of.index_fill_(0, plan.victim_ids.index_select(0, _positions(evicted)), -1)
            self._slot_of.index_copy_(0, ids.index_select(0, fill), fill_slots.int())
        by_slot(self.tags).index_copy_(0, fill_slots, ids.index_select(0, fill))
        by_slot(self.dirty).index_fill_(0, fill_slots, False)
        n_hit = int(hit.sum())
        self.counters += torch.tensor(
            [
                int(counts.sum()),
                n,
                n_hit,
                n - n_hit,
                n - n_hit - fill.numel(),
                int(evicted.sum()),
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
        slots = slots.index_select(0, _positions(slots >= 0))
        by_slot(self.locks).index_add_(0, slots, torch.full_like(slots, -1, dtype=torch.int32))

    def mark_dirty(self, slots: torch.Tensor) -> None:
        """Marks slots as written (their rows must go back to the tier below)."""
        by_slot(self.dirty).index_fill_(0, slots.masked_select(slots >= 0), True)

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, ids)`` of every dirty way, which are marked clean (the caller writes them back)."""
        dirty = by_slot(self.dirty)
        slots = dirty.nonzero().squeeze(1)
        dirty[slots] = False
        return slots, by_slot(self.tags)[slots]

    def reset_counters(self) -> None:
        """Zeroes the counters."""
        self.counters.zero_()
