"""What every reference policy provides, and the chunked driver they share.

A reference policy is a small strategy object for a fully associative cache at request
granularity: built with a capacity in rows, it answers ``access(key) -> hit`` one request at a
time, or ``run(ids) -> hits`` over a whole array (and, where asked, whether each request hit:
a shared cache's replay attributes those to tables). These policies keep per-request state
that cannot be vectorised (queues that reorder on every miss), so ``run`` is one loop over the
requests, compiled by numba (:mod:`tierstore.compiled`) over flat integer buffers; the driver
here feeds it in chunks, with a progress bar on a terminal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ...compiled import int_buffer
from ...errors import InvalidInputError
from ...progress import progress
from ..fully_assoc import as_id_array, check_hit_flags

CHUNK = 1 << 16  # requests per inner loop (and per progress tick)


class ReferencePolicy(ABC):
    """A fully associative replacement policy: ``access`` one id, or ``run`` many."""

    name: ClassVar[str]

    def __init__(self, capacity: int):
        if capacity < 0:
            raise InvalidInputError(f"{self.name}: capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)

    @abstractmethod
    def _run(self, keys: np.ndarray, hit) -> int:
        """Feeds the int64 ids ``keys`` in order; returns how many hit, and sets ``hit[i]``
        (a uint8 :func:`~tierstore.compiled.int_buffer` of at least ``len(keys)``) to 1 where
        ``keys[i]`` hit, else 0. Called only with a positive capacity."""

    @abstractmethod
    def __len__(self) -> int:
        """Rows cached now (never more than ``capacity``)."""

    @abstractmethod
    def __contains__(self, key: int) -> bool:
        """Whether ``key`` is cached now."""

    def access(self, key: int) -> bool:
        """One request: True on a hit. The row is cached afterwards (demand fetch)."""
        if self.capacity == 0:
            return False
        return self._run(np.array([key], np.int64), int_buffer(np.zeros(1, np.uint8))) == 1

    def run(self, ids, show: bool = True, hit_flags: np.ndarray | None = None) -> int:
        """Feeds every id of ``ids`` in order and returns the number of hits.

        ``hit_flags``: ``(len(ids),)`` bool, where given set to whether each request hit.
        """
        ids = as_id_array(ids)
        if hit_flags is not None:
            check_hit_flags(hit_flags, (ids.size,))
        if self.capacity == 0:  # nothing is ever cached
            if hit_flags is not None:
                hit_flags[:] = False
            return 0
        # the loop writes each chunk's flags here (as Python, an ``array``: a copy of a numpy
        # slice would not come back), and they are copied out where wanted
        hit = int_buffer(np.zeros(min(ids.size, CHUNK), np.uint8))
        hits = 0
        chunks = range(0, ids.size, CHUNK)
        for a in progress(chunks, self.name, enabled=show and ids.size > 4 * CHUNK):
            keys = ids[a : a + CHUNK]
            hits += self._run(keys, hit)
            if hit_flags is not None:
                hit_flags[a : a + keys.size] = np.frombuffer(hit, np.uint8)[: keys.size]
        return hits
