"""Replaying access traces: bounds and reference policies (fully associative, per request),
and the engine's own set-associative cache (``replay.engine``).

Every reference function has one shape, so a driver can loop over them::

    hits = f(ids, cache_sizes)   # ids: 1-D int64 array; returns int64 hits per size
    hits = f(ids, cache_sizes, hit_flags=flags)   # and fills flags, (sizes, len(ids)) bool:
                                                  # whether each request hit at each size

:data:`REFERENCE` maps a name to such a function: ``opt`` (Belady), ``fa-lru`` (fully
associative LRU, all sizes in one pass) and every registered modern policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from ..errors import InvalidInputError
from .bounds import compulsory_misses, opt_hits, opt_misses
from .fully_assoc import lru_hits, lru_stack_distances, next_use, previous_use
from .policies import POLICIES, make_policy, policy_hits

HitFunction = Callable[..., np.ndarray]

REFERENCE: dict[str, HitFunction] = {
    "opt": opt_hits,
    "fa-lru": lru_hits,
    **{name: partial(policy_hits, name) for name in POLICIES},
}


def reference_hits(
    name: str, ids, cache_sizes: Sequence[int] | int, *, hit_flags: np.ndarray | None = None
) -> np.ndarray:
    """Hits of the reference ``name`` (a key of :data:`REFERENCE`) for each cache size;
    ``hit_flags``: ``(len(cache_sizes), len(ids))`` bool, where given set to whether each
    request hit at each size."""
    try:
        f = REFERENCE[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown reference policy {name!r}; known: {sorted(REFERENCE)}"
        ) from None
    return f(ids, cache_sizes, hit_flags=hit_flags)


__all__ = [
    "POLICIES",
    "REFERENCE",
    "compulsory_misses",
    "lru_hits",
    "lru_stack_distances",
    "make_policy",
    "next_use",
    "opt_hits",
    "opt_misses",
    "policy_hits",
    "previous_use",
    "reference_hits",
]
