"""W-TinyLFU (Einziger, Friedman and Manes, 2017): an LRU window in front of a segmented LRU
main cache, with admission to the main cache decided by a frequency sketch.

As built here (written from the paper's description):

- The window is an LRU of 1 % of the capacity (at least one row); the main cache is an SLRU
  of the rest, 80 % of it for the protected segment and the remainder for probation.
- Every request adds one to the id's count in a count-min sketch: 4 rows of 4-bit counters
  (saturating at 15), each ``width`` wide (the capacity rounded up to a power of two, at least
  16); after ``10 x capacity`` additions every counter is halved (aging). The estimate is the
  least of the 4 counters. Row ``j`` indexes with 32 bits of one of two splitmix64 words of
  the id (see :func:`sketch_slots`).
- A hit in the window refreshes it there; a hit in probation moves it to protected (whose
  oldest falls back to probation when protected is over its share); a hit in protected
  refreshes it.
- A miss inserts into the window. When the window overflows, its oldest is a candidate for the
  main cache: admitted if the main cache has room, else only if its estimate beats (strictly)
  that of the main cache's victim (probation's oldest, or protected's when probation is
  empty), which it then replaces; otherwise the candidate is dropped.
No doorkeeper (bloom filter) is used.

The state is flat buffers, and one compiled loop (:mod:`tierstore.compiled`) runs the
requests: a map (:mod:`.keymap`) from id to node, and the three LRU lists as doubly linked
lists over the nodes; a node keeps its id's sketch slots for the admission test.
"""

from __future__ import annotations

import numpy as np

from ...compiled import compiled, int_buffer
from ...hashing import mix64_np
from .base import ReferencePolicy
from .keymap import find, new_map, put, remove

_DEPTH = 4
_SEEDS = (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)
# The three lists: ``lists[3 l : 3 l + 3]`` holds list ``l``'s oldest node, newest node and
# length.
WINDOW, PROBATION, PROTECTED = 0, 1, 2
# A node is a 64-byte record of ``nodes``, its fields at these offsets: the id, the nodes before
# and after it in its list (after: the next free node, for a free one), its list, and the id's 4
# sketch slots.
_RECORD, _ID, _PREV, _AFTER, _LIST, _SLOTS = 8, 0, 1, 2, 3, 4
# ``meta``: sketch additions since the last aging, the first free node.


