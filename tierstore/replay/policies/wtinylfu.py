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
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ...hashing import mix64_np
from .base import ReferencePolicy

_DEPTH = 4
_HALVE = bytes(v >> 1 for v in range(256))
_INC = [min(v + 1, 15) for v in range(16)]
_SEEDS = (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)


def sketch_slots(keys: np.ndarray, width: int) -> np.ndarray:
    """The 4 counter slots of every key, shape ``(4, len(keys))``: row ``j`` of the sketch
    at offset ``j * width``, indexed by 32 bits of ``mix64(key + seed)``."""
    u = keys.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        words = [mix64_np(u + np.uint64(s)) for s in _SEEDS]
    mask = np.uint64(width - 1)
    rows = [(words[j // 2] >> np.uint64(32 * (j % 2))) & mask for j in range(_DEPTH)]
    return np.stack([r.astype(np.int64) + j * width for j, r in enumerate(rows)])


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
        self.sketch = bytearray(_DEPTH * self.width)
        self.sample = 10 * max(cap, 1)
        self.added = 0
        # id -> its sketch slots; the first entry of each is the oldest
        self.window: OrderedDict[int, tuple] = OrderedDict()
        self.probation: OrderedDict[int, tuple] = OrderedDict()
        self.protected: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self.window) + len(self.probation) + len(self.protected)

    def __contains__(self, key: int) -> bool:
        k = int(key)
        return k in self.window or k in self.probation or k in self.protected

    def estimate(self, key: int) -> int:
        """The sketch's count for ``key`` (the least of its 4 counters)."""
        slots = sketch_slots(np.array([key], np.int64), self.width)[:, 0].tolist()
        return min(self.sketch[s] for s in slots)

    def _run(self, keys: np.ndarray) -> int:
        if self.capacity == 0:
            return 0
        window, probation, protected = self.window, self.probation, self.protected
        to_mru_w, to_mru_p = window.move_to_end, protected.move_to_end
        wcap, mcap, pcap = self.window_capacity, self.main_capacity, self.protected_capacity
        sample, added = self.sample, self.added
        tab, inc = self.sketch, _INC  # inc[v] = min(v + 1, 15): a saturating add, no branch
        s0, s1, s2, s3 = sketch_slots(keys, self.width).tolist()
        hits = 0
        for x, a, b, c, d in zip(keys.tolist(), s0, s1, s2, s3):
            tab[a] = inc[tab[a]]
            tab[b] = inc[tab[b]]
            tab[c] = inc[tab[c]]
            tab[d] = inc[tab[d]]
            added += 1
            if added >= sample:  # age: halve every counter
                tab[:] = tab.translate(_HALVE)
                added //= 2
            if x in protected:
                to_mru_p(x)
                hits += 1
                continue
            if x in window:
                to_mru_w(x)
                hits += 1
                continue
            slots = probation.pop(x, None)
            if slots is not None:
                protected[x] = slots
                if len(protected) > pcap:
                    y, ys = protected.popitem(last=False)
                    probation[y] = ys
                hits += 1
                continue
            window[x] = (a, b, c, d)
            if len(window) <= wcap:
                continue
            cand, cs = window.popitem(last=False)
            if len(probation) + len(protected) < mcap:
                probation[cand] = cs
                continue
            if mcap == 0:
                continue
            seg = probation if probation else protected
            vic = next(iter(seg))
            vs = seg[vic]
            ec = min(tab[cs[0]], tab[cs[1]], tab[cs[2]], tab[cs[3]])
            if ec > min(tab[vs[0]], tab[vs[1]], tab[vs[2]], tab[vs[3]]):
                del seg[vic]
                probation[cand] = cs
        self.added = added
        return hits
