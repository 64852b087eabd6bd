"""An int64 -> int64 hash map in one flat buffer, for the compiled policy loops.

The reference policies look an id up on every request, and numba compiles no dict that is
fast there, so the map is open addressing with linear probing: slot ``s`` holds its key at
``table[2 s]`` and its value at ``table[2 s + 1]`` (one cache line for both: the lookups land
at random), over a power-of-two number of slots of which at most half are used. A free slot
holds the value :data:`EMPTY`; a removal shifts the entries after it back, so no tombstones
build up and a lookup stops at the first free slot. Values are the caller's (any int64 but
``EMPTY``): :func:`find` gives the slot, and ``table[2 s + 1]`` is read and written in place.

Every function here is written for :func:`tierstore.compiled.compiled`: plain loops over an
integer buffer, so that the same code runs as Python where numba is missing.
"""

from __future__ import annotations

import numpy as np

from ...compiled import compiled, int_buffer

EMPTY = -1  # the value of a free slot


def new_map(entries: int):
    """The buffer of a map of up to ``entries`` entries (load at most 1/2)."""
    slots = 1 << max(4, (2 * max(entries, 1) - 1).bit_length())
    table = np.zeros(2 * slots, np.int64)
    table[1::2] = EMPTY
    return int_buffer(table)


@compiled
def home(key, mask):
    """The slot where ``key``'s probe starts. Only the slot, never a decision, depends on it,
    so Python (unbounded ints) and numba (wrapping int64) may differ in the high bits."""
    h = (key ^ (key >> 29)) * 0x2545F4914F6CDD1D
    return (h ^ (h >> 32)) & mask


@compiled
def find(table, key):
    """The slot holding ``key``, or ``-1 - s`` where ``s`` is the free slot it would take."""
    mask = len(table) // 2 - 1
    s = home(key, mask)
    while table[2 * s + 1] != EMPTY:
        if table[2 * s] == key:
            return s
        s = (s + 1) & mask
    return -1 - s


@compiled
def put(table, s, key, value):
    """Fills the free slot ``s`` (``-1 -`` what :func:`find` returned for ``key``)."""
    table[2 * s] = key
    table[2 * s + 1] = value


@compiled
def remove(table, s):
    """Empties slot ``s`` and moves back the entries after it whose probe passes through it."""
    mask = len(table) // 2 - 1
    j = s
    while True:
        j = (j + 1) & mask
        if table[2 * j + 1] == EMPTY:
            break
        h = home(table[2 * j], mask)
        # the entry at j stays if its home lies cyclically in (s, j]
        if (s < j and s < h <= j) or (s > j and (h > s or h <= j)):
            continue
        table[2 * s] = table[2 * j]
        table[2 * s + 1] = table[2 * j + 1]
        s = j
    table[2 * s + 1] = EMPTY
