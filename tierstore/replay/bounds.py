"""Bounds on any cache's hits: Belady's OPT and the compulsory-miss floor.

Both are for a fully associative cache at request granularity that must hold the row it
serves (demand fetching, as every policy here and the engine do). No such cache of ``C`` rows
hits more often than OPT of ``C`` rows, and none misses fewer times than there are distinct ids.

OPT as an interval problem. Call consecutive requests ``p < i`` to one id a reuse interval;
request ``i`` hits exactly when the id stayed cached from ``p`` to ``i``. At a time ``t`` the
cache holds the id requested at ``t`` plus the ids kept across ``t``, so a set of hits is
achievable exactly when no time ``t`` lies strictly inside more than ``C - 1`` kept
intervals (``i = p + 1`` has no inside and always hits). OPT keeps the most intervals under that
limit. Belady's rule (evict the row used farthest in the future) does this; so does the
equivalent greedy that takes intervals by increasing end ``i`` and keeps one when it fits.
"Fits" has a cheap test: think of ``C - 1`` tracks, each a chain of kept intervals; an
interval ``(p, i)`` fits when some track is free by time ``p + 1``, and it takes the track
that became free last (best fit, which keeps the earliest-free tracks for intervals that
need them). The free tracks are a set of "free since" times; best fit asks for the largest one
``<= p + 1``, removes it and adds ``i``. A union-find over the interval ends answers that in
near-constant amortised time, so OPT for one size is a single loop of a few list operations
per request (``O(n log n)`` including the sort that finds each request's previous use).
That loop is the one per-request loop here: the greedy is inherently sequential (each
decision depends on all earlier ones), so numba compiles it (``tierstore/compiled.py``). The
tests check it against a literal Belady simulation.

The kept intervals are an optimal schedule, so they say which requests hit (the ends of the
kept intervals and every immediate reuse): a shared cache's replay attributes those to tables.
OPT's hit set is not unique (ties), but its count is, and any table's share of it comes from
one schedule that reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..compiled import compiled, int_buffer
from ..progress import progress
from .fully_assoc import as_id_array, as_sizes, check_hit_flags, previous_use

_STEP = 1 << 20  # requests per progress-bar tick


def compulsory_misses(ids) -> int:
    """The miss floor of any cache that starts empty: the number of distinct ids."""
    ids = as_id_array(ids)
    return int(np.unique(ids).size) if ids.size else 0


@compiled
def _best_fit(starts, par, slot, kept) -> int:
    """Best fit for the intervals whose latest usable slots are ``starts``, the first of them
    ending at slot ``slot``; returns how many were rejected, and sets ``kept[k]`` to 1 where
    interval ``k`` was kept, else 0. ``par`` (see :func:`_greedy_kept`) is updated in place,
    so consecutive chunks continue one run."""
    rejected = 0
    for k in range(len(starts)):
        x = starts[k]
        r = par[x]
        if r != x:  # find the root, then point the path at it
            pr = par[r]
            if pr != r:
                r = pr
                pr = par[r]
                while pr != r:
                    r = pr
                    pr = par[r]
                while x != r:
                    nx = par[x]
                    par[x] = r
                    x = nx
        if r:
            par[r] = r - 1  # the track is taken; its slot is no longer free
            kept[k] = 1
        else:
            par[slot] = slot - 1  # this interval is not kept: its end frees nothing
            kept[k] = 0
            rejected += 1
        slot += 1
    return rejected


def _greedy_kept(
    starts: np.ndarray, tracks: int, show: bool, kept: np.ndarray | None = None
) -> int:
    """Intervals kept by best fit, given each interval's latest usable slot (see opt_hits);
    ``kept``: ``(len(starts),)`` bool, where given set to whether each interval was kept.

    Slots ``1..tracks`` are the tracks free from the start; slot ``tracks + 1 + k`` is the end
    of interval ``k``, free once that interval is kept; slot 0 means "none". ``par`` is a
    union-find whose roots are the free slots: a slot taken or never freed points one left,
    so the root above slot ``s`` is the largest free slot ``<= s``.
    """
    m = starts.size
    # 32-bit slots where they fit: half the memory that the union-find reads at random
    dtype = np.int32 if m + tracks < (1 << 31) else np.int64
    par = int_buffer(np.arange(m + tracks + 1, dtype=dtype))
    starts = int_buffer(starts.astype(dtype))
    # each chunk's decisions land here (as Python, an ``array``: a copy of a numpy slice would
    # not come back), copied out where wanted
    flags = int_buffer(np.zeros(min(m, _STEP), np.uint8))
    rejected = 0
    for a in progress(range(0, m, _STEP), "OPT", enabled=show, total=-(-m // _STEP)):
        chunk = starts[a : a + _STEP]
        rejected += _best_fit(chunk, par, tracks + 1 + a, flags)
        if kept is not None:
            kept[a : a + len(chunk)] = np.frombuffer(flags, np.uint8)[: len(chunk)]
    return m - rejected


def opt_hits(
    ids,
    cache_sizes: Sequence[int] | int,
    *,
    prev: np.ndarray | None = None,
    show: bool = True,
    hit_flags: np.ndarray | None = None,
) -> np.ndarray:
    """Hits of Belady's OPT for each cache size (a fully associative cache of that many rows).

    Args:
        ids: the requests, a 1-D integer array.
        cache_sizes: rows in the cache, one result per size.
        prev: :func:`previous_use` of ``ids`` when already at hand.
        show: a progress bar on a terminal.
        hit_flags: ``(len(cache_sizes), len(ids))`` bool, where given set to whether each
            request hit at each size, in one optimal schedule (see the module's docstring).

    Returns:
        int64 hits per size.
    """
    ids = as_id_array(ids)
    sizes = as_sizes(cache_sizes)
    n = ids.size
    if hit_flags is not None:
        check_hit_flags(hit_flags, (sizes.size, n))
    if prev is None:
        prev = previous_use(ids)
    gap = np.arange(n) - prev
    reuse = prev >= 0
    again = reuse & (gap == 1)  # immediate reuses: every cache of a row or more hits them
    immediate = int(np.count_nonzero(again))
    ends = np.flatnonzero(reuse & (gap >= 2))  # intervals with an inside, by increasing end
    distinct = n - int(np.count_nonzero(reuse))
    # Latest usable slot of each interval, before adding the track count: how many earlier
    # interval ends are <= p + 1 (a track that freed at p + 1 can take an interval from p).
    # A prefix count over time and one gather: a searchsorted of these unsorted queries would
    # be random binary searches, ten times slower on long traces.
    ends_upto = np.zeros(n + 1, np.int64)
    ends_upto[ends + 1] = 1
    np.cumsum(ends_upto, out=ends_upto)  # ends_upto[t + 1]: interval ends <= t
    latest = ends_upto[prev[ends] + 2]  # p + 2 <= i <= n - 1
    out = np.zeros(sizes.size, np.int64)
    kept = np.empty(ends.size, np.bool_) if hit_flags is not None else None
    for j, c in enumerate(sizes.tolist()):
        if hit_flags is not None:
            hit_flags[j] = False
        if c <= 0:
            continue
        if c >= distinct:  # everything fits: only first requests miss
            out[j] = n - distinct
            if hit_flags is not None:
                hit_flags[j] = reuse
            continue
        tracks = c - 1
        out[j] = immediate + _greedy_kept(latest + tracks, tracks, show, kept)
        if hit_flags is not None:  # the immediate reuses, and the ends of the kept intervals
            hit_flags[j] = again
            hit_flags[j, ends[kept]] = True
    return out


def opt_misses(ids, cache_sizes: Sequence[int] | int, **kw) -> np.ndarray:
    """Misses of OPT for each cache size (requests minus :func:`opt_hits`)."""
    return as_id_array(ids).size - opt_hits(ids, cache_sizes, **kw)
