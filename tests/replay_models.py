"""Plain-list models of the reference policies (S3-FIFO, W-TinyLFU), written from the same
descriptions as ``tierstore/replay/policies/`` and sharing no code with it: one request at a
time, each returning whether every request hit."""

from __future__ import annotations

M64 = (1 << 64) - 1


def s3fifo_model(ids: list[int], cap: int) -> list[bool]:
    """S3-FIFO with lists (index 0 = oldest): whether each request hit."""
    if cap == 0:
        return [False] * len(ids)
    small_cap = max(1, round(cap * 0.1))
    ghost_cap = cap - small_cap
    small: list[int] = []
    main: list[int] = []
    ghost: list[int] = []
    freq: dict[int, int] = {}
    hit: list[bool] = []
    for x in ids:
        if x in small or x in main:
            hit.append(True)
            freq[x] = min(freq[x] + 1, 3)
            continue
        hit.append(False)
        while len(small) + len(main) >= cap:
            if len(small) >= small_cap or not main:
                t = small.pop(0)
                if freq[t] > 0:  # hit while in the small queue: promote
                    freq[t] = 0
                    main.append(t)
                else:
                    del freq[t]
                    if ghost_cap:
                        ghost.append(t)
                        if len(ghost) > ghost_cap:
                            ghost.pop(0)
            else:
                t = main.pop(0)
                if freq[t] > 0:
                    freq[t] -= 1
                    main.append(t)
                else:
                    del freq[t]
        if x in ghost:
            ghost.remove(x)
            main.append(x)
        else:
            small.append(x)
        freq[x] = 0
    return hit


def _mix64(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def plain_slots(x: int, width: int) -> list[int]:
    u = x & M64
    words = [_mix64((u + s) & M64) for s in (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)]
    return [((words[j // 2] >> (32 * (j % 2))) & (width - 1)) + j * width for j in range(4)]


def wtinylfu_model(ids: list[int], cap: int) -> list[bool]:
    """W-TinyLFU with lists (index 0 = least recently used) and a list sketch: whether each
    request hit."""
    if cap == 0:
        return [False] * len(ids)
    wcap = min(cap, max(1, round(cap * 0.01)))
    mcap = cap - wcap
    pcap = int(mcap * 0.8)
    width = 1 << max(4, (cap - 1).bit_length())
    sketch = [0] * (4 * width)
    sample, added = 10 * cap, 0
    window: list[int] = []
    prob: list[int] = []
    prot: list[int] = []

    def estimate(y: int) -> int:
        return min(sketch[s] for s in plain_slots(y, width))

    hit: list[bool] = []
    for x in ids:
        for s in plain_slots(x, width):
            sketch[s] = min(15, sketch[s] + 1)
        added += 1
        if added >= sample:
            sketch = [v >> 1 for v in sketch]
            added //= 2
        if x in window:
            window.remove(x)
            window.append(x)
            hit.append(True)
        elif x in prot:
            prot.remove(x)
            prot.append(x)
            hit.append(True)
        elif x in prob:
            prob.remove(x)
            prot.append(x)
            if len(prot) > pcap:
                prob.append(prot.pop(0))
            hit.append(True)
        else:
            hit.append(False)
            window.append(x)
            if len(window) > wcap:
                cand = window.pop(0)
                if len(prob) + len(prot) < mcap:
                    prob.append(cand)
                elif mcap > 0:
                    seg = prob if prob else prot
                    if estimate(cand) > estimate(seg[0]):
                        seg.pop(0)
                        prob.append(cand)
    return hit


MODELS = {"s3fifo": s3fifo_model, "wtinylfu": wtinylfu_model}


def model_hits(name: str, ids: list[int], cap: int) -> int:
    """The hits of model ``name`` (a key of :data:`MODELS`) over ``ids``."""
    return sum(MODELS[name](ids, cap))
