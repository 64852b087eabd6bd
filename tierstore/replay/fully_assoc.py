"""Fully associative LRU at request granularity: Mattson's stack distances, vectorised.

The LRU stack distance of a request is the number of distinct ids requested since the last
request to the same id (``-1`` for a first request). An LRU cache of ``C`` rows hits exactly the
requests whose distance is below ``C``, so one pass gives the hits of every cache size.

How it is computed without a loop per request. With ``p`` the previous request to the id
requested at ``i``, the distinct ids in between are counted once each, at their first request
after ``p``: those ``j`` in ``(p, i)`` whose own previous request is before ``p``. Split into
first-ever requests (a prefix count) and repeats::

    d(i) = #first-ever requests in (p, i)  +  #{repeats j < i : prev(j) < p}  -  #repeats <= p

The middle term is, over the repeats taken in time order with their (distinct) ``prev`` values,
"how many earlier elements are smaller", an offline 2-D dominance count. It is done in chunks
of about a million repeats: inside a chunk by a wavelet tree over the chunk's ranks (one pass of
about ten numpy operations per bit, node starts found by arithmetic because the ranks are a
permutation, so no random gathers), and between chunks by a prefix count over the values seen.
That is ``O(n log n)`` work in large vectorised steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError
from ..progress import progress
from ..validate import as_id_array

_CHUNK = 1 << 20  # repeats per wavelet tree: its arrays stay in cache


def as_sizes(cache_sizes: Sequence[int] | int) -> np.ndarray:
    """Cache sizes as an int64 array of non-negative counts."""
    s = np.atleast_1d(np.asarray(cache_sizes))
    if s.ndim != 1 or (s.size and not np.issubdtype(s.dtype, np.integer)):
        raise InvalidInputError(f"cache_sizes must be integers, got {cache_sizes!r}")
    if (s < 0).any():
        raise InvalidInputError(f"cache_sizes must be >= 0, got {s.tolist()}")
    return s.astype(np.int64)


def check_hit_flags(hit_flags, shape: tuple[int, ...]) -> None:
    """Raises InvalidInputError unless ``hit_flags`` is a writable bool array of ``shape``: the
    reference functions' ``hit_flags`` (one row per cache size, one flag per request)."""
    if (
        not isinstance(hit_flags, np.ndarray)
        or hit_flags.dtype != np.bool_
        or hit_flags.shape != shape
        or not hit_flags.flags.writeable
    ):
        got = (
            f"{hit_flags.dtype} array of shape {hit_flags.shape}"
            if isinstance(hit_flags, np.ndarray)
            else type(hit_flags).__name__
        )
        raise InvalidInputError(
            f"hit_flags must be a writable bool array of shape {shape}, got {got}"
        )


def previous_use(ids) -> np.ndarray:
    """For each request, the index of the previous request to the same id, or -1.

    One sort groups equal ids with their positions in order; neighbours in a group are
    consecutive requests. The sort packs (id, position) into one int64 when the id range
    allows it (a plain sort is much faster than a stable argsort).
    """
    ids = as_id_array(ids)
    n = ids.size
    prev = np.full(n, -1, np.int64)
    if n < 2:
        return prev
    bits = int(n - 1).bit_length()
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo < (1 << (63 - bits)):
        key = (ids - lo) << bits
        key |= np.arange(n, dtype=np.int64)
        key.sort()
        order = key & ((1 << bits) - 1)
        key >>= bits
        same = key[1:] == key[:-1]
    else:
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        same = sid[1:] == sid[:-1]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def next_use(ids, prev: np.ndarray | None = None) -> np.ndarray:
    """For each request, the index of the next request to the same id, or ``len(ids)``."""
    if prev is None:
        prev = previous_use(ids)
    nxt = np.full(prev.size, prev.size, np.int64)
    rep = np.flatnonzero(prev >= 0)
    nxt[prev[rep]] = rep
    return nxt


def _earlier_smaller_perm(x: np.ndarray) -> np.ndarray:
    """For a permutation ``x`` of ``range(S)``: ``#{k' < k : x[k'] < x[k]}`` for every ``k``.

    A wavelet tree built top bit first. At the level of bit ``l`` the elements sit grouped by
    their value's bits above ``l`` (a node), in original order inside a node. Because ``x`` is
    a permutation, every node but the last holds exactly ``2**(l+1)`` values and ``2**l`` of
    them have bit ``l`` clear, so node starts and "zeros before the node" are arithmetic. An
    element with bit ``l`` set gains the zeros before it in its node: earlier elements that
    agree above ``l`` and are smaller at ``l``. Summed over the levels, that is the count.
    """
    size = x.size
    dt = np.int32 if size < (1 << 30) else np.int64
    cur = x.astype(dt)
    res = np.zeros(size, dt)
    pos = np.arange(size, dtype=dt)
    zeros = np.empty(size + 1, dt)
    zeros[0] = 0
    cur2, res2 = np.empty_like(cur), np.empty_like(res)
    for level in range(max(1, int(size - 1).bit_length()) - 1, -1, -1):
        bit = cur >> level
        bit &= 1
        np.cumsum(1 - bit, out=zeros[1:])
        start = pos & ~((1 << (level + 1)) - 1)  # node start
        before = zeros[:-1] - (start >> 1)  # zeros before me inside my node
        res += bit * before
        # Stable split of each node: zeros to its front half, ones to its back half.
        dest = start + before
        dest += bit * ((1 << level) + pos - start - 2 * before)
        cur2[dest] = cur
        res2[dest] = res
        cur, cur2 = cur2, cur
        res, res2 = res2, res
    out = np.empty(size, dt)
    out[cur] = res  # the last level is sorted by value
    return out[x]


