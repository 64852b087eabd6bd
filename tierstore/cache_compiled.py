"""The set-associative cache's step as compiled loops: :class:`CompiledCache`, a
``SetAssociativeCache`` whose ``lookup`` takes a few passes over the batch instead of some
thirty.

``cache.py``'s torch step is the specification (docs/DESIGN.md, "L1"), which ``cache.py``
keeps unaware of this twin: a subclass for the CPU where numba is installed (``cpu.new_cache``
picks it) that keeps to the torch step wherever the loops here do not apply (a policy without a
``compiled_score``, a strict lookup, ``cache.COMPILED_STEP = False``), working in place on
numpy views of the cache's tensors. ``tests/test_cache_compiled.py`` checks that both end
every step in the same state and return the same ``Lookup``, bit for bit. L2 over an SSD tier
plans a batch (``cache_plan.py``), reads its misses from L3, then commits it (:func:`_commit`).

The step, for the ``n`` unique ids of a batch (ascending) and their counts:

1. LFU: per sketch row, one pass adds the counts into it, then one reads each id's counter
   there (the torch step adds the whole batch before it estimates: a row's counters change
   only by the row's own additions), and the sketch halves when due;
2. one pass over the ids finds each id's slot (in the slot index, or among the tags of its set)
   and gives each hit its score and a lock at once: a locked way is not evictable, which is all
   that "used by this step" asks of a hit's way. The misses are noted with their set;
3. the misses are grouped by set, ascending positions within a set (a counting sort over the
   sets, or a sort of packed keys when the sets far outnumber the misses);
4. per touched set, one scan of its ways ranks the evictable ones (the lowest key
   first, -1 when empty or else the score, ties by way index) and its misses fill them in that
   order: tags, dirty bits, locks and scores change there, the victims are noted;
5. one pass lists the fills in position order and updates the slot index with them (in that
   order the filled rows ascend: their entries are written in address order);

then the counters and, when the sketch halved, the scores' halving. Step 1 reads and writes
only the sketch, and the others never touch it: :meth:`CompiledCache.score` and
:meth:`CompiledCache.place` take them apart, so that the CPU replay scores a batch on a
second thread while the one before it is placed.

Grouping is for speed only: a fill locks its way, so misses taken one by one in position order
would choose the same ways; a set's ways are scanned once for all its misses instead.
Locks are never negative (a cache releases what it locked); the torch step marks a hit's way
busy whatever its lock, this step by the lock the hit takes.

Each compiled function is a whole pass. The loops call no compiled helper that takes arrays
(but on rare paths): such a call updates the reference count of every array argument on the
way in and out, atomically, which costs more than a fill's whole work (measured: 90 against 22
ns a fill). Random reads are prefetched some dozens of ids ahead (on the 2-core VM the sketch's
passes take half as long with it, and a 2 M-id batch's fills half as long).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import cache as cache_module
from . import compiled as _compiled
from . import stats as st
from .cache import EMPTY, Lookup, SetAssociativeCache
from .cache_plan import IDS_AHEAD, MISSES_AHEAD, find_slots, group_by_set, plan_slots
from .compiled import NumbaError, compiled, prefetch
from .hashing import mix64_compiled as _mix64  # splitmix64's finalizer (hashing.mix64)
from .hashing import reduce_range_compiled as _reduce_range
from .hashing import set_index_compiled as _set_of
from .policy import CompiledScore

_EMPTY = np.int64(EMPTY)  # a constant the compiled loops can read
_LOW32 = np.int64(0xFFFFFFFF)
_TAKEN = np.int64((1 << 63) - 1)  # above every packed victim key: a way that is no choice
_PACKED_MAX = np.int64((1 << 57) - 3)  # keys in [-1, this] pack with a way below _TAKEN
_NO_INDEX = np.empty(0, np.int32)  # stands for the slot index of a cache that keeps none


# --------------------------------------------------------------------------- 1. sketch
@compiled
def _sketch_cells(ids, salt, width, cells):
    """Each id's counter in the sketch row of ``salt`` (a loop of its own: it vectorises)."""
    salt = np.uint64(salt)
    for i in range(ids.size):
        cells[i] = _reduce_range(_mix64(np.uint64(ids[i]) ^ salt), width)


