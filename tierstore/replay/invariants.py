"""What must hold of the engine's caches at the end of every replay, whatever the trace.

:func:`check_replay` runs at the end of :func:`tierstore.replay.engine.replay_engine`, so that
a bug in a cache step (a lock never given back, a counter that drifts, a way filled twice)
surfaces as an :class:`~tierstore.errors.InternalError` rather than as a plausible but wrong
hit ratio.
"""

from __future__ import annotations

import torch

from .. import stats as st
from ..cache import EMPTY
from ..errors import InternalError


def check_replay(result, l1, l2=None, l1_homes: torch.Tensor | None = None) -> None:
    """Raises :class:`InternalError` naming every invariant that does not hold after a replay.

    Args:
        result: the replay's ``EngineResult`` (its counters read from ``l1``).
        l1: the replayed L1 cache (``SetAssociativeCache`` or the CUDA cache).
        l2: the cache that stood for L2 in a two-level replay, else ``None``.
        l1_homes: (``l1.capacity``,) the L2 slot of the row in each L1 slot (-1: none), with
            ``l2``.

    The invariants:
        - every batch was released: no way of L1 is locked;
        - ``hits + misses == unique <= requests``, ``conflicts <= misses``, and every eviction
          is a fill's: ``evictions <= misses - conflicts``;
        - a replay never empties a way, so the ways that hold a row are the fills that found
          an empty one: ``misses - conflicts - evictions``;
        - with L2: its own ``hits + misses == unique``, every L1 miss was found in L2 or read
          from L3 (``l2_hits + l3_reads == misses``), and L2's locks are exactly the pins of the
          rows L1 holds (one per L1 slot whose row has an L2 slot).
    """
    broken = []
    locked = int((l1.locks != 0).sum())
    if locked:
        broken.append(f"{locked} ways of L1 still locked after the last release")
    r = result
    if r.hits + r.misses != r.unique:
        broken.append(f"hits {r.hits} + misses {r.misses} != unique {r.unique}")
    if r.unique > r.requests:
        broken.append(f"unique {r.unique} > requests {r.requests}")
    if not 0 <= r.conflicts <= r.misses:
        broken.append(f"conflicts {r.conflicts} not in [0, misses {r.misses}]")
    fills = r.misses - r.conflicts
    if not 0 <= r.evictions <= fills:
        broken.append(f"evictions {r.evictions} not in [0, fills {fills}]")
    held = int((l1.tags != EMPTY).sum())
    if held != fills - r.evictions:
        broken.append(f"{held} ways hold a row, but fills - evictions = {fills - r.evictions}")
    if l2 is not None:
        c = l2.counters.tolist()
        if c[st.HITS] + c[st.MISSES] != c[st.UNIQUE]:
            broken.append(f"L2: hits {c[st.HITS]} + misses {c[st.MISSES]} != unique {c[st.UNIQUE]}")
        if r.l2_hits + r.l3_reads != r.misses:
            broken.append(f"l2_hits {r.l2_hits} + l3_reads {r.l3_reads} != misses {r.misses}")
        if l1_homes is not None:
            pins, homes = int(l2.locks.sum()), int((l1_homes >= 0).sum())
            if pins != homes:
                broken.append(f"L2 holds {pins} locks, but {homes} L1 rows are pinned in it")
    if broken:
        raise InternalError(f"replay of {r.policy}, {r.cache_rows} rows: " + "; ".join(broken))


def check_attribution(result, requested, unique, hits) -> None:
    """Raises :class:`InternalError` unless the tables' figures of a shared-cache replay add
    up to the cache's: ``requested``, ``unique``, ``hits`` (``(T,)`` each) sum to the result's
    ``requests``, ``unique`` and ``hits``, and no table hits more often than it looks up."""
    broken = []
    for what, per_table, whole in (
        ("requests", requested, result.requests),
        ("unique", unique, result.unique),
        ("hits", hits, result.hits),
    ):
        if int(per_table.sum()) != whole:
            broken.append(f"the tables' {what} sum to {int(per_table.sum())}, not {whole}")
    if bool((hits > unique).any()):
        broken.append("a table hits more often than it looks up")
    if broken:
        raise InternalError(
            f"replay of {result.policy}, {result.cache_rows} rows, per table: " + "; ".join(broken)
        )
