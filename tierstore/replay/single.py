"""The engine's cache replayed request by request (batch 1), at millions of requests a second.

At batch 1 a step of ``SetAssociativeCache`` is one id with count 1, and every general step's
bookkeeping (the unique step, grouping misses by set, ranking victims, locks, the thread that
scores ahead) costs microseconds for nanoseconds of work. :func:`step_each` does exactly what
``lookup`` then ``release`` do for such a batch, for a whole trace in one compiled loop, on the
cache's own tensors:

1. LFU: the id's count goes into the sketch and its estimate (the least of its counters) is
   its score; when ``sample_size`` additions have gathered the sketch halves. LRU: the score is
   the step;
2. a hit takes its score; a miss takes the way of its set with the least key (-1 when empty,
   else the score; ties by way index) and evicts what it held;
3. when the sketch halved, every stored score halves (``LFU.age``).

No lock is ever held between steps (each is released at once), so no miss is a conflict miss
and no way is busy. ``tests/test_replay_single.py`` checks the cache's state and counters
against ``lookup`` and ``release`` request by request, bit for bit.
"""

from __future__ import annotations

import time

import numpy as np

from .. import stats as st
from ..cache import SetAssociativeCache
from ..cache_compiled import _EMPTY, _mix64, _reduce_range, _set_of
from ..compiled import COMPILED, compiled, prefetch
from ..policy import POLICIES, CompiledScore
from ..progress import progress
from .invariants import check_replay

_CHUNK = 1 << 20  # requests per call (a progress-bar tick)
_AHEAD = 8  # requests between a prefetch and the request that reads it


@compiled
def _step_each(ids, slot_of, state, counters, sets, ways, step, frequency, sketch_state, hit_out):
    """Steps the cache with each id of ``ids`` as a batch of its own, in place; returns the
    step number after the last one; ``hit_out`` (bool, ``ids.size`` or empty): set where the
    id hit. ``state``: tags, stamps, dirty bits by slot; ``slot_of``:
    the slot index, or empty (then the tags of the id's set are compared); ``sketch_state``:
    counters (depth, width), salts, additions (1,), sample size, as ``cache_compiled``."""
    tags, stamps, dirty = state
    sketch2d, salts, additions, sample_size = sketch_state
    depth, width = sketch2d.shape
    sketch = sketch2d.reshape(depth * width)  # a view: row d's cell c at d * width + c
    indexed = slot_of.size > 0
    record = hit_out.size > 0
    hits = 0
    evictions = 0
    writebacks = 0
    n = ids.size
    for i in range(n):
        # The reads land at random (the sketch's cells, the set's ways, the index): ask for a
        # later request's lines now (their addresses do not depend on the state)
        if i + _AHEAD < n:
            ahead = ids[i + _AHEAD]
            if frequency:
                for d in range(depth):
                    at = _reduce_range(_mix64(np.uint64(ahead) ^ np.uint64(salts[d])), width)
                    prefetch(sketch, d * width + at)
            if indexed:
                if i + 2 * _AHEAD < n:
                    prefetch(slot_of, ids[i + 2 * _AHEAD])
                at = slot_of[ahead]
                if at >= 0:
                    prefetch(tags, at)
                    prefetch(stamps, at)
            else:
                first = _set_of(ahead, sets) * ways
                for w in range(first, first + min(ways, 64), 8):  # 8 tags or stamps a line
                    prefetch(tags, w)
                    prefetch(stamps, w)
        row = ids[i]
        step += 1
        score = step
        aged = False
        if frequency:
            least = np.int64(np.iinfo(np.int32).max)
            for d in range(depth):
                cell = d * width + _reduce_range(
                    _mix64(np.uint64(row) ^ np.uint64(salts[d])), width
                )
                sketch[cell] += np.int32(1)
                least = min(least, np.int64(sketch[cell]))
            score = least
            additions[0] += 1
            aged = additions[0] >= sample_size
            if aged:
                for c in range(depth * width):
                    sketch[c] >>= 1
                additions[0] = 0
        slot = np.int64(-1)
        base = np.int64(-1)
        if indexed:
            slot = np.int64(slot_of[row])
        else:
            base = _set_of(row, sets) * ways
            for w in range(ways):
                if tags[base + w] == row:
                    slot = base + w
                    break
        if slot >= 0:
            stamps[slot] = score
            hits += 1
            if record:
                hit_out[i] = True
        else:
            if base < 0:
                base = _set_of(row, sets) * ways
            slot = base
            best = np.int64(-1) if tags[base] == _EMPTY else stamps[base]
            for w in range(1, ways):
                key = np.int64(-1) if tags[base + w] == _EMPTY else stamps[base + w]
                if key < best:
                    best, slot = key, base + w
            victim = tags[slot]
            if victim != _EMPTY:
                evictions += 1
                writebacks += dirty[slot]
                if indexed:
                    slot_of[victim] = -1
            if indexed:
                slot_of[row] = slot
            tags[slot] = row
            dirty[slot] = False
            stamps[slot] = score
        if aged:
            for s in range(stamps.size):
                stamps[s] >>= 1
    counters[st.REQUESTS] += n
    counters[st.UNIQUE] += n
    counters[st.HITS] += hits
    counters[st.MISSES] += n - hits
    counters[st.EVICTIONS] += evictions
    counters[st.WRITEBACKS] += writebacks
    return step


