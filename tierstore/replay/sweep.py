"""One replay of a trace: every policy at every cache size, with the bounds beside them.

The engine's set-associative LRU and LFU replay batch by batch (``engine.py``, the engine's own
code); OPT, fully associative LRU and the modern policies replay request by request over the
same ids (``bounds.py``, ``fully_assoc.py``, ``policies/``). The compulsory-miss floor comes
with every row, so the cost of set associativity and the distance to optimal are visible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidInputError
from ..progress import progress
from . import REFERENCE, reference_hits
from .bounds import compulsory_misses
from .engine import replay_engine

ENGINE_POLICIES = ("lru", "lfu")
COLUMNS = [
    "table", "policy", "cache_rows", "requests", "lookups", "hits", "misses",
    "hit_ratio", "unique_hit_ratio", "evictions", "floor_hit_ratio", "req_per_s",
]  # fmt: skip
L2_COLUMNS = ["l1_hits", "l2_hits", "l3_reads"]


def parse_sizes(text: str, distinct: int) -> list[int]:
    """Cache sizes from ``"1%,5%,20%"`` (of the distinct ids) or ``"1000,50000"`` (rows)."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part.endswith("%"):
                sizes.append(max(1, math.ceil(distinct * float(part[:-1]) / 100)))
            else:
                sizes.append(int(part))
        except ValueError:
            raise InvalidInputError(
                f"--cache-rows: {part!r} is neither a row count nor a percentage"
            ) from None
    if any(s < 1 for s in sizes):
        raise InvalidInputError(f"--cache-rows must be positive, got {text!r}")
    return sizes


def replay_table(
    ids: np.ndarray,
    sizes: Sequence[int],
    policies: Sequence[str],
    *,
    table: str = "0",
    ways: int = 32,
    batch: int = 65536,
    device: str = "cpu",
    host_rows: int | None = None,
) -> list[dict]:
    """Result rows (dicts with :data:`COLUMNS`) for one table's ids: each policy at each size.

    ``policies`` mixes engine policies (``lru``, ``lfu``: set-associative, batch by batch)
    and reference ones (``opt``, ``fa-lru``, ``s3fifo``, ``wtinylfu``: fully associative, per
    request).
    """
    unknown = [p for p in policies if p not in ENGINE_POLICIES and p not in REFERENCE]
    if unknown:
        raise InvalidInputError(
            f"unknown policies {unknown}; known: {[*ENGINE_POLICIES, *sorted(REFERENCE)]}"
        )
    n = int(ids.size)
    floor = 1.0 - compulsory_misses(ids) / n if n else 0.0
    # on the GPU the whole trace goes over once, and each step slices it there
    source = torch.from_numpy(ids).to(device) if device == "cuda" else ids
    batches = [source[a : a + batch] for a in range(0, n, batch)]
    lo, hi = (int(ids.min()), int(ids.max())) if n else (0, 0)
    num_rows = hi + 1 if lo >= 0 else None
    rows = []
    for policy in policies:
        if policy in ENGINE_POLICIES:
            for size in sizes:
                shown = progress(
                    batches, desc=f"{table} {policy} {size}", enabled=len(batches) > 50
                )
                r = replay_engine(
                    shown, size, policy, ways, host_rows=host_rows, device=device,
                    num_rows=num_rows,
                )  # fmt: skip
                row = {
                    "policy": f"{policy} ({ways}-way)", "cache_rows": size, "requests": r.requests,
                    "lookups": r.unique, "hits": r.hits, "misses": r.misses,
                    "hit_ratio": r.request_hit_ratio, "unique_hit_ratio": r.hit_ratio,
                    "evictions": r.evictions, "req_per_s": r.requests / max(r.seconds, 1e-9),
                }  # fmt: skip
                if host_rows:
                    row.update(l1_hits=r.hits, l2_hits=r.l2_hits, l3_reads=r.l3_reads)
                rows.append(row)
        else:
            t0 = time.perf_counter()
            hits = reference_hits(policy, ids, list(sizes))
            per_size = (time.perf_counter() - t0) / max(len(sizes), 1)
            for size, h in zip(sizes, hits.tolist()):
                rows.append({
                    "policy": policy, "cache_rows": size, "requests": n, "lookups": n,
                    "hits": h, "misses": n - h, "hit_ratio": h / n if n else 0.0,
                    "unique_hit_ratio": h / n if n else 0.0, "evictions": "",
                    "req_per_s": n / max(per_size, 1e-9),
                })  # fmt: skip
    for row in rows:
        row["table"] = table
        row["floor_hit_ratio"] = floor
    return rows
