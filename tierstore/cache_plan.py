"""Compiled loops that find a batch's ways without changing the cache: the misses grouped by set
(for the compiled step, ``cache_compiled.py``, and for the plan below), and the plan of a step
(:meth:`SetAssociativeCache.plan`: which ids hit, which way each miss takes, and so what it
evicts, changing nothing) for ``CompiledCache.plan``, and the slots of cached ids for
``CompiledCache.find``.

L2 over an SSD tier plans each batch, reads its misses from L3, then commits
(``host_cache.py``): the torch plan's thirty-odd passes were the largest part of that tier's
host work a step after the L3 reads (1.4 ms a table of the DLRM-shaped step at half scale on
the 2-core VM; these loops plan 2 048 ids in a 1 M-row L2 in 0.46-0.54 ms against 1.49:
``bench/exp/plan_cost.py``). ``tests/test_cache_compiled.py`` checks the plan equal to the
torch plan.

The plan's passes: each id's slot (-1 for a miss), the hits and the misses grouped by set (the
hits' ways, the misses' positions ascending), and per touched set, in set order, a scan of its
ways for the evictable ones (not locked, not hit by this batch), whose key is -1 for an empty
way and else its score, then a scan for each of its misses in position order, which takes the
least (key, way) left. The plan depends on the scores alone, so on no policy. Random reads are
prefetched ahead, as in the step.
"""

from __future__ import annotations

import numpy as np

from .cache import EMPTY
from .compiled import compiled, prefetch
from .hashing import set_index_compiled as _set_of

_EMPTY = np.int64(EMPTY)
_LOW32 = np.int64(0xFFFFFFFF)
_TAKEN = np.int64((1 << 63) - 1)  # above every key: a way that is no choice
# A counting sort of the misses by set costs a pass over the sets: worth it unless the sets
# outnumber the misses by more than this (then a sort of packed keys is cheaper).
_SETS_PER_MISS = 8
# Prefetch distances: the passes read memory at random (the sketch, the ways of a set), and a
# loop's own reads come too late to overlap enough of them.
IDS_AHEAD = 64
MISSES_AHEAD = 16


@compiled
def _group_by_counting(pos, sets_of, sets):
    """Keys ``set * 2**32 + pos`` in ascending order, by a counting sort over the sets (stable:
    ``pos`` already ascends)."""
    start = np.zeros(sets + 1, np.int64)
    for s in sets_of:
        start[s + 1] += 1
    for s in range(sets):
        start[s + 1] += start[s]
    grouped = np.empty(sets_of.size, np.int64)
    for k in range(sets_of.size):
        s = sets_of[k]
        grouped[start[s]] = (s << 32) | pos[k]
        start[s] += 1
    return grouped


@compiled
def _group_by_sorting(pos, sets_of):
    """As :func:`_group_by_counting`, by sorting the keys (distinct: sets are below 2**31,
    positions below 2**32)."""
    grouped = (sets_of << 32) | pos
    grouped.sort()
    return grouped


@compiled
def group_by_set(pos, sets_of, sets):
    """Entries ``pos`` (ascending, below 2**32) grouped by their set ``sets_of``, ascending
    within a set, as keys ``set * 2**32 + pos`` in ascending order, by the cheaper method."""
    if sets <= _SETS_PER_MISS * sets_of.size:
        return _group_by_counting(pos, sets_of, sets)
    return _group_by_sorting(pos, sets_of)


@compiled
def find_slots(ids, tags, sets, ways, slots):
    """Fills ``slots`` (n,) with the slot of each of ``ids`` (n,) among the per-slot ``tags``
    of its set, -1 where it is not cached (:meth:`SetAssociativeCache.find` of a cache
    without a slot index). Changes nothing."""
    for i in range(ids.size):
        if i + IDS_AHEAD < ids.size:  # the tags of a set
            first = _set_of(ids[i + IDS_AHEAD], sets) * ways
            for way in range(first, first + ways, 8):  # 8 tags a 64-byte line
                prefetch(tags, way)
        base = _set_of(ids[i], sets) * ways
        slots[i] = -1
        for w in range(ways):
            if tags[base + w] == ids[i]:
                slots[i] = base + w
                break


@compiled
def plan_slots(ids, slot_of, tags, stamps, locks, sets, ways, slots, hit):
    """Fills ``slots`` (U,) with the slot each id has after the step (-1: a conflict miss)
    and ``hit`` (U,) with whether it was cached before it, for ``ids`` (U,) with their slot
    index ``slot_of`` (empty where the cache keeps none) and the cache's per-slot ``tags``,
    ``stamps`` and ``locks``. Returns the most misses any set could not place (<= 0 when every
    miss found a way)."""
    n = ids.size
    indexed = slot_of.size > 0
    pos = np.empty(n, np.int64)  # the misses' positions, then the hits' ways
    pos_set = np.empty(n, np.int64)  # their sets
    if indexed:
        for i in range(n):
            if i + 2 * IDS_AHEAD < n:  # the index entry, for the line below
                prefetch(slot_of, ids[i + 2 * IDS_AHEAD])
            slots[i] = slot_of[ids[i]]
    else:
        find_slots(ids, tags, sets, ways, slots)
    n_miss = 0
    for i in range(n):
        hit[i] = slots[i] >= 0
        if slots[i] < 0:
            pos[n_miss] = i
            pos_set[n_miss] = _set_of(ids[i], sets)
            n_miss += 1
    misses = group_by_set(pos[:n_miss], pos_set[:n_miss], sets)
    n_hit = 0
    for i in range(n):  # the hits' ways by set: this step uses them, so they are no victims
        if hit[i]:
            pos[n_hit] = slots[i] % ways
            pos_set[n_hit] = slots[i] // ways
            n_hit += 1
    hits = group_by_set(pos[:n_hit], pos_set[:n_hit], sets)  # ways need not ascend: no matter
    short = np.int64(-ways)
    key = np.empty(ways, np.int64)  # the set's ways' keys; _TAKEN: no (more) choice
    used = np.zeros(ways, np.bool_)  # the set's ways this batch hits
    a = 0
    h = 0  # the hits in set order: a set's lie together, after the sets before it
    while a < n_miss:
        if a + MISSES_AHEAD < n_miss:  # the ways of a set some misses ahead
            first = (misses[a + MISSES_AHEAD] >> np.int64(32)) * ways
            for way in range(first, first + ways, 8):
                prefetch(tags, way)
                prefetch(stamps, way)
            for way in range(first, first + ways, 16):  # 16 locks a line
                prefetch(locks, way)
        s = misses[a] >> np.int64(32)
        b = a
        while b < n_miss and (misses[b] >> np.int64(32)) == s:
            b += 1
        base = s * ways
        while h < n_hit and (hits[h] >> np.int64(32)) < s:
            h += 1
        while h < n_hit and (hits[h] >> np.int64(32)) == s:
            used[hits[h] & _LOW32] = True
            h += 1
        free = 0
        for w in range(ways):
            slot = base + w
            if locks[slot] > 0 or used[w]:
                key[w] = _TAKEN
                used[w] = False
            else:
                key[w] = np.int64(-1) if tags[slot] == _EMPTY else stamps[slot]
                free += 1
        short = max(short, np.int64(b - a - free))
        # the set's misses, in position order, take its best ways: the least (key, way) first
        # (a set's misses are few: a scan each beats sorting its ways)
        for j in range(min(b - a, free)):
            best = 0
            for w in range(1, ways):
                if key[w] < key[best]:
                    best = w
            slots[misses[a + j] & _LOW32] = base + best
            key[best] = _TAKEN
        a = b
    return short
