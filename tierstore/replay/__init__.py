"""Replaying access traces: bounds and reference policies (fully associative, per request),
and the engine's own set-associative cache (``replay.engine``).

Every reference function has one shape, so a driver can loop over them::

    hits = f(ids, cache_sizes)   # ids: 1-D int64 array; returns int64 hits per size

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


def reference_hits(name: str, ids, cache_sizes: Sequence[int] | int) -> np.ndarray:
    """Hits of the reference ``name`` (a key of :data:`REFERENCE`) for each cache size."""
    try:
        f = REFERENCE[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown reference policy {name!r}; known: {sorted(REFERENCE)}"
        ) from None
    return f(ids, cache_sizes)


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