def supports(cache: SetAssociativeCache) -> bool:
    """Whether :func:`step_each` applies to ``cache``: a CPU cache that holds no lock, under a
    policy that declares a ``compiled_score`` (``STEP`` with no sketch, or ``FREQUENCY`` with its
    sketch: LRU, LFU)."""
    rule = cache.policy.compiled_score
    return (
        cache.device.type == "cpu"
        and rule is not None
        and (cache.sketch is not None) == (rule is CompiledScore.FREQUENCY)
        and not bool((cache.locks > 0).any())
    )


def step_each(
    cache: SetAssociativeCache, ids: np.ndarray, show: bool = False, hits: np.ndarray | None = None
) -> None:
    """Steps ``cache`` with every id of ``ids`` as a batch of one (a ``lookup`` of the id with
    count 1, then its ``release``), in order: the same state and counters, in one compiled
    loop. ``cache`` must satisfy :func:`supports`; ids must lie in its ``id_bound`` if it
    has one (else IndexError, before any change). ``hits``: a ``(len(ids),)`` bool array,
    set where the request hit (left as it was elsewhere)."""
    if not supports(cache):
        raise ValueError(
            "step_each needs a CPU cache holding no lock, under a policy with a compiled_score"
        )
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    slot_of = np.zeros(0, np.int32)
    if cache._slot_of is not None:
        slot_of = cache._slot_of.numpy()
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= slot_of.size):
            raise IndexError(f"ids must lie in [0, {slot_of.size}) (the cache's id_bound)")
    for t in (cache.tags, cache.stamps, cache.dirty):
        assert t.is_contiguous()  # numpy views share the cache's memory
    state = (
        cache.tags.view(-1).numpy(),
        cache.stamps.view(-1).numpy(),
        cache.dirty.view(-1).numpy(),
    )
    sketch = cache.sketch
    if sketch is None:
        sketch_state = (np.zeros((1, 1), np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64), 0)
    else:
        additions = sketch.additions.view(1).numpy()
        sketch_state = (
            sketch.counters.numpy(),
            sketch.salts.numpy(),
            additions,
            sketch.sample_size,
        )
    counters = cache.counters.numpy()
    if hits is not None and hits.shape != ids.shape:
        raise ValueError(f"hits must have the ids' shape {ids.shape}, got {hits.shape}")
    no_record = np.zeros(0, np.bool_)
    chunks = range(0, ids.size, _CHUNK)
    for a in progress(chunks, "replay (batch 1)", enabled=show and len(chunks) > 2):
        cache.step = int(
            _step_each(
                ids[a : a + _CHUNK], slot_of, state, counters, cache.sets, cache.ways,
                cache.step, sketch is not None, sketch_state,
                no_record if hits is None else hits[a : a + _CHUNK],
            )
        )  # fmt: skip


def warm_up() -> None:
    """Compiles (or loads from numba's cache) :func:`step_each`'s loop for every registered
    policy that declares a ``compiled_score``."""
    for policy in [name for name, cls in POLICIES.items() if cls.compiled_score is not None]:
        for bound in (None, 4):
            step_each(SetAssociativeCache(2, 2, policy, id_bound=bound), np.arange(4))


def replay_requests(
    ids: np.ndarray, cache_rows: int, policy: str = "lru", ways: int = 32,
    num_rows: int | None = None, show: bool = False, hits: np.ndarray | None = None,
):  # fmt: skip
    """:func:`~tierstore.replay.engine.replay_engine` at batch 1 (every id a step of its own),
    for a CPU cache: returns its ``EngineResult``. ``num_rows``: every id lies in
    ``[0, num_rows)`` (a cache of more than 64 ways then keeps a slot index per id, up to 2**26
    ids); ``hits``: as :func:`step_each`'s."""
    from .engine import _INDEX_IDS, EngineResult

    # the slot index pays where sets are wide; up to 64 ways, a scan of the set's tags is
    # faster than a random read of an index of every id (measured: twice as fast at 32 ways)
    wide = min(ways, cache_rows) > 64
    bound = num_rows if wide and num_rows is not None and num_rows <= _INDEX_IDS else None
    cache = SetAssociativeCache(cache_rows, ways, policy, "cpu", id_bound=bound)
    res = EngineResult(policy, cache.capacity)
    t0 = time.perf_counter()
    step_each(cache, ids, show, hits)
    res.seconds = time.perf_counter() - t0
    c = cache.counters.tolist()
    res.requests, res.unique, res.hits = c[st.REQUESTS], c[st.UNIQUE], c[st.HITS]
    res.misses, res.conflicts, res.evictions = c[st.MISSES], c[st.CONFLICTS], c[st.EVICTIONS]
    check_replay(res, cache)
    return res


__all__ = ["COMPILED", "replay_requests", "step_each", "supports", "warm_up"]
