"""An obviously-right model of the set-associative cache: plain Python, one id at a time.

It follows docs/DESIGN.md's rules literally and shares no code with ``tierstore.cache`` beyond the
documented hash (re-implemented here on Python ints).
"""

from __future__ import annotations

from collections import Counter

M64 = (1 << 64) - 1
SALTS = (0x2545F4914F6CDD1D, 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x27BB2EE687B0B0FD)


def mix64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def bucket(h: int, n: int) -> int:
    return ((h >> 32) * n) >> 32


class ModelCache:
    """Tags, scores, dirty bits and locks as lists of lists; the step done id by id."""

    def __init__(self, sets: int, ways: int, policy: str, sketch_width: int = 0, sample: int = 0):
        self.sets, self.ways, self.policy = sets, ways, policy
        self.tags = [[None] * ways for _ in range(sets)]
        self.stamps = [[0] * ways for _ in range(sets)]
        self.dirty = [[False] * ways for _ in range(sets)]
        self.locks = [[0] * ways for _ in range(sets)]
        self.width, self.sample, self.additions = sketch_width, sample, 0
        self.sketch = [[0] * sketch_width for _ in SALTS]
        self.step = 0
        self.c = Counter()

    def freq_add(self, row: int, count: int) -> None:
        for d, salt in enumerate(SALTS):
            self.sketch[d][bucket(mix64((row & M64) ^ salt), self.width)] += count
        self.additions += count

    def freq(self, row: int) -> int:
        return min(
            self.sketch[d][bucket(mix64((row & M64) ^ s), self.width)] for d, s in enumerate(SALTS)
        )

    def access(self, batch: list[int]) -> dict[int, int]:
        """One step; returns the slot of every unique id (-1 for a conflict miss)."""
        counts = Counter(batch)
        self.step += 1
        if self.policy == "lfu":
            for row in sorted(counts):
                self.freq_add(row, counts[row])
        score = {r: (self.freq(r) if self.policy == "lfu" else self.step) for r in counts}
        self.c["requests"] += len(batch)
        self.c["unique"] += len(counts)
        slots, misses = {}, []
        for row in sorted(counts):
            s = bucket(mix64(row), self.sets)
            if row in self.tags[s]:
                w = self.tags[s].index(row)
                self.stamps[s][w] = score[row]
                self.locks[s][w] += 1
                slots[row] = s * self.ways + w
                self.c["hits"] += 1
            else:
                misses.append(row)
        for row in misses:  # ascending ids
            self.c["misses"] += 1
            s = bucket(mix64(row), self.sets)
            free = [w for w in range(self.ways) if self.locks[s][w] == 0]
            if not free:
                slots[row] = -1
                self.c["conflicts"] += 1
                continue
            # empty ways first, then the lowest score, ties by way index
            w = min(free, key=lambda w: (self.tags[s][w] is not None, self.stamps[s][w], w))
            if self.tags[s][w] is not None:
                self.c["evictions"] += 1
                self.c["writebacks"] += self.dirty[s][w]
            self.tags[s][w], self.stamps[s][w] = row, score[row]
            self.dirty[s][w], self.locks[s][w] = False, 1
            slots[row] = s * self.ways + w
        if self.policy == "lfu" and self.additions >= self.sample:
            self.sketch = [[v >> 1 for v in r] for r in self.sketch]
            self.stamps = [[v >> 1 for v in r] for r in self.stamps]
            self.additions = 0
        return slots

    def release(self, slots: dict[int, int]) -> None:
        for slot in slots.values():
            if slot >= 0:
                self.locks[slot // self.ways][slot % self.ways] -= 1

    def mark_dirty(self, slot: int) -> None:
        self.dirty[slot // self.ways][slot % self.ways] = True