@compiled
def _sketch_step(ids, counts, sketch_state):
    """FrequencySketch.add, then age_if_due: adds ``counts`` (as int32, as the torch sketch
    does) to the sketch, reads each id's estimate (the least of its counters once the whole
    batch is in), and halves every counter once ``sample_size`` additions have accumulated.
    Returns the estimates and whether it halved (the stored scores must halve too, LFU.age).

    Row by row, each row's additions then its reads: a row's counters change only by its own
    additions, so its reads may follow them at once, while its lines are still near."""
    sketch, salts, additions, sample_size = sketch_state
    width = sketch.shape[1]
    n = ids.size
    cells = np.empty(n, np.int32)  # widths are below 2**31
    least = np.full(n, np.iinfo(np.int32).max, np.int64)
    for d in range(sketch.shape[0]):
        row = sketch[d]
        _sketch_cells(ids, salts[d], width, cells)
        for i in range(n):
            if i + IDS_AHEAD < n:
                prefetch(row, cells[i + IDS_AHEAD])
            row[cells[i]] += np.int32(counts[i])
        for i in range(n):
            if i + IDS_AHEAD < n:
                prefetch(row, cells[i + IDS_AHEAD])
            least[i] = min(least[i], row[cells[i]])
    added = np.int64(0)
    for i in range(n):
        added += np.int32(counts[i])
    additions[0] += added
    if additions[0] < sample_size:
        return least, False
    for d in range(sketch.shape[0]):
        for c in range(width):
            sketch[d, c] >>= 1
    additions[0] = 0
    return least, True


# ---------------------------------------------------------------------- 2. find and lock
@compiled
def _find_and_lock(ids, slot_of, state, sets, ways, scores, slots, miss_pos, miss_set):
    """Fills ``slots`` (-1 for a miss) for every id; locks each hit's way and gives it its
    score; writes the misses' positions (ascending) and sets to ``miss_pos``/``miss_set`` and
    returns how many there are. ``slot_of`` is the slot index, or empty: then the tags of the
    id's set are compared."""
    tags, stamps, _, locks = state
    indexed = slot_of.size > 0
    n_miss = 0
    for i in range(ids.size):
        if indexed and i + 2 * IDS_AHEAD < ids.size:  # the index entry, for the line below
            prefetch(slot_of, ids[i + 2 * IDS_AHEAD])
        if i + IDS_AHEAD < ids.size:  # the lock and score of a hit, or the tags of a set
            ahead = ids[i + IDS_AHEAD]
            if indexed:
                prefetch(locks, slot_of[ahead])  # -1 (a miss) is a harmless address
                prefetch(stamps, slot_of[ahead])
            else:
                first = _set_of(ahead, sets) * ways
                for way in range(first, first + ways, 8):  # 8 tags a 64-byte line
                    prefetch(tags, way)
        row = ids[i]
        s = np.int64(-1)
        slot = np.int64(-1)
        if indexed:  # one read, and only the misses need their set
            slot = np.int64(slot_of[row])
        else:  # a compare with every way (a row is in at most one), without a branch
            s = _set_of(row, sets)
            first = np.uint64(s * ways)  # unsigned: no wraparound, so the loop vectorises
            match = 0
            for w in range(ways):
                match = max(match, (w + 1) * (tags[first + np.uint64(w)] == row))
            slot = s * ways + match - 1 if match else np.int64(-1)
        slots[i] = slot
        if slot >= 0:
            locks[slot] += 1
            stamps[slot] = scores[i]
        else:
            miss_pos[n_miss] = i
            miss_set[n_miss] = _set_of(row, sets) if indexed else s
            n_miss += 1
    return n_miss


# ----------------------------------------------------------------------- 4. victims, fills
@compiled
def _bit_length(x):
    """int.bit_length of a non-negative int64."""
    bits = 0
    while x > 0:
        x >>= 1
        bits += 1
    return bits