def earlier_smaller(values: np.ndarray, universe: int, show: bool = False) -> np.ndarray:
    """``#{k' < k : values[k'] < values[k]}`` for distinct ``values`` in ``range(universe)``."""
    m = values.size
    out = np.empty(m, np.int64)
    if m == 0:
        return out
    mark = np.zeros(universe, bool)
    mark[values] = True
    rank = (np.cumsum(mark) - 1)[values]  # a permutation of range(m), same order as values
    chunk = max(_CHUNK, -(-m // 32))  # at most 32 chunks: the cross-chunk prefix count is O(m)
    seen = np.zeros(m, np.int32)
    below = np.empty(m + 1, np.int64)
    below[0] = 0
    bits = max(1, int(chunk - 1).bit_length())
    steps = range(0, m, chunk)
    for a in progress(steps, "LRU distances", enabled=show and len(steps) > 2):
        g = rank[a : a + chunk]
        # ranks inside the chunk, from one packed sort
        key = (g << bits) | np.arange(g.size, dtype=np.int64)
        key.sort()
        local = np.empty(g.size, np.int64)
        local[key & ((1 << bits) - 1)] = np.arange(g.size)
        c = _earlier_smaller_perm(local).astype(np.int64)
        if a:
            np.cumsum(seen, out=below[1:])
            c += below[g]  # smaller values in the earlier chunks
        out[a : a + g.size] = c
        seen[g] = 1
    return out


def lru_stack_distances(ids, prev: np.ndarray | None = None, show: bool = True) -> np.ndarray:
    """Mattson's LRU stack distance of every request (int64; -1 for a first request).

    A fully associative LRU cache of ``C`` rows hits request ``i`` exactly when
    ``0 <= d[i] < C``. ``prev`` may pass a precomputed :func:`previous_use`; ``show``: a
    progress bar on a terminal for long traces.
    """
    ids = as_id_array(ids)
    n = ids.size
    if prev is None:
        prev = previous_use(ids)
    dist = np.full(n, -1, np.int64)
    rep = np.flatnonzero(prev >= 0)
    if rep.size == 0:
        return dist
    p = prev[rep]
    first = np.zeros(n + 1, np.int64)
    np.cumsum(prev < 0, out=first[1:])  # first[k]: first-ever requests in [0, k)
    new_between = first[rep] - first[p + 1]
    repeats_upto_p = (p + 1) - first[p + 1]
    dist[rep] = new_between + earlier_smaller(p, n, show) - repeats_upto_p
    return dist


def hits_from_distances(dist: np.ndarray, cache_sizes: Sequence[int] | int) -> np.ndarray:
    """Hits of an LRU cache of each size, from :func:`lru_stack_distances`."""
    sizes = as_sizes(cache_sizes)
    d = dist[dist >= 0]
    if d.size == 0:
        return np.zeros(sizes.size, np.int64)
    cum = np.cumsum(np.bincount(d))  # cum[k]: requests with distance <= k
    idx = np.minimum(sizes, cum.size) - 1
    return np.where(sizes > 0, cum[np.maximum(idx, 0)], 0).astype(np.int64)


def lru_hits(
    ids,
    cache_sizes: Sequence[int] | int,
    *,
    show: bool = True,
    hit_flags: np.ndarray | None = None,
) -> np.ndarray:
    """Hits of a fully associative LRU cache of each size in ``cache_sizes`` (one pass).

    ``hit_flags``: ``(len(cache_sizes), len(ids))`` bool, where given set to whether each
    request hit at each size (its stack distance is below the size).
    """
    ids = as_id_array(ids)
    sizes = as_sizes(cache_sizes)
    if hit_flags is not None:
        check_hit_flags(hit_flags, (sizes.size, ids.size))
    dist = lru_stack_distances(ids, show=show)
    if hit_flags is not None:
        for row, c in zip(hit_flags, sizes.tolist()):
            np.logical_and(dist >= 0, dist < c, out=row)
    return hits_from_distances(dist, sizes)
