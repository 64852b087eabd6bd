"""One replay of a trace: every policy at every cache size, with the bounds beside them.

The engine's set-associative LRU and LFU replay batch by batch (``engine.py``, the engine's own
code; at batch 1 request by request in one compiled loop, ``single.py``); OPT, fully associative LRU and the modern policies replay request by request over the
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
from ..policy import POLICIES, make_policy
from ..progress import progress
from . import REFERENCE, reference_hits
from .bounds import compulsory_misses
from .engine import replay_engine
from .single import replay_requests

# The engine's own policies: every one of the registry (policy.POLICIES), stepped by the
# engine's cache code with whatever fast paths each declares
ENGINE_POLICIES = tuple(POLICIES)
# The names of CacheStats (stats()) and of `tierstore run`'s table, one name for one metric.
# `asked_rows` is the size asked for; `cache_rows` the rows the cache holds (the engine's cache
# has whole sets: ceil(asked / ways) * ways rows); `batch` the ids per step (1: per request).
COLUMNS = [
    "table", "policy", "batch", "asked_rows", "cache_rows", "requested", "unique", "hits",
    "misses", "hit_ratio", "unique_hit_ratio", "evictions", "floor_hit_ratio", "req_per_s",
]  # fmt: skip
L2_COLUMNS = ["l1_hits", "l2_hits", "l3_reads"]
_WARM_UP_IDS = 4096  # ids of the replay that compiles a policy's loops before the timed one


def parse_sizes(text: str, distinct: int) -> list[int]:
    """Cache sizes from ``"1%,5%,20%"`` (of the distinct ids, rounded down as libCacheSim
    does, at least 1 row) or ``"1000,50000"`` (rows)."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part.endswith("%"):
                pct = float(part[:-1])
                if not 0 < pct <= 100:
                    raise InvalidInputError(
                        f"--cache-rows: {part!r}: a percentage must lie in (0, 100]"
                    )
                sizes.append(max(1, math.floor(distinct * pct / 100)))
            else:
                sizes.append(int(part))
        except ValueError as e:
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(
                f"--cache-rows: {part!r} is neither a row count nor a percentage"
            ) from None
    if any(s < 1 for s in sizes):
        raise InvalidInputError(f"--cache-rows must be positive, got {text!r}")
    return sizes


def check_policies(policies: Sequence[str]) -> None:
    """Raises InvalidInputError for a name that is no engine or reference policy."""
    unknown = [p for p in policies if p not in ENGINE_POLICIES and p not in REFERENCE]
    if unknown or not policies:
        raise InvalidInputError(
            f"unknown policies {unknown or list(policies)}; "
            f"known: {[*ENGINE_POLICIES, *sorted(REFERENCE)]}"
        )


def engine_label(policy: str, ways: int, batch: int) -> str:
    """The name of an engine policy's rows: its ways, and its batch where above 1 (a batched
    hit ratio counts repeats of an id inside a batch as hits: not comparable with per-request
    figures such as OPT's)."""
    return f"{policy} ({ways}-way)" if batch == 1 else f"{policy} ({ways}-way, batched {batch})"


def steps_per_request(batch: int, host_rows: int | None, device: str, policy=None) -> bool:
    """Whether an engine replay goes request by request in one compiled loop (batch 1, one
    level, the CPU, and ``policy``, where given, declares a ``compiled_score``:
    ``single.replay_requests``) rather than batch by batch."""
    compiled = policy is None or make_policy(policy).compiled_score is not None
    return batch == 1 and host_rows is None and device == "cpu" and compiled


def _replay_engine_policy(
    ids, size, policy, *, ways, batch, device, host_rows, num_rows, desc, hits=None, observe=None
):
    """One engine replay: request by request in one compiled loop where that applies (batch 1,
    one level, the CPU, a policy that declares a ``compiled_score``; ``hits``: a bool per
    request, set where it hit), else batch by batch (at batch 1 too: a policy with no compiled
    score takes the torch step per request; ``observe``: as ``replay_engine``'s). A caller that
    attributes hits passes both."""
    if steps_per_request(batch, host_rows, device, policy):
        return replay_requests(ids, size, policy, ways, num_rows=num_rows, show=True, hits=hits)
    # on the GPU the whole trace goes over once, and each step slices it there
    source = torch.from_numpy(ids).to(device) if device == "cuda" else ids
    batches = [source[a : a + batch] for a in range(0, ids.size, batch)]
    shown = progress(batches, desc=desc, enabled=len(batches) > 50)
    return replay_engine(
        shown, size, policy, ways, host_rows=host_rows, device=device, num_rows=num_rows,
        observe=observe,
    )  # fmt: skip