@compiled
def _least_pair(tags, stamps, locks, base, ways):
    """The evictable way of the set at ``base`` with the least (key, way), comparing pairs;
    the ways filled in this step are locked by then, so they are no longer candidates."""
    best = -1
    best_key = _TAKEN
    for w in range(ways):
        if locks[base + w] > 0:
            continue
        key = np.int64(-1) if tags[base + w] == _EMPTY else stamps[base + w]
        if best < 0 or key < best_key:
            best, best_key = w, key
    return best


@compiled
def _fill_sets(grouped, ids, state, ways, scores, slots, fill_at):
    """Per touched set, fills its evictable ways with its misses (``grouped``, see
    ``cache_plan.group_by_set``) in ascending position order: the ways unlocked (this step's
    hits are locked already), ranked by key (-1 when empty, else the score), ties by way index. A
    miss beyond them stays a conflict miss (slot -1). Each fill notes its victim and whether it
    must be written back (at its position in ``fill_at``), then the way takes the row's tag, a
    clean bit, a lock and its score. Returns the number of fills."""
    tags, stamps, dirty, locks = state
    victim_at, dirty_at = fill_at
    keys = np.empty(ways, np.int64)  # one set's packed keys
    # the way index takes the low bits of a packed key: 6 up to 64 ways, more for wider sets
    shift = max(6, _bit_length(ways - 1))
    packed_max = (np.int64(1) << (63 - shift)) - 3  # _PACKED_MAX at 6 bits
    placed = 0
    g = 0
    while g < grouped.size:
        if g + MISSES_AHEAD < grouped.size:  # the ways of a set some misses ahead
            first = (grouped[g + MISSES_AHEAD] >> 32) * ways
            for way in range(first, first + ways, 8):  # 8 tags or scores, 16 locks a line
                prefetch(tags, way)
                prefetch(stamps, way)
                prefetch(locks, way)
                prefetch(dirty, way)
        s = grouped[g] >> 32
        end = g + 1
        while end < grouped.size and grouped[end] >> 32 == s:
            end += 1
        base = s * ways
        # One loop that vectorises: the evictable ways' keys packed as (key + 1) * 64 + way,
        # distinct and in (key, way) order, so that each choice is a minimum over at most 64
        # words. Keys outside the packed range (no policy here makes them) are compared as
        # pairs instead. The ways are indexed unsigned: a signed index is checked for
        # wraparound lane by lane, which turns every load of the loop into a gather (a third
        # of the fills' time).
        n_free = 0
        lo = _TAKEN
        hi = -_TAKEN
        ubase = np.uint64(base)
        for w in range(ways):
            at = ubase + np.uint64(w)
            stamp = stamps[at]  # read whatever the tag: a load under a condition is a gather
            key = np.int64(-1) if tags[at] == _EMPTY else stamp
            free = locks[at] <= 0
            n_free += free
            lo = min(lo, key if free else _TAKEN)
            hi = max(hi, key if free else -_TAKEN)
            keys[w] = ((key + 1) << shift) | w if free else _TAKEN
        take = min(end - g, n_free)
        packed = lo >= -1 and hi <= packed_max
        # many misses into a wide set: its keys sorted once, rather than a minimum per miss
        ranked = np.sort(keys) if packed and take > 8 and ways > 64 else keys[:0]
        for r in range(take):
            way = -1
            if ranked.size:
                way = ranked[r] & ((1 << shift) - 1)
            elif packed:
                least = _TAKEN
                for w in range(ways):
                    least = min(least, keys[w])
                way = least & ((1 << shift) - 1)
                keys[way] = _TAKEN
            else:
                way = _least_pair(tags, stamps, locks, base, ways)
            if g + r + IDS_AHEAD < grouped.size:  # a big batch's arrays outgrow the caches
                ahead = grouped[g + r + IDS_AHEAD] & _LOW32
                prefetch(ids, ahead)
                prefetch(scores, ahead)
                prefetch(slots, ahead)
                prefetch(victim_at, ahead)
                prefetch(dirty_at, ahead)
            pos = grouped[g + r] & _LOW32
            slot = base + way
            victim = tags[slot]
            victim_at[pos] = victim
            dirty_at[pos] = dirty[slot] and victim != _EMPTY
            tags[slot] = ids[pos]
            dirty[slot] = False
            locks[slot] += 1
            stamps[slot] = scores[pos]
            slots[pos] = slot
        placed += take
        g = end
    return placed