def sketch_slots(keys: np.ndarray, width: int) -> np.ndarray:
    """The 4 counter slots of every key, shape ``(4, len(keys))``: row ``j`` of the sketch
    at offset ``j * width``, indexed by 32 bits of ``mix64(key + seed)``."""
    u = keys.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        words = [mix64_np(u + np.uint64(s)) for s in _SEEDS]
    mask = np.uint64(width - 1)
    rows = [(words[j // 2] >> np.uint64(32 * (j % 2))) & mask for j in range(_DEPTH)]
    return np.stack([r.astype(np.int64) + j * width for j, r in enumerate(rows)])


@compiled
def _unlink(nodes, node, lists):
    """Takes ``node`` out of its list."""
    r = _RECORD * node
    which, p, n = nodes[r + _LIST], nodes[r + _PREV], nodes[r + _AFTER]
    if p >= 0:
        nodes[_RECORD * p + _AFTER] = n
    else:
        lists[3 * which] = n
    if n >= 0:
        nodes[_RECORD * n + _PREV] = p
    else:
        lists[3 * which + 1] = p
    lists[3 * which + 2] -= 1


@compiled
def _append(nodes, node, lists, which):
    """Puts ``node`` at the newest end of list ``which``."""
    r = _RECORD * node
    last = lists[3 * which + 1]
    nodes[r + _PREV], nodes[r + _AFTER], nodes[r + _LIST] = last, -1, which
    if last >= 0:
        nodes[_RECORD * last + _AFTER] = node
    else:
        lists[3 * which] = node
    lists[3 * which + 1] = node
    lists[3 * which + 2] += 1


@compiled
def _estimate(sketch, nodes, node):
    """The least of the node's 4 counters."""
    r = _RECORD * node + _SLOTS
    a, b = sketch[nodes[r]], sketch[nodes[r + 1]]
    c, d = sketch[nodes[r + 2]], sketch[nodes[r + 3]]
    return min(min(a, b), min(c, d))


@compiled
def _drop(nodes, node, table, meta):
    """Forgets the id of ``node`` and frees the node."""
    remove(table, find(table, nodes[_RECORD * node + _ID]))
    nodes[_RECORD * node + _AFTER] = meta[1]
    meta[1] = node


@compiled
def _run(keys, hit, s0, s1, s2, s3, table, nodes, lists, sketch, meta, window_cap, main_cap,
         protected_cap, sample):  # fmt: skip
    """Feeds ``keys`` (their sketch slots in ``s0..s3``) in order; returns the hits, and sets
    ``hit[i]`` to whether ``keys[i]`` hit."""
    hits = 0
    for i in range(len(keys)):
        x = keys[i]
        a, b, c, d = s0[i], s1[i], s2[i], s3[i]
        for k in (a, b, c, d):
            if sketch[k] < 15:
                sketch[k] += 1
        meta[0] += 1
        if meta[0] >= sample:  # age: halve every counter
            for k in range(len(sketch)):
                sketch[k] >>= 1
            meta[0] //= 2
        s = find(table, x)
        if s >= 0:
            hits += 1
            hit[i] = 1
            node = table[2 * s + 1]
            which = nodes[_RECORD * node + _LIST]
            _unlink(nodes, node, lists)
            if which != PROBATION:  # window or protected: refresh
                _append(nodes, node, lists, which)
                continue
            _append(nodes, node, lists, PROTECTED)
            if lists[3 * PROTECTED + 2] > protected_cap:  # its oldest falls back
                y = lists[3 * PROTECTED]
                _unlink(nodes, y, lists)
                _append(nodes, y, lists, PROBATION)
            continue
        hit[i] = 0
        node = meta[1]  # a miss: into the window
        r = _RECORD * node
        meta[1] = nodes[r + _AFTER]
        nodes[r + _ID] = x
        nodes[r + _SLOTS], nodes[r + _SLOTS + 1] = a, b
        nodes[r + _SLOTS + 2], nodes[r + _SLOTS + 3] = c, d
        put(table, -1 - s, x, node)
        _append(nodes, node, lists, WINDOW)
        if lists[3 * WINDOW + 2] <= window_cap:
            continue
        cand = lists[3 * WINDOW]
        _unlink(nodes, cand, lists)
        if lists[3 * PROBATION + 2] + lists[3 * PROTECTED + 2] < main_cap:
            _append(nodes, cand, lists, PROBATION)
            continue
        if main_cap == 0:
            _drop(nodes, cand, table, meta)
            continue
        victim = lists[3 * (PROBATION if lists[3 * PROBATION + 2] else PROTECTED)]
        if _estimate(sketch, nodes, cand) > _estimate(sketch, nodes, victim):
            _unlink(nodes, victim, lists)
            _drop(nodes, victim, table, meta)
            _append(nodes, cand, lists, PROBATION)
        else:
            _drop(nodes, cand, table, meta)
    return hits


class WTinyLFU(ReferencePolicy):
    """W-TinyLFU over ``capacity`` rows."""

    name = "wtinylfu"

    def __init__(self, capacity: int, window_ratio: float = 0.01, protected_ratio: float = 0.8):
        super().__init__(capacity)
        cap = self.capacity
        self.window_capacity = min(cap, max(1, round(cap * window_ratio)))
        self.main_capacity = cap - self.window_capacity
        self.protected_capacity = int(self.main_capacity * protected_ratio)
        self.width = 1 << max(4, (max(cap, 1) - 1).bit_length())
        self.sample = 10 * max(cap, 1)
        count = cap + 1  # the window holds one more than its share until it hands one on
        self._map = new_map(count)
        self._sketch = int_buffer(np.zeros(_DEPTH * self.width, np.uint8))
        nodes = np.full((count, _RECORD), -1, np.int64)
        nodes[:, _AFTER] = np.arange(1, count + 1)  # every node free, in order
        nodes[-1, _AFTER] = -1
        self._nodes = int_buffer(nodes.reshape(-1))
        self._lists = int_buffer(np.tile(np.array([-1, -1, 0], np.int64), 3))
        self._meta = int_buffer(np.zeros(2, np.int64))

    def __len__(self) -> int:
        return int(sum(self._lists[3 * w + 2] for w in (WINDOW, PROBATION, PROTECTED)))

    def __contains__(self, key: int) -> bool:
        return find(self._map, int(key)) >= 0

    def estimate(self, key: int) -> int:
        """The sketch's count for ``key`` (the least of its 4 counters)."""
        slots = sketch_slots(np.array([key], np.int64), self.width)[:, 0].tolist()
        return min(self._sketch[s] for s in slots)

    def _run(self, keys: np.ndarray, hit) -> int:
        s0, s1, s2, s3 = (int_buffer(s) for s in sketch_slots(keys, self.width))
        state = (self._map, self._nodes, self._lists, self._sketch, self._meta)
        caps = (self.window_capacity, self.main_capacity, self.protected_capacity)
        return int(_run(int_buffer(keys), hit, s0, s1, s2, s3, *state, *caps, self.sample))
