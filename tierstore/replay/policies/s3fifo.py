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
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .base import ReferencePolicy


class S3FIFO(ReferencePolicy):
    """S3-FIFO over ``capacity`` rows; ``small_ratio`` is the small queue's share."""

    name = "s3fifo"
    MAX_FREQ = 3

    def __init__(self, capacity: int, small_ratio: float = 0.1):
        super().__init__(capacity)
        self.small_capacity = max(1, round(self.capacity * small_ratio))
        self.ghost_capacity = max(0, self.capacity - self.small_capacity)
        self.freq: dict[int, int] = {}  # cached id -> counter
        self.small: deque[int] = deque()  # newest on the left
        self.main: deque[int] = deque()
        self.ghost: dict[int, int] = {}  # id -> its entry's serial in ghost_fifo
        self.ghost_fifo: deque[tuple[int, int]] = deque()  # (id, serial); stale ones skipped
        self.serial = 0

    def __len__(self) -> int:
        return len(self.freq)

    def __contains__(self, key: int) -> bool:
        return int(key) in self.freq

    def _remember(self, key: int) -> None:
        if self.ghost_capacity == 0:
            return
        self.serial += 1
        self.ghost[key] = self.serial
        self.ghost_fifo.append((key, self.serial))
        while len(self.ghost) > self.ghost_capacity:
            old, serial = self.ghost_fifo.popleft()
            if self.ghost.get(old) == serial:
                del self.ghost[old]

    def _run(self, keys: np.ndarray) -> int:
        cap, small_cap, top = self.capacity, self.small_capacity, self.MAX_FREQ
        freq, small, main, ghost = self.freq, self.small, self.main, self.ghost
        if cap == 0:
            return 0
        hits = 0
        for x in keys.tolist():
            f = freq.get(x)
            if f is not None:
                hits += 1
                if f < top:
                    freq[x] = f + 1
                continue
            while len(freq) >= cap:  # free one row
                if len(small) >= small_cap or not main:
                    t = small.pop()
                    if freq[t]:
                        freq[t] = 0
                        main.appendleft(t)
                    else:
                        del freq[t]
                        self._remember(t)
                else:
                    t = main.pop()
                    ft = freq[t]
                    if ft:
                        freq[t] = ft - 1
                        main.appendleft(t)
                    else:
                        del freq[t]
            if x in ghost:
                del ghost[x]
                main.appendleft(x)
            else:
                small.appendleft(x)
            freq[x] = 0
        return hits