@compiled
def _list_fills(ids, miss_pos, n_fill, slots, fill_at, slot_of):
    """The fills in ascending position order: ``(index, slots, victim ids, victim dirty)``;
    and the slot index, where there is one (``slot_of`` not empty), follows them: each victim
    leaves it (never a row of the batch: those are hits), each filled row enters it. (Here
    rather than in :func:`_fill_sets`: in position order the rows ascend, so their entries are
    written in address order.)"""
    victim_at, dirty_at = fill_at
    indexed = slot_of.size > 0
    fill_index = np.empty(n_fill, np.int64)
    fill_slots = np.empty(n_fill, np.int64)
    victims = np.empty(n_fill, np.int64)
    victim_dirty = np.empty(n_fill, np.bool_)
    f = 0
    for k in range(miss_pos.size):
        if indexed and k + IDS_AHEAD < miss_pos.size:  # the entries of both rows
            ahead = miss_pos[k + IDS_AHEAD]
            prefetch(slot_of, ids[ahead])
            if slots[ahead] >= 0 and victim_at[ahead] != _EMPTY:  # (a conflict's: unwritten)
                prefetch(slot_of, victim_at[ahead])
        pos = miss_pos[k]
        slot = slots[pos]
        if slot < 0:
            continue
        victim = victim_at[pos]
        fill_index[f] = pos
        fill_slots[f] = slot
        victims[f] = victim
        victim_dirty[f] = dirty_at[pos]
        if indexed:
            if victim != _EMPTY:
                slot_of[victim] = -1
            slot_of[ids[pos]] = slot
        f += 1
    return fill_index, fill_slots, victims, victim_dirty


# ------------------------------------------------------------------- counters, ageing
@compiled
def _count(counters, counts, n, n_miss, victims, victim_dirty):
    """Adds the step to the cache's counters (the order of ``stats.py``)."""
    requested = np.int64(0)
    for i in range(counts.size):
        requested += counts[i]
    evicted = 0
    for f in range(victims.size):
        if victims[f] != _EMPTY:
            evicted += 1
    counters[st.REQUESTS] += requested
    counters[st.UNIQUE] += n
    counters[st.HITS] += n - n_miss
    counters[st.MISSES] += n_miss
    counters[st.CONFLICTS] += n_miss - victims.size
    counters[st.EVICTIONS] += evicted
    counters[st.WRITEBACKS] += np.count_nonzero(victim_dirty)


@compiled
def _age(stamps):
    """LFU.age, when the sketch halved: halves every stored score."""
    for slot in range(stamps.size):
        stamps[slot] >>= 1


# ------------------------------------------------------------------------- the step
@compiled
def _place(ids, counts, scores, aged, slot_of, state, counters, sets, ways):
    """The step but the sketch's part (given the ``scores`` and whether the sketch ``aged``),
    in place; returns the ``Lookup`` arrays but ids: ``slots, fill_index, fill_slots,
    victim_ids, victim_dirty, hit``."""
    n = ids.size
    slots = np.empty(n, np.int64)
    miss_pos = np.empty(n, np.int64)
    miss_set = np.empty(n, np.int64)
    n_miss = _find_and_lock(ids, slot_of, state, sets, ways, scores, slots, miss_pos, miss_set)
    hit = slots >= 0
    miss_pos, miss_set = miss_pos[:n_miss], miss_set[:n_miss]
    grouped = group_by_set(miss_pos, miss_set, sets)
    fill_at = np.empty(n, np.int64), np.empty(n, np.bool_)  # victims by position
    n_fill = _fill_sets(grouped, ids, state, ways, scores, slots, fill_at)
    fills = _list_fills(ids, miss_pos, n_fill, slots, fill_at, slot_of)
    _count(counters, counts, n, n_miss, fills[2], fills[3])
    if aged:
        _age(state[1])
    return slots, fills[0], fills[1], fills[2], fills[3], hit


