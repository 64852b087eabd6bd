"""The plan of a cache step (:meth:`SetAssociativeCache.plan`: which ids hit, which way each
miss takes, and so what it evicts, changing nothing) as compiled loops, for
``CompiledCache.plan``. L2 over an SSD tier plans each batch, reads its misses from L3, then
commits (``host_cache.py``): the torch plan's thirty-odd passes were the largest part of that
tier's host work a step after the L3 reads (1.4 ms a table of the DLRM-shaped step at half
scale on the 2-core VM; these loops plan 2 048 ids in a 1 M-row L2 in 0.54 ms against 1.33:
``bench/exp/plan_cost.py``). ``tests/test_cache_compiled.py`` checks it equal to the torch
plan.

Three passes: each id's slot (-1 for a miss), the hits sorted by slot and the misses by set
then position, and per touched set (in set order, so that its hits come next in theirs) a
scan of its ways for the evictable ones (not locked, not hit by this batch), whose key is -1
for an empty way and else its score, then a scan for each of its misses in position order,
which takes the least (key, way) left. The plan depends on the scores alone, so on no policy.
"""

from __future__ import annotations

import numpy as np

from .cache import EMPTY
from .compiled import compiled
from .hashing import set_index_compiled as _set_of

_EMPTY = np.int64(EMPTY)
_LOW32 = np.int64(0xFFFFFFFF)
_TAKEN = np.int64((1 << 63) - 1)  # above every key: a way that is no choice


@compiled
def plan_slots(ids, slot_of, tags, stamps, locks, sets, ways, slots, hit):
    """Fills ``slots`` (U,) with the slot each id has after the step (-1: a conflict miss)
    and ``hit`` (U,) with whether it was cached before it, for ``ids`` (U,) with their slot
    index ``slot_of`` (empty where the cache keeps none) and the cache's per-slot ``tags``,
    ``stamps`` and ``locks``. Returns the most misses any set could not place (<= 0 when every
    miss found a way)."""
    n = ids.size
    n_miss = 0
    n_hit = 0
    for i in range(n):
        s = np.int64(-1)
        if slot_of.size:
            s = np.int64(slot_of[ids[i]])
        else:
            base = _set_of(ids[i], sets) * ways
            for w in range(ways):
                if tags[base + w] == ids[i]:
                    s = base + w
                    break
        slots[i] = s
        hit[i] = s >= 0
        if s >= 0:
            n_hit += 1
        else:
            n_miss += 1
    hit_slots = np.empty(n_hit, np.int64)  # the ways this step uses: no victims
    keys = np.empty(n_miss, np.int64)  # set * 2**32 + position: by set, then position
    h = 0
    m = 0
    for i in range(n):
        if hit[i]:
            hit_slots[h] = slots[i]
            h += 1
        else:
            keys[m] = (_set_of(ids[i], sets) << np.int64(32)) | np.int64(i)
            m += 1
    hit_slots.sort()
    keys.sort()
    short = np.int64(-ways)
    key = np.empty(ways, np.int64)  # the set's ways' keys; _TAKEN: no (more) choice
    used = np.zeros(ways, np.bool_)  # the set's ways this batch hits
    a = 0
    h = 0  # the hits in slot order: a set's lie together, after the sets before it
    while a < n_miss:
        s = keys[a] >> np.int64(32)
        b = a
        while b < n_miss and (keys[b] >> np.int64(32)) == s:
            b += 1
        base = s * ways
        while h < n_hit and hit_slots[h] < base:
            h += 1
        while h < n_hit and hit_slots[h] < base + ways:
            used[hit_slots[h] - base] = True
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
            slots[keys[a + j] & _LOW32] = base + best
            key[best] = _TAKEN
        a = b
    return short
