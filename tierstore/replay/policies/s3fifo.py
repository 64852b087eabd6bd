"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO that filters one-hit wonders, a main FIFO
with lazy promotion, and a ghost FIFO of recently filtered ids.

As built here (written from the paper's description):

- Each cached id has a counter 0..3, bumped on a hit (saturating); nothing moves on a hit.
- A miss inserts into the main queue if the id is in the ghost queue (it was filtered out
  recently but came back), else into the small queue, with counter 0.
- To free one row: if the small queue holds at least its share (10 % of the capacity, at
  least one row) or the main queue is empty, take the small queue's oldest: if it was hit while
  there, move it to the main queue with counter 0 and go on; else evict it and remember it in
  the ghost queue (which keeps as many ids as the main queue's share). Otherwise take the main
  queue's oldest: if its counter is positive, decrement it and reinsert it; else evict it.

The state is flat buffers, and one compiled loop (:mod:`tierstore.compiled`) runs the
requests: one map (:mod:`.keymap`) from id to its counter (cached) or its ghost serial, and
three rings of ids. A ghost that comes back leaves a stale entry in the ghost ring (its serial
no longer matches the map's); the ring is compacted when stale entries fill it.
"""

from __future__ import annotations

import numpy as np

from ...compiled import compiled, int_buffer
from .base import ReferencePolicy
from .keymap import find, new_map, put, remove

MAX_FREQ = 3
# meta, the loop's scalars between calls (locals during one): rows cached, the small ring's
# head and length, the main ring's, the ghost ring's, live ghosts, the last ghost serial
_CACHED = 0


@compiled
def _remember(key, table, gkeys, gserials, head, length, ghosts, serial, ghost_cap):
    """Puts the evicted ``key`` in the ghost queue, dropping the oldest ghosts past its share.
    Takes and returns the ghost ring's ``head``, ``length``, live count and last serial."""
    size = len(gkeys)
    if length == size:  # full of stale entries: keep the live ones, in order, from the head
        kept = 0  # writes trail the reads: nothing is overwritten before it is read
        for i in range(size):
            at = (head + i) % size
            s = find(table, gkeys[at])
            if s >= 0 and table[2 * s + 1] == -2 - gserials[at]:
                to = (head + kept) % size
                gkeys[to], gserials[to] = gkeys[at], gserials[at]
                kept += 1
        length = kept
    serial += 1
    put(table, -1 - find(table, key), key, -2 - serial)  # key was just removed: not found
    at = head + length
    if at >= size:
        at -= size
    gkeys[at], gserials[at] = key, serial
    length += 1
    ghosts += 1
    while ghosts > ghost_cap:
        s = find(table, gkeys[head])
        if s >= 0 and table[2 * s + 1] == -2 - gserials[head]:  # live: forget it
            remove(table, s)
            ghosts -= 1
        head += 1
        if head == size:
            head = 0
        length -= 1
    return head, length, ghosts, serial


@compiled
def _run(keys, hit, table, small, main, gkeys, gserials, meta, small_cap, ghost_cap):
    """Feeds ``keys`` in order; returns the hits, and sets ``hit[i]`` to whether ``keys[i]``
    hit."""
    cap = len(small)
    cached, s_head, s_len, m_head, m_len = meta[0], meta[1], meta[2], meta[3], meta[4]
    g_head, g_len, ghosts, serial = meta[5], meta[6], meta[7], meta[8]
    hits = 0
    for i in range(len(keys)):
        x = keys[i]
        s = find(table, x)
        if s >= 0 and table[2 * s + 1] >= 0:  # cached
            hits += 1
            hit[i] = 1
            if table[2 * s + 1] < MAX_FREQ:
                table[2 * s + 1] += 1
            continue
        hit[i] = 0
        while cached >= cap:  # free one row
            if s_len >= small_cap or m_len == 0:
                t = small[s_head]
                s_head = s_head + 1 if s_head + 1 < cap else 0
                s_len -= 1
                q = find(table, t)
                if table[2 * q + 1] > 0:  # hit while in the small queue: promote
                    table[2 * q + 1] = 0
                    at = m_head + m_len
                    main[at if at < cap else at - cap] = t
                    m_len += 1
                else:
                    remove(table, q)
                    cached -= 1
                    if ghost_cap:
                        g_head, g_len, ghosts, serial = _remember(
                            t, table, gkeys, gserials, g_head, g_len, ghosts, serial, ghost_cap
                        )
            else:
                t = main[m_head]
                q = find(table, t)
                if table[2 * q + 1] > 0:  # reinsert: the ring turns by one
                    table[2 * q + 1] -= 1
                    at = m_head + m_len
                    main[at if at < cap else at - cap] = t
                else:
                    remove(table, q)
                    cached -= 1
                    m_len -= 1
                m_head = m_head + 1 if m_head + 1 < cap else 0
        s = find(table, x)  # the removals above may have moved x's slot
        if s >= 0:  # a ghost: back into the main queue
            table[2 * s + 1] = 0
            ghosts -= 1
            at = m_head + m_len
            main[at if at < cap else at - cap] = x
            m_len += 1
        else:
            put(table, -1 - s, x, 0)
            at = s_head + s_len
            small[at if at < cap else at - cap] = x
            s_len += 1
        cached += 1
    meta[0], meta[1], meta[2], meta[3], meta[4] = cached, s_head, s_len, m_head, m_len
    meta[5], meta[6], meta[7], meta[8] = g_head, g_len, ghosts, serial
    return hits


class S3FIFO(ReferencePolicy):
    """S3-FIFO over ``capacity`` rows; ``small_ratio`` is the small queue's share."""

    name = "s3fifo"

    def __init__(self, capacity: int, small_ratio: float = 0.1):
        super().__init__(capacity)
        cap = self.capacity
        self.small_capacity = max(1, round(cap * small_ratio))
        self.ghost_capacity = max(0, cap - self.small_capacity)
        self._map = new_map(cap + self.ghost_capacity + 1)
        self._rings = tuple(int_buffer(np.zeros(max(cap, 1), np.int64)) for _ in range(2))
        # live ghosts plus stale entries: room for as many stale as live before a compaction
        ghost_ring = 2 * self.ghost_capacity + 2
        self._ghosts = tuple(int_buffer(np.zeros(ghost_ring, np.int64)) for _ in range(2))
        self._meta = int_buffer(np.zeros(9, np.int64))

    def __len__(self) -> int:
        return int(self._meta[_CACHED])

    def __contains__(self, key: int) -> bool:
        s = find(self._map, int(key))
        return s >= 0 and self._map[2 * s + 1] >= 0  # not a ghost

    def _run(self, keys: np.ndarray, hit) -> int:
        queues = (*self._rings, *self._ghosts, self._meta)
        caps = (self.small_capacity, self.ghost_capacity)
        return int(_run(int_buffer(keys), hit, self._map, *queues, *caps))