@compiled
def _scores(ids, counts, step, frequency, sketch_state):
    """``(scores, aged)`` of a step's ids: FREQUENCY (LFU), the sketch's estimates once the
    batch is in it and whether it halved; STEP (LRU), the step."""
    if frequency:
        return _sketch_step(ids, counts, sketch_state)
    return np.full(ids.size, step, np.int64), False


@compiled
def _step(ids, counts, slot_of, state, counters, sets, ways, step, frequency, sketch_state):
    """The whole step in place (see the module docstring); returns what :func:`_place` does.
    (The sketch halves before the ways are placed rather than after, as the torch step does:
    the same, as neither part reads what the other writes.)"""
    scores, aged = _scores(ids, counts, step, frequency, sketch_state)
    return _place(ids, counts, scores, aged, slot_of, state, counters, sets, ways)


@compiled
def _commit(ids, counts, plan, slot_of, state, counters, step, frequency, sketch_state):
    """``SetAssociativeCache.commit`` of ``plan`` (``slots, fill_index, fill_slots, victim_ids,
    victim_dirty, hit``, made on the current state) in place: the scores, a lock and the score
    of every placed id, the fills' tags, clean bits and index entries, counters, ageing."""
    slots, fill_index, fill_slots, victims, victim_dirty, hit = plan
    scores, aged = _scores(ids, counts, step, frequency, sketch_state)
    tags, stamps, dirty, locks = state
    for i in range(ids.size):
        if slots[i] >= 0:
            stamps[slots[i]] = scores[i]
            locks[slots[i]] += 1
    for f in range(victims.size):  # the victims leave the index before the fills enter it
        if slot_of.size > 0 and victims[f] != _EMPTY:
            slot_of[victims[f]] = -1
    for f in range(fill_index.size):
        row, slot = ids[fill_index[f]], fill_slots[f]
        tags[slot], dirty[slot] = row, False
        if slot_of.size > 0:
            slot_of[row] = slot
    _count(counters, counts, ids.size, ids.size - np.count_nonzero(hit), victims, victim_dirty)
    if aged:
        _age(stamps)


@compiled
def _unlock(locks, slots):
    """Takes one lock off each slot >= 0; changes nothing and returns False if a slot lies
    beyond the cache."""
    for slot in slots:
        if slot >= locks.size:
            return False
    for slot in slots:
        if slot >= 0:
            locks[slot] -= 1
    return True


# ------------------------------------------------------------------------ from Python
# False once numba failed to compile the step (an untested numba or LLVM, say): every cache
# keeps to the torch step from then on.
_compiles = [_compiled.COMPILED]


