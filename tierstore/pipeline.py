"""The prefetch pipeline: later batches' cache steps run while the current batch computes.

``TieredEmbeddingBag.prefetch(indices, offsets)`` queues a later batch in the table's
:class:`PrefetchQueue`. On CUDA (whole table in L2) its cache step runs on a side stream of the
table's store, ordered against the compute stream by events only:

* ``push`` (the prefetch call) records an event on the compute stream and queues the batch's
  unique step on the side stream after it: that step changes nothing, so it may run before the
  batch's checks are read back. The side stream is thus ordered after everything the compute
  stream had queued by then (the previous batch's backward has released its locks and marked its
  rows dirty before this batch chooses victims).
* ``advance`` (at the end of the previous batch's ``forward``, when the compute stream has
  that forward's kernels queued and the host may wait without idling the device) waits for the
  next batch's checks and queues the rest of its cache step (probe, victims, writebacks, fills)
  on the side stream. Only the next batch is placed ahead: at most two batches hold rows. The
  cache step's buffers have the batch's U unique rows, not its n indices: U was copied to the
  host when the unique step was queued (``_ExactCount``), and has arrived by then.
* ``pop`` (the batch's own ``forward``) makes the compute stream wait for that batch's step.

While a later batch's step may still run beside the compute stream, the current batch keeps its
L1 rows locked (its backward does not unlock them in its kernels), and its release and its
conflict-miss refresh wait for the side stream (``TieredStore.join_side``): the later step can
never evict a row in use, and a row that a later step filled from L2 before this batch updated
it there is refreshed. So the rows and outputs are bitwise those of the unpipelined loop; only
which rows are cached when may differ.

On the CPU backend the same queue runs every step in order on the current stream. With an SSD
tier (whose lookup reads the device on the host) ``push`` only does the batch's unique step and
starts reading the rows that L2 lacks from L3 on L3's I/O threads (``read_ahead.py``); the rest
of its step runs at its forward, in the plain loop's order, taking those rows. So the L3 reads
of the next ``depth`` batches overlap the current batches' work.

A ``TieredEmbeddingBagCollection`` keeps one queue per group of tables (one store each), pushes
a batch's share to every group's queue under one key, and undoes the pushes already made
(:meth:`PrefetchQueue.drop_newest`) when a later group refuses the batch.

Shapes: ``n`` indices of a batch.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidInputError, TierstoreError
from .keyed import looks_like_keyed_jagged
from .store import Batch, BatchMode, TieredStore, UniqueStep
from .validate import BatchChecks, read_back_later


@dataclass
class _Prefetched:
    """A queued batch: the user's tensors (to recognise its forward), its flat ids, its checks,
    its unique step and, once placed, the batch and the event that marks it ready."""

    key: tuple[Any, ...]  # (input, offsets) as the user passed them
    versions: tuple[int, ...]  # their in-place version counters at prefetch time
    flat: torch.Tensor  # (n,) int64 on the device
    checks: BatchChecks
    step: UniqueStep | None
    batch: Batch | None = None
    ready: torch.cuda.Event | None = None
    error: TierstoreError | None = None
    ahead: object | None = None  # its L3 rows being read (stores that read ahead)
    # a sync-free unique step's count on its way to the host (_ExactCount)
    count: _ExactCount | None = None


class _ExactCount:
    """A sync-free unique step's count (U, on the device) copied to the host as soon as the step
    is queued, so that the batch's cache step, queued a step later, can size its buffers by U
    rather than by the batch's n indices (a prefetch's temporary device memory: about 82 bytes
    per entry) without waiting for the device: the copy has long arrived by then."""

    def __init__(self, step: UniqueStep):
        self.host, self.ready = read_back_later(step.count)

    def trim(self, step: UniqueStep) -> UniqueStep:
        """``step`` with exactly its U unique ids (and no device count)."""
        self.ready.synchronize()
        u = int(self.host[0])
        if hasattr(step.transpose, "start"):  # (U + 1,) as the exact unique step leaves it
            step.transpose.start = step.transpose.start[: u + 1]
        return dataclasses.replace(step, ids=step.ids[:u], counts=step.counts[:u], count=None)


def _versions(tensors: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(t._version if isinstance(t, torch.Tensor) else -1 for t in tensors)


def _same_tensors(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same tensor objects (and equal non-tensor parts: feature names, ``None``)."""
    return len(a) == len(b) and all(
        x is y or (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y)
        for x, y in zip(a, b)
    )


