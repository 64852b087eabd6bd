"""One call at a time per table, and releases of freed batches that never block.

A table (a ``TieredEmbeddingBag``, or a ``TieredEmbeddingBagCollection`` of tables) may be
used from several threads. Its caches, its batches in flight and its SSD tier's transaction
are one state that a call changes in several steps, so each public call runs whole, holding
the table's re-entrant lock (:func:`serialised`); the backward of its batches holds it too
(``autograd.py`` takes the owner's ``_lock``). Re-entrant, since calls call calls
(``from_pretrained`` writes rows, ``close`` may flush, a checkpoint flushes).

A training batch's rows stay locked in the caches until its backward runs or its graph is
freed. A freed graph's finalizer runs on whichever thread drops the last reference to it,
possibly one that a locked call is waiting for (an SSD I/O thread, say): blocking there for
the lock could deadlock. So :meth:`SerialisedCalls._release_soon` never blocks: it releases
at once if this thread may take the lock, and otherwise leaves the batch to the table's next
call, which releases it before doing anything else.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .store import Batch

Method = TypeVar("Method", bound=Callable)


class SerialisedCalls:
    """What a table needs for :func:`serialised` calls: ``_lock`` (a ``threading.RLock``) and
    the releases that finalizers left for its next call. A base of the table's class; the
    table calls :meth:`_start_serialising` first thing in its constructor."""

    def _start_serialising(self) -> None:
        """Makes the table's lock and its (empty) queue of deferred releases."""
        self._lock = threading.RLock()
        # batches whose graphs were freed on another thread while a call ran, each with the
        # release of the store it belongs to: released at the next call
        self._deferred_releases: deque[tuple[Callable[[Batch], None], Batch]] = deque()

    def _release_deferred(self) -> None:
        """Releases the batches that finalizers left for this call (the lock is held)."""
        while self._deferred_releases:
            release, batch = self._deferred_releases.popleft()
            release(batch)

    def _release_soon(self, release: Callable[[Batch], None], batch: Batch) -> None:
        """Runs ``release(batch)`` (a store's release of a batch whose graph was freed without
        a backward) now if this thread may take the lock, else at the table's next call:
        finalizers run on whatever thread frees the graph, so this never blocks."""
        if self._lock.acquire(blocking=False):
            try:
                release(batch)
            finally:
                self._lock.release()
        else:
            self._deferred_releases.append((release, batch))


def serialised(method: Method) -> Method:
    """Decorates a method of a :class:`SerialisedCalls` table: it runs holding the table's lock
    (one call at a time per table), after the releases that finalizers left for it."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._release_deferred()
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]
