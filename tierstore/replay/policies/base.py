"""What every reference policy provides, and the chunked driver they share.

A reference policy is a small strategy object for a fully associative cache at request
granularity: built with a capacity in rows, it answers ``access(key) -> hit`` one request at a
time, or ``run(ids) -> hits`` over a whole array. These policies keep per-request state that
cannot be vectorised (queues that reorder on every miss), so ``run`` is one loop over the
requests, compiled by numba (:mod:`tierstore.compiled`) over flat integer buffers; the driver
here feeds it in chunks, with a progress bar on a terminal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ...errors import InvalidInputError
from ...progress import progress
from ..fully_assoc import as_id_array

CHUNK = 1 << 16  # requests per inner loop (and per progress tick)


class ReferencePolicy(ABC):
    """A fully associative replacement policy: ``access`` one id, or ``run`` many."""

    name: ClassVar[str]

    def __init__(self, capacity: int):
        if capacity < 0:
            raise InvalidInputError(f"{self.name}: capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)

    @abstractmethod
    def _run(self, keys: np.ndarray) -> int:
        """Feeds the int64 ids ``keys`` in order; returns how many hit."""

    @abstractmethod
    def __len__(self) -> int:
        """Rows cached now (never more than ``capacity``)."""

    @abstractmethod
    def __contains__(self, key: int) -> bool:
        """Whether ``key`` is cached now."""

    def access(self, key: int) -> bool:
        """One request: True on a hit. The row is cached afterwards (demand fetch)."""
        return self._run(np.array([key], np.int64)) == 1

    def run(self, ids, show: bool = True) -> int:
        """Feeds every id of ``ids`` in order and returns the number of hits."""
        ids = as_id_array(ids)
        hits = 0
        chunks = range(0, ids.size, CHUNK)
        for a in progress(chunks, self.name, enabled=show and ids.size > 4 * CHUNK):
            hits += self._run(ids[a : a + CHUNK])
        return hits