def _keep_for(stream: torch.cuda.Stream, batch: Batch) -> None:
    """Tells the caching allocator that the batch's side-stream buffers are also used on
    ``stream``, so that it does not hand their memory to a later side-stream allocation while
    the compute stream may still read them."""
    tensors = [batch.ids, batch.slots, batch.addresses, batch.count, batch._inverse]
    if batch.transpose is not None:
        tensors += [v for v in vars(batch.transpose).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(stream)


class PrefetchQueue:
    """A table's prefetched batches, oldest first (see the module docstring).

    Args:
        store: the table's :class:`TieredStore`.
    """

    def __init__(self, store: TieredStore):
        self.store = store
        self.entries: deque[_Prefetched] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, key: tuple[Any, ...], flat: torch.Tensor, checks: BatchChecks) -> None:
        """Queues a later batch: its unique step now (on the side stream, where there is one),
        the rest when it is next in line (:meth:`advance`). A batch that fails its checks
        raises here where the steps run in order, else at its forward (it changed nothing
        either way)."""
        side = self.store.side_stream()
        entry = _Prefetched(key, _versions(key), flat, checks, None)
        if side is None:
            checks.wait()  # in order: the host reads the checks now, and a bad batch raises
            entry.step = self.store.unique(flat, BatchMode.TRAIN)
            if self.store.reads_ahead:  # its L3 reads start now, its step at its forward
                entry.ahead = self.store.read_ahead(entry.step)
                self.entries.append(entry)
                return
        else:
            side.wait_stream(torch.cuda.current_stream(self.store.device))
            with torch.cuda.stream(side):
                entry.step = self.store.unique(flat, BatchMode.TRAIN)
                if entry.step.count is not None:
                    entry.count = _ExactCount(entry.step)
        self.entries.append(entry)
        if side is None:  # in order: the next batch in line is placed at once (a batch that
            self.advance()  # L2 cannot hold raises here, with nothing changed)
            if entry.error is not None:
                self.entries.pop()
                raise entry.error

    def advance(self) -> None:
        """Places the next batch in line if it is not placed yet: waits for its checks (a bad
        batch is kept, with its error, to raise at its forward; nothing of it changed the
        table), then queues the rest of its cache step. Only the next batch is placed, so that
        at most two batches hold rows at a time (the current one and the next); the later ones
        have their unique step done."""
        if not self.entries:
            return
        entry = self.entries[0]
        if entry.batch is not None or entry.error is not None or self.store.reads_ahead:
            return  # (a store that reads ahead places a batch at its forward)
        try:
            entry.checks.wait()
        except TierstoreError as e:
            entry.error, entry.step = e, None
            return
        side = self.store.side_stream()
        step = entry.step if entry.count is None else entry.count.trim(entry.step)
        try:  # a batch that L2 cannot hold is refused before anything changes
            if side is None:
                entry.batch = self.store.place(step, BatchMode.TRAIN)
            else:
                with torch.cuda.stream(side):
                    entry.batch = self.store.place(step, BatchMode.TRAIN)
        except TierstoreError as e:
            entry.error, entry.step = e, None
            return
        if side is not None:
            entry.ready = self.store.mark_side_work()
            _keep_for(torch.cuda.current_stream(self.store.device), entry.batch)
        entry.step = None

    def is_next(self, key: tuple[Any, ...], flat: torch.Tensor | None = None) -> bool:
        """Whether the oldest queued batch is the one of ``key``: the same tensors, unchanged
        since :meth:`push` (no device read), or, given ``flat``, the same ids (a device read:
        not the fast way). False if nothing is queued."""
        if not self.entries:
            return False
        entry = self.entries[0]
        if _same_tensors(entry.key, key) and entry.versions == _versions(key):
            return True
        return flat is not None and torch.equal(entry.flat, flat)

    def drop_newest(self) -> None:
        """Undoes the last :meth:`push` (a caller whose same batch another queue refused: a
        collection's later group), releasing its rows if they were placed."""
        self._drop(self.entries.pop())
        self.store.join_side()  # its side-stream step read its ids: done before they are freed

    def pop(self, key: tuple[Any, ...], flat: torch.Tensor) -> Batch | None:
        """The oldest queued batch if ``key`` is its forward (the same tensors, unchanged, or
        equal ids), ready to use on the current stream; None if nothing is queued. Raises
        :class:`InvalidInputError` on a forward that is not the oldest prefetched batch's."""
        if not self.entries:
            return None
        entry = self.entries[0]
        if not self.is_next(key, flat):
            raise InvalidInputError(
                "forward's indices differ from the oldest prefetched batch: prefetch batches "
                "in the order forward will see them (or call clear_prefetched() first)"
            )
        self.advance()  # places it, if the last forward did not
        self.entries.popleft()
        if entry.error is not None:
            raise entry.error
        if entry.batch is None:  # read ahead: placed now, in the plain loop's order
            return self.store.place(entry.step, BatchMode.TRAIN, entry.ahead)
        if entry.ready is not None:
            torch.cuda.current_stream(self.store.device).wait_event(entry.ready)
        return entry.batch

    def clear(self) -> None:
        """Drops every queued batch, releasing the rows of those already placed."""
        while self.entries:
            self._drop(self.entries.popleft())
        self.store.join_side()

    def _drop(self, entry: _Prefetched) -> None:
        """Releases a dropped batch's rows (placed) or forgets its read ahead (not placed)."""
        if entry.batch is not None:
            self.store.release(entry.batch)
        else:
            self.store.drop_read_ahead(entry.ahead)


