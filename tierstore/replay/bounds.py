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
That loop is the one per-request Python loop here: the greedy is inherently sequential (each
decision depends on all earlier ones). The tests check it against a literal Belady simulation.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

from ..progress import progress
from .fully_assoc import as_id_array, as_sizes, previous_use

_STEP = 1 << 18  # requests per progress-bar tick


def compulsory_misses(ids) -> int:
    """The miss floor of any cache that starts empty: the number of distinct ids."""
    ids = as_id_array(ids)
    return int(np.unique(ids).size) if ids.size else 0


def _greedy_kept(starts: array, tracks: int, show: bool) -> int:
    """Intervals kept by best fit, given each interval's latest usable slot (see opt_hits).

    Slots ``1..tracks`` are the tracks free from the start; slot ``tracks + 1 + k`` is the end
    of interval ``k``, free once that interval is kept; slot 0 means "none". ``par`` is a
    union-find whose roots are the free slots: a slot taken or never freed points one left,
    so the root above slot ``s`` is the largest free slot ``<= s``.
    """
    m = len(starts)
    # array('q') rather than a list: 8 bytes a slot instead of about 36, at the same speed
    par = array("q", range(m + tracks + 1))
    rejected = 0
    for a in progress(range(0, m, _STEP), "OPT", enabled=show, total=-(-m // _STEP)):
        for k, x in enumerate(starts[a : a + _STEP], tracks + 1 + a):
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
            else:
                par[k] = k - 1  # interval k is not kept: its end frees nothing
                rejected += 1
    return m - rejected


def opt_hits(
    ids, cache_sizes: Sequence[int] | int, *, prev: np.ndarray | None = None, show: bool = True
) -> np.ndarray:
    """Hits of Belady's OPT for each cache size (a fully associative cache of that many rows).

    Args:
        ids: the requests, a 1-D integer array.
        cache_sizes: rows in the cache, one result per size.
        prev: :func:`previous_use` of ``ids`` when already at hand.
        show: a progress bar on a terminal.

    Returns:
        int64 hits per size.
    """
    ids = as_id_array(ids)
    sizes = as_sizes(cache_sizes)
    n = ids.size
    if prev is None:
        prev = previous_use(ids)
    gap = np.arange(n) - prev
    reuse = prev >= 0
    immediate = int(np.count_nonzero(reuse & (gap == 1)))
    ends = np.flatnonzero(reuse & (gap >= 2))  # intervals with an inside, by increasing end
    distinct = n - int(np.count_nonzero(reuse))
    # Latest usable slot of each interval, before adding the track count: how many earlier
    # interval ends are <= p + 1 (a track that freed at p + 1 can take an interval from p).
    latest = np.searchsorted(ends, prev[ends] + 1, side="right")
    out = np.zeros(sizes.size, np.int64)
    for j, c in enumerate(sizes.tolist()):
        if c <= 0:
            continue
        if c >= distinct:  # everything fits: only first requests miss
            out[j] = n - distinct
            continue
        tracks = c - 1
        starts = array("q", (latest + tracks).astype(np.int64).tobytes())
        out[j] = immediate + _greedy_kept(starts, tracks, show)
    return out


def opt_misses(ids, cache_sizes: Sequence[int] | int, **kw) -> np.ndarray:
    """Misses of OPT for each cache size (requests minus :func:`opt_hits`)."""
    return as_id_array(ids).size - opt_hits(ids, cache_sizes, **kw)