def warm_up_engine(ids: np.ndarray, size: int, policy: str, batch: int, **opts) -> None:
    """An untimed replay of the first few thousand ids (at least two batches: the later ones
    take other loops, ``engine._scored_ahead``): compiles the loops (or loads them) and the
    kernels, and meets the first allocations of a batch's size. ``opts``: the timed replay's
    ``ways``, ``device``, ``host_rows``, ``num_rows``."""
    if ids.size:
        warm = ids[: max(_WARM_UP_IDS, 3 * batch)]
        step = batch if warm.size >= 2 * batch else max(1, warm.size // 4)
        _replay_engine_policy(warm, size, policy, batch=step, desc="warm-up", **opts)


def warm_up_reference(policy: str, ids: np.ndarray) -> None:
    """An untimed replay of the first few thousand ids under the reference ``policy``: compiles
    its loop (or loads it). At 2 rows, fewer than the distinct ids it sees: at a size that holds
    them all, OPT answers without its loop, and the timed replay would pay for loading it."""
    if ids.size:
        reference_hits(policy, ids[:_WARM_UP_IDS], [2])


def engine_row(r, size: int, ways: int, batch: int, two_level: bool = False) -> dict:
    """The result row (:data:`COLUMNS` but ``table`` and ``floor_hit_ratio``) of an engine
    replay's ``EngineResult`` ``r`` at asked size ``size``."""
    row = {
        "policy": engine_label(r.policy, ways, batch), "batch": batch,
        "asked_rows": size, "cache_rows": r.cache_rows, "requested": r.requests,
        "unique": r.unique, "hits": r.hits, "misses": r.misses,
        "hit_ratio": r.hit_ratio, "unique_hit_ratio": r.unique_hit_ratio,
        "evictions": r.evictions, "req_per_s": r.requests / max(r.seconds, 1e-9),
    }  # fmt: skip
    if two_level:
        row.update(l1_hits=r.hits, l2_hits=r.l2_hits, l3_reads=r.l3_reads)
    return row


def reference_row(policy: str, size: int, n: int, hits: int, seconds: float) -> dict:
    """The result row (as :func:`engine_row`'s) of a reference policy of ``size`` rows that hit
    ``hits`` of ``n`` requests in ``seconds``."""
    h = int(hits)
    return {
        "policy": policy, "batch": 1, "asked_rows": size, "cache_rows": size,
        "requested": n, "unique": n, "hits": h, "misses": n - h,
        "hit_ratio": h / n if n else 0.0, "unique_hit_ratio": h / n if n else 0.0,
        "evictions": "", "req_per_s": n / max(seconds, 1e-9),
    }  # fmt: skip


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

    ``policies`` mixes engine policies (``lru``, ``lfu``: set-associative, ``batch`` ids a
    step; at batch 1 request by request) and reference ones (``opt``, ``fa-lru``, ``s3fifo``,
    ``wtinylfu``: fully associative, per request). ``req_per_s`` excludes compilation: each
    policy first replays a few thousand ids untimed.
    """
    check_policies(policies)
    if batch < 1:
        raise InvalidInputError(f"batch must be at least 1, got {batch}")
    n = int(ids.size)
    floor = 1.0 - compulsory_misses(ids) / n if n else 0.0
    lo, hi = (int(ids.min()), int(ids.max())) if n else (0, 0)
    num_rows = hi + 1 if lo >= 0 else None
    rows = []
    for policy in policies:
        if policy in ENGINE_POLICIES:
            opts = dict(ways=ways, device=device, host_rows=host_rows, num_rows=num_rows)
            warm_up_engine(ids, max(sizes), policy, batch, **opts)
            for size in sizes:
                desc = f"{table} {policy} {size}"
                r = _replay_engine_policy(ids, size, policy, batch=batch, desc=desc, **opts)
                rows.append(engine_row(r, size, ways, batch, two_level=bool(host_rows)))
        else:
            warm_up_reference(policy, ids)
            t0 = time.perf_counter()
            hits = reference_hits(policy, ids, list(sizes))
            per_size = (time.perf_counter() - t0) / max(len(sizes), 1)
            rows += [reference_row(policy, size, n, h, per_size) for size, h in zip(sizes, hits)]
    for row in rows:
        row["table"] = table
        row["floor_hit_ratio"] = floor
    return rows
