"""Modern replacement policies to compare the engine and the bounds with.

Each is one small file holding one :class:`ReferencePolicy` (``access(key) -> hit``,
``run(ids) -> hits``), registered below by one line. :func:`policy_hits` runs one for several
cache sizes, in the shape of the other reference functions
(``hits = f(ids, cache_sizes, hit_flags=None) -> np.ndarray``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import InvalidInputError
from ..fully_assoc import as_id_array, as_sizes, check_hit_flags
from .base import ReferencePolicy
from .s3fifo import S3FIFO
from .wtinylfu import WTinyLFU

POLICIES: dict[str, type[ReferencePolicy]] = {}


def register(cls: type[ReferencePolicy]) -> type[ReferencePolicy]:
    """Adds a policy class to :data:`POLICIES` under its ``name``."""
    POLICIES[cls.name] = cls
    return cls


register(S3FIFO)
register(WTinyLFU)


def make_policy(name: str, capacity: int, **params) -> ReferencePolicy:
    """A fresh, empty policy object by registry name."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown policy {name!r}; registered: {sorted(POLICIES)}"
        ) from None
    return cls(capacity, **params)


def policy_hits(
    name: str,
    ids,
    cache_sizes: Sequence[int] | int,
    *,
    show: bool = True,
    hit_flags: np.ndarray | None = None,
    **params,
) -> np.ndarray:
    """Hits of policy ``name`` for each cache size, each run from an empty cache.

    ``hit_flags``: ``(len(cache_sizes), len(ids))`` bool, where given set to whether each
    request hit at each size. ``params``: the policy class's own (its queues' shares).
    """
    ids = as_id_array(ids)
    sizes = as_sizes(cache_sizes).tolist()
    if hit_flags is not None:
        check_hit_flags(hit_flags, (len(sizes), ids.size))
    return np.array(
        [
            make_policy(name, c, **params).run(
                ids, show=show, hit_flags=None if hit_flags is None else hit_flags[j]
            )
            for j, c in enumerate(sizes)
        ],
        dtype=np.int64,
    )


__all__ = [
    "POLICIES",
    "ReferencePolicy",
    "S3FIFO",
    "WTinyLFU",
    "make_policy",
    "policy_hits",
    "register",
]