def prefetching(batches: Iterable[Any], modules: Any, depth: int = 2) -> Iterator[Any]:
    """Yields each of ``batches`` unchanged while keeping the next ``depth`` batches
    prefetched into every module of ``modules`` (one module or an iterable of them), so that
    their cache steps run while the current batch computes.

    A batch is what the modules' forward takes: an index tensor, or an ``(indices, offsets)``
    or ``(indices, offsets, per_sample_weights)`` tuple; every module is prefetched with the
    same indices and offsets. For a :class:`~tierstore.TieredEmbeddingBagCollection`, a batch
    is a ``KeyedJaggedTensor`` or a dict of feature name to ``(indices, offsets)``, passed
    whole. The loop body must call each module's forward on the yielded
    batch, in order (a batch skipped or changed in between raises at the next forward). The
    trained rows and outputs are bitwise those of the same loop without ``prefetching``.

    Example::

        for ids, offsets in ts.prefetching(loader, emb, depth=2):
            loss = model(emb(ids, offsets))
            loss.backward()
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise InvalidInputError(f"depth must be a non-negative int, got {depth!r}")
    if isinstance(modules, torch.nn.Module) and hasattr(modules, "prefetch"):
        modules = [modules]
    modules = list(modules)
    for m in modules:
        if not hasattr(m, "prefetch"):
            raise InvalidInputError(f"prefetching: {type(m).__name__} has no prefetch()")

    def prefetch(batch: Any) -> None:
        if isinstance(batch, torch.Tensor):
            args: tuple[Any, ...] = (batch,)
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            args = tuple(batch[:2])
        elif isinstance(batch, Mapping) or looks_like_keyed_jagged(batch):
            args = (batch,)  # a collection's batch, whole
        else:
            raise InvalidInputError(
                "prefetching: a batch must be an index tensor, an (indices, offsets[, "
                "per_sample_weights]) tuple, a KeyedJaggedTensor or a dict of feature name to "
                f"(indices, offsets), got {type(batch).__name__}"
            )
        for m in modules:
            m.prefetch(*args)

    it = iter(batches)
    window: deque[Any] = deque()
    for batch in it:  # the current batch and the next `depth`, each prefetched as it comes
        prefetch(batch)
        window.append(batch)
        if len(window) > depth:
            break
    finished = False
    try:
        while window:
            yield window.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                prefetch(nxt)
                window.append(nxt)
        finished = True
    finally:
        if not finished:  # the loop stopped early: release what it had looked ahead
            for m in modules:
                m.clear_prefetched()


_END = object()