def _compile_failed(what: str, instead: str, error: Exception) -> None:
    """Keeps every cache to the torch step from now on, with a warning saying why."""
    _compiles[0] = False
    msg = f"numba cannot compile the {what}, using the {instead}: {error}"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _flat(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a state tensor, flat by slot (shares its memory)."""
    return t.view(-1).numpy()


@dataclass(frozen=True)
class Scored:
    """A batch scored ahead of its step (:meth:`CompiledCache.score`), waiting for the rest
    (:meth:`CompiledCache.place`)."""

    ids: np.ndarray  # the unique ids, ascending (int64)
    counts: np.ndarray  # their counts (int64)
    scores: np.ndarray | None  # LFU: their estimates; LRU: None (the step, known at place)
    aged: bool  # the sketch halved after this batch: the stored scores halve after its placing


class CompiledCache(SetAssociativeCache):
    """:class:`~tierstore.cache.SetAssociativeCache` that steps and releases with the compiled
    loops above where they apply (:meth:`supports`, :meth:`takes`) and with the torch
    step it inherits elsewhere: the same state and ``Lookup``, bit for bit. The CPU's L1 where
    numba is installed (``cpu.new_cache`` picks it); arguments as the base class's."""

    def supports(self, ids: torch.Tensor, counts: torch.Tensor) -> bool:
        """Whether :meth:`lookup` (and :meth:`commit`) steps this batch compiled: :meth:`takes`
        the ids, its policy declares a ``compiled_score`` (``STEP`` with no sketch, or
        ``FREQUENCY`` with its sketch: LRU, LFU), and the counts are integers on the CPU."""
        rule = self.policy.compiled_score
        if rule is None or (self.sketch is not None) != (rule is CompiledScore.FREQUENCY):
            return False
        counts_fit = counts.dtype in (torch.int64, torch.int32) and counts.shape == ids.shape
        return self.takes(ids) and counts_fit and counts.device.type == "cpu"

    def _state(self) -> tuple:
        """The per-way state for :func:`_place`: tags, stamps, dirty bits, locks, by slot."""
        return _flat(self.tags), _flat(self.stamps), _flat(self.dirty), _flat(self.locks)

    def _sketch_state(self) -> tuple:
        """The sketch's arrays for :func:`_step` (placeholders of the same types under LRU)."""
        sketch = self.sketch
        if sketch is None:
            return np.zeros((1, 1), np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64), 0
        additions = sketch.additions.view(1).numpy()  # the 0-d tensor's memory, as one element
        return sketch.counters.numpy(), sketch.salts.numpy(), additions, sketch.sample_size

    def _checked_index(self, ids: np.ndarray) -> np.ndarray:
        """The slot index's numpy view (empty where the cache keeps none), once ``ids`` are
        known to lie in it: else IndexError, as the torch step's gather raises, before any
        change (compiled code would read and write outside it)."""
        if self._slot_of is None:
            return _NO_INDEX
        bound = self._slot_of.numel()
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= bound):
            raise IndexError(f"ids must lie in [0, {bound}) (the cache's id_bound)")
        return self._slot_of.numpy()

    def lookup(self, ids: torch.Tensor, counts: torch.Tensor, strict: bool = False) -> Lookup:
        """:meth:`SetAssociativeCache.lookup`: where :meth:`supports` holds and not ``strict``,
        in compiled code, in place on the cache's tensors; else, or if numba cannot compile
        the step (a ``RuntimeWarning``, nothing changed), the torch step."""
        if strict or not self.supports(ids, counts):
            return super().lookup(ids, counts, strict)
        ids_np = np.ascontiguousarray(ids.numpy())
        counts_np = np.ascontiguousarray(counts.numpy(), dtype=np.int64)
        try:
            out = _step(ids_np, counts_np, self._checked_index(ids_np), self._state(),
                        self.counters.numpy(), self.sets, self.ways, self.step + 1,
                        self.sketch is not None, self._sketch_state())  # fmt: skip
        except NumbaError as e:  # raised while compiling, before anything ran: nothing changed
            _compile_failed("cache step", "torch step", e)
            return super().lookup(ids, counts, strict)
        self.step += 1
        return Lookup(ids, *(torch.from_numpy(a) for a in out))

    def plan(self, ids: torch.Tensor, strict: bool = False) -> Lookup:
        """:meth:`SetAssociativeCache.plan` in compiled loops (``cache_plan.py``, any policy)
        for int64 ids on the CPU; else, or where numba cannot compile them, the torch plan."""
        if not self.takes(ids):
            return super().plan(ids, strict)
        ids_np = np.ascontiguousarray(ids.numpy())
        slot_of = self._checked_index(ids_np)
        slots, hit = np.empty(ids_np.size, np.int64), np.empty(ids_np.size, np.bool_)
        state = _flat(self.tags), _flat(self.stamps), _flat(self.locks)
        try:
            short = plan_slots(ids_np, slot_of, *state, self.sets, self.ways, slots, hit)
        except NumbaError as e:  # raised while compiling, before anything ran
            _compile_failed("cache's plan", "torch plan", e)
            return super().plan(ids, strict)
        if strict and short > 0:
            self._refuse(ids_np.size, int(short))
        return self._planned(ids, torch.from_numpy(slots), torch.from_numpy(hit))

    def find(self, ids: torch.Tensor, sets: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`SetAssociativeCache.find` in one compiled pass (``cache_plan.find_slots``)
        for a cache without a slot index, where :meth:`takes` ``ids``."""
        if self._slot_of is not None or not self.takes(ids):
            return super().find(ids, sets)
        slots = np.empty(ids.numel(), np.int64)
        try:
            find_slots(np.ascontiguousarray(ids.numpy()), _flat(self.tags), self.sets,
                       self.ways, slots)  # fmt: skip
        except NumbaError as e:  # raised while compiling, before anything ran
            _compile_failed("cache's find", "torch find", e)
            return super().find(ids, sets)
        return torch.from_numpy(slots)

    def commit(self, plan: Lookup, counts: torch.Tensor) -> Lookup:
        """:meth:`SetAssociativeCache.commit` in one compiled pass where :meth:`supports` holds
        (the torch form's two dozen small ops cost L2 over an SSD tier more than the work)."""
        if not self.supports(plan.ids, counts):
            return super().commit(plan, counts)
        fields = (plan.ids, counts.long(), plan.slots, plan.fill_index, plan.fill_slots,
                  plan.victim_ids, plan.victim_dirty, plan.hit)  # fmt: skip
        ids, counts_np, *rest = (np.ascontiguousarray(t.numpy()) for t in fields)
        slot_of = _NO_INDEX if self._slot_of is None else self._slot_of.numpy()
        try:
            _commit(ids, counts_np, tuple(rest), slot_of, self._state(), self.counters.numpy(),
                    self.step + 1, self.sketch is not None, self._sketch_state())  # fmt: skip
        except NumbaError as e:  # raised while compiling, before anything ran
            _compile_failed("cache's commit", "torch commit", e)
            return super().commit(plan, counts)
        self.step += 1
        return plan

    def score(self, ids: np.ndarray, counts: np.ndarray) -> Scored:
        """The step's sketch part for a batch's unique ``ids`` (ascending) and ``counts``,
        ahead of the rest (:meth:`place`): under LFU adds the batch to the sketch, reads the
        estimates and halves the sketch when due (as :meth:`lookup`); under LRU nothing.
        Raises IndexError before any change if an id lies outside the slot index.

        Placing never touches the sketch and scoring nothing else, so a replay may score batch
        ``k + 1`` on one thread while batch ``k`` is placed on another: the state of
        :meth:`lookup` batch after batch, if batches are scored and placed in one order, each
        once. Call only where :meth:`supports` holds, after a :meth:`lookup` has compiled the
        step (so that numba cannot fail between a batch's scoring and its placing)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        self._checked_index(ids)
        if self.sketch is None:
            return Scored(ids, counts, None, False)
        return Scored(ids, counts, *_sketch_step(ids, counts, self._sketch_state()))

    def place(self, scored: Scored) -> tuple[torch.Tensor, ...]:
        """The rest of the step of a batch :meth:`score` scored (the next one it scored): what
        :meth:`lookup` does but the sketch's part; returns the ``Lookup`` fields after ``ids``
        (``slots, fill_index, fill_slots, victim_ids, victim_dirty, hit``) as tensors."""
        n = scored.ids.size
        scores = np.full(n, self.step + 1, np.int64) if scored.scores is None else scored.scores
        slot_of = _NO_INDEX if self._slot_of is None else self._slot_of.numpy()
        out = _place(scored.ids, scored.counts, scores, scored.aged, slot_of, self._state(),
                     self.counters.numpy(), self.sets, self.ways)  # fmt: skip
        self.step += 1
        return tuple(torch.from_numpy(a) for a in out)

    def takes(self, ids: torch.Tensor) -> bool:
        """Whether :meth:`plan`, :meth:`find` and :meth:`release` run compiled for ``ids`` (or
        slots): ``cache.COMPILED_STEP`` is on, numba is installed, and the cache and ``ids``
        (int64, 1-D) are on the CPU."""
        usable = cache_module.COMPILED_STEP and _compiles[0] and self.device.type == "cpu"
        return usable and ids.dtype == torch.int64 and ids.dim() == 1 and ids.device.type == "cpu"

    def release(self, slots: torch.Tensor) -> None:
        """:meth:`SetAssociativeCache.release`, in one compiled pass where :meth:`takes` the
        slots (the torch form's index_add_ wakes torch's thread pool for a few microseconds of
        work)."""
        if not self.takes(slots):
            return super().release(slots)
        if not _unlock(_flat(self.locks), np.ascontiguousarray(slots.numpy())):
            raise IndexError(f"slots must lie below the cache's {self.capacity} slots")
