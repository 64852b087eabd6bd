"""The tiered store: one table's rows across L1 (the cache), L2 (host) and L3 (SSD).

The store chains the tiers and owns the life of a batch: ``lookup`` gives every unique row of a
batch a place (an L1 slot, or for a conflict miss its L2 address) and locks it there; the
backend's kernels read and update the rows in place; ``release`` unlocks them. It knows nothing
of bags, pooling or autograd: that is ``module.py``'s job.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import interop
from . import stats as st
from .cache import EMPTY, by_slot
from .errors import CapacityError, InvalidInputError
from .hashing import initial_weights, seed_key
from .host import HostTable
from .optim import Optimizer
from .policy import Policy
from .tiers import HostTier
from .validate import check_id_range, read_back_later


class BatchMode(enum.Enum):
    """What a batch is looked up for: the one flag of :meth:`TieredStore.lookup`.

    ``TRAIN``: a backward will use the batch (a training forward, or one whose per-sample
    weights want a gradient, and every prefetched batch). Its rows stay locked in L1 until
    :meth:`TieredStore.release`, and a backend's unique step makes the sparse transpose that
    the backward reuses.

    ``EVAL``: an inference forward. No backward follows and the batch is released right after
    it is pooled, before any other lookup of the store: the unique step may skip the transpose
    (on CUDA, a histogram of the id space may replace the sort), and the CUDA cache step need
    not lock its rows. The cache's state afterwards is that of a ``TRAIN`` step and release.
    """

    TRAIN = "train"
    EVAL = "eval"

    @property
    def backward(self) -> bool:
        """Whether a backward follows (the transpose is made, the rows are held until release)."""
        return self is BatchMode.TRAIN


@dataclass(frozen=True)
class RowLayout:
    """How a row is stored in every tier: ``dim`` weights then ``state_width`` optimizer floats."""

    dim: int
    state_width: int = 0
    initial_state: float = 0.0

    @property
    def width(self) -> int:
        """Floats per stored row."""
        return self.dim + self.state_width

    @property
    def row_bytes(self) -> int:
        """Bytes per stored row."""
        return 4 * self.width


class RowSeeds(NamedTuple):
    """What never-written rows are made from, as the CUDA fills compute them
    (kernels/insert.cu ``move_rows``): store row ``r`` belongs to table ``k``, the last with
    ``starts[k] <= r``, and its value is :func:`initial_rows` of table-local id
    ``r - starts[k]`` with that table's seed and scale. ``(T,)`` tensors on the store's device;
    a single table is ``T = 1``, a collection's group one entry per table."""

    starts: torch.Tensor  # int64, ascending, starts[0] == 0
    keys: torch.Tensor  # int64: hashing.seed_key of each table's seed
    scales: torch.Tensor  # float32: each table's init_scale


def initial_rows(
    ids: torch.Tensor, layout: RowLayout, seed: int, init_scale: float, device: torch.device
) -> torch.Tensor:
    """Initial rows (weights, then the optimizer's initial state) of never-written ``ids``,
    computed on the GPU when the table has one (the result lands where ``ids`` are)."""
    dev = device if device.type == "cuda" else ids.device
    w = initial_weights(ids.to(dev), layout.dim, seed, init_scale)
    if layout.state_width:
        state = torch.full((w.shape[0], layout.state_width), layout.initial_state, device=dev)
        w = torch.cat([w, state], 1)
    return w.to(ids.device)


def batch_unique(
    backend,
    indices: torch.Tensor,
    num_rows: int | None,
    padded: bool = False,
    transpose: bool = True,
):
    """``(ids, inverse, counts, transpose, count)`` of a batch: its unique ids ascending, as
    ``torch.unique``, by the backend's own unique when it has one (the CUDA backend's also
    returns the sparse transpose that backward reuses unless told no backward will follow
    (``transpose=False``), with ``inverse`` then ``None``: the transpose makes it on demand
    (:attr:`Batch.inverse`); and with ``padded`` it leaves the unique count on the device as
    ``count``; else ``transpose`` and ``count`` are ``None``)."""
    unique = getattr(backend, "unique", None)
    if unique is None:
        ids, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
        return ids, inverse, counts, None, None
    return unique(indices, num_rows, padded, transpose)


@dataclass
class UniqueStep:
    """A batch's unique step (:meth:`TieredStore.unique`), before its rows are placed."""

    ids: torch.Tensor  # (U,) int64 ascending (a buffer of n, U used, where count is set)
    inverse: torch.Tensor | None  # (n,) int64, or None where the transpose stands for it
    counts: torch.Tensor  # (U,) int64: indices per unique id
    transpose: object | None  # the backend's sparse transpose, if its unique made one
    count: torch.Tensor | None  # (1,) int32 device tensor: U, for a sync-free step


@dataclass
class Batch:
    """A batch in flight: its unique rows and where each one is until :meth:`TieredStore.release`
    (the same fields for every backend; one's own record of the batch is its ``transpose``).

    Shapes: ``n`` indices, ``U`` unique rows.
    """

    ids: torch.Tensor  # (U,) int64, ascending
    # (n,) int64: position in ids of each index; None where the transpose stands for it (inverse)
    _inverse: torch.Tensor | None
    slots: torch.Tensor  # (U,) int64 L1 slot, -1 for a conflict miss
    addresses: torch.Tensor  # (U,) int64 L2 address
    released: bool = False
    # The backend's own record of the unique step, if it made one (CUDA: the sparse transpose
    # and the places, cuda_unique.Transpose); it makes the inverse on demand
    transpose: object | None = None
    # U as a (1,) int32 device tensor where the step kept it there (no host sync): then ids,
    # slots and addresses are buffers of n entries, the first U used. None: exactly U.
    count: torch.Tensor | None = None
    # Whether the batch still holds its rows' locks in L1: False for a lookup that took none
    # (an EVAL one may not), and once they are let go, by release or by the backward's kernels
    # (which unlock each row they update); one flag, so that the locks are let go once
    l1_locked: bool = True
    # L1's step number just after this batch's lookup (each lookup is one step): where it is
    # still that at the backward, no other batch can have filled a conflict miss of this one
    # into L1 since
    lookup_number: int = 0
    # An L2 over an SSD tier keeps its state on the host: there, the batch's L2 addresses and
    # those of its conflict misses (rows the backward updates in L2 in place), read with the
    # cache step's decisions (L2Record), so that the backward and the release read no device
    l2_held: torch.Tensor | None = None
    l2_conflicts: torch.Tensor | None = None

    @property
    def inverse(self) -> torch.Tensor:
        """(n,) int64: position in ``ids`` of each index. A backend whose unique step made a
        sparse transpose leaves the inverse to it, made here on first use: the CUDA training
        step reaches each index's row through its places and never asks."""
        if self._inverse is None:
            self._inverse = self.transpose.inverse()
        return self._inverse

    def trimmed(self) -> Batch:
        """This batch with exactly ``U`` entries (reads ``count`` from the device if set)."""
        if self.count is None:
            return self
        u = int(self.count[0])
        return replace(self, ids=self.ids[:u], slots=self.slots[:u],
                       addresses=self.addresses[:u], count=None)  # fmt: skip


class L2Record:
    """What an L2 that is inclusive of L1 (over an SSD tier) needs of an L1 cache step, copied
    to the host in one read queued before the step's row moves (which change ``l1.home``):
    the fills' positions, their victims' L2 addresses and whether each victim was a row and
    dirty, and which of the batch's rows are conflict misses. On CUDA the host waits for that
    copy only after the moves are queued (:meth:`apply`).

    Shapes: ``F`` fills (a buffer of ``U`` on the device), ``U`` unique rows.
    """

    def __init__(self, packed: torch.Tensor, ready: torch.cuda.Event | None, fills: int):
        self.packed, self.ready, self.fills = packed, ready, fills

    @classmethod
    def read(cls, store: TieredStore, found) -> L2Record:
        """Queues the copy of ``found``'s decisions (a ``Lookup`` or a ``DeviceLookup``)."""
        if hasattr(found, "n_fill"):  # the device's step: buffers, the first n_fill used
            index, slots = found.fill_index_buffer, found.fill_slots_buffer
            victims, dirty, used = found.victim_ids_buffer, found.victim_dirty_buffer, found.n_fill
        else:
            index, slots, victims, dirty = (found.fill_index, found.fill_slots, found.victim_ids,
                                            found.victim_dirty)  # fmt: skip
            used = torch.full((1,), index.numel(), device=index.device)
        homes = store.l1.home[slots.clamp(0, store.l1.home.numel() - 1)]  # (unused: garbage)
        kind = (victims != EMPTY).long() + 2 * dirty.long()  # 1: a row left, 3: a dirty one
        parts = (index, homes, kind, (found.slots < 0).long(), used.long())
        packed = torch.cat([p.to(store.l1.home.device) for p in parts])
        return cls(*read_back_later(packed), index.numel())

    def apply(self, host: HostTier, held: torch.Tensor) -> torch.Tensor:
        """Unpins the victims' L2 rows, pins the fills' (``held``: the batch's L2 addresses
        on the host) and marks the dirty victims' rows, which the moves write back, dirty.
        Returns the host addresses of the batch's conflict misses."""
        if self.ready is not None:
            self.ready.synchronize()
        f, p = self.fills, self.packed
        used = int(p[-1])
        index, homes, kind = p[:used], p[f : f + used], p[2 * f : 2 * f + used]
        host.unpin(homes[kind != 0])
        host.pin(held[index])
        host.mark_dirty(homes[kind == 3])
        return held[p[3 * f : -1] != 0]


class TieredStore:
    """The rows of one table across the tiers, and the batch step that moves them.

    Args:
        num_rows: rows in the table (``None``: any int64 id, needs an SSD tier).
        layout: row layout (weights and optimizer state).
        cache_rows, ways, policy: the L1 cache.
        device: where L1 lives (and the kernels run).
        seed, init_scale: never-written rows are ``initial_weights(id, dim, seed, init_scale)``.
        backend: the kernels (``tierstore.cpu`` or ``tierstore.cuda``).
    """

    def __init__(
        self,
        num_rows: int | None,
        layout: RowLayout,
        cache_rows: int,
        ways: int,
        policy: str | Policy,
        device: torch.device,
        seed: int,
        init_scale: float,
        backend,
        host: HostTier | None = None,
    ):
        self.num_rows, self.layout = num_rows, layout
        self.device, self.seed, self.init_scale = device, seed, init_scale
        self.backend = backend
        self.l1 = backend.new_cache(cache_rows, ways, policy, device)
        self.l1.hold_rows(layout.dim, layout.state_width)  # (L2 and L3 keep a row whole)
        cuda = device.type == "cuda"
        self.host: HostTier = host or HostTable(
            num_rows, layout.width, self.init_rows, pin=cuda,
            init_device=device if cuda else None,  # the GPU computes the rows
        )  # fmt: skip
        self.inclusive_host = not isinstance(self.host, HostTable)
        self.flushed_rows = 0
        # Where kernels read and write L2's rows in place: the device address of pinned fp32
        # host rows, None if the device cannot reach them. Asked once (it costs a driver call
        # on CUDA): L2's rows never move.
        data = self.host.data
        in_place = data.dtype == torch.float32 and data.is_contiguous()
        self.l2_address = interop.device_pointer(data) if in_place else None
        # and of L2's map of rows ever written (HostTable.written): with it, a fill computes a
        # never-written row from its table's seed (row_seeds) instead of reading it; 0 where L2
        # keeps none, or where a subclass's own init_rows comes without seeds to say how
        # (GroupStore gives them), and the fills read every row
        written = self.host.written
        self.l2_written = 0
        own_rows = type(self).init_rows is not TieredStore.init_rows
        seeded = not own_rows or type(self).seeds is not TieredStore.seeds
        if self.l2_address is not None and written is not None and seeded:
            self.l2_written = interop.device_pointer(written) or 0
        self.row_seeds = self.seeds() if cuda else None
        # Prefetched lookups run on a side stream (side_stream); the event of the last one the
        # current stream has not been ordered after yet (join_side)
        self._side: torch.cuda.Stream | None = None
        self._side_tail: torch.cuda.Event | None = None

    # ------------------------------------------------------------------ rows
    def init_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Initial rows (weights and optimizer state) of never-written ``ids``."""
        return initial_rows(ids, self.layout, self.seed, self.init_scale, self.device)

    def seeds(self) -> RowSeeds:
        """The seeds behind :meth:`init_rows` as the CUDA fills take them (a subclass with its
        own ``init_rows`` gives its own)."""
        dev = self.device
        return RowSeeds(torch.zeros(1, dtype=torch.int64, device=dev),
                        torch.tensor([seed_key(self.seed)], dtype=torch.int64, device=dev),
                        torch.tensor([self.init_scale], dtype=torch.float32, device=dev))  # fmt: skip

    def read_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Current rows (weights and state) of ``ids``, wherever they live. Changes nothing."""
        self.join_side()
        ids = ids.to(self.device)
        slots = self.l1.find(ids)
        rows = self.host.peek(ids).to(self.device)
        cached = slots >= 0
        rows[cached] = self.l1.rows(slots[cached])
        return rows

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites whole rows of unique ``ids`` wherever they live (cached copies marked dirty)."""
        self.join_side()
        ids, rows = ids.to(self.device), rows.to(self.device, torch.float32)
        slots = self.l1.find(ids)
        cached = slots >= 0
        self.l1.set_rows(slots[cached], rows[cached])
        self.l1.mark_dirty(slots[cached])
        self.host.poke(ids[~cached], rows[~cached])

    # ------------------------------------------------------------------ the batch step
    def lookup(
        self,
        indices: torch.Tensor,
        before_change: Callable[[], None] | None = None,
        mode: BatchMode = BatchMode.TRAIN,
    ) -> Batch:
        """Places every row of a batch (flat int64 indices) and locks it. ``before_change`` is
        called after the unique step (which changes nothing) and before anything changes: the
        input's checks (``BatchChecks.wait``), so that the device has work while the host
        waits; without it the indices must be validated already. ``mode`` says whether a
        backward will use the batch (:class:`BatchMode`): ``EVAL``, an inference forward, lets
        the unique step skip the sparse transpose and the CUDA cache step skip its locks.

        The two halves are also callable apart (:meth:`unique` then :meth:`place`), which the
        prefetch pipeline (``pipeline.py``) does on a side stream.
        """
        self.join_side()
        pending = self.unique(indices, mode)
        if before_change is not None:
            before_change()
        return self.place(pending, mode)

    def unique(self, indices: torch.Tensor, mode: BatchMode = BatchMode.TRAIN) -> UniqueStep:
        """A batch's unique step: its unique ids ascending and what backward reuses (the
        transpose, made only for a ``TRAIN`` batch). Changes nothing and reads no id out of
        bounds, so it may run before the batch's checks pass."""
        padded = not self.inclusive_host and getattr(self.l1, "sync_free", False)
        transpose = mode.backward
        return UniqueStep(*batch_unique(self.backend, indices, self.num_rows, padded, transpose))

    def place(
        self, step: UniqueStep, mode: BatchMode = BatchMode.TRAIN, ahead: object | None = None
    ) -> Batch:
        """The rest of a lookup, once the batch's checks passed: L2 first, so that a batch too
        large for ``host_rows`` fails before anything changes; then L1: dirty victims go back
        to L2, missed rows come in from L2 in ascending id order. With the whole table in L2
        and a cache whose step runs on the device, the host never waits for the device here
        (the unique count stays there: ``Batch.count``). ``ahead``: the batch's
        :meth:`read_ahead`, whose rows L2 takes instead of reading them from L3 again."""
        ids, count = step.ids, step.count
        hold = mode.backward  # an EVAL batch is released before any other lookup: no locks
        try:  # an L2 over an SSD tier works on the host: it gets the ids there, once
            held = self.host.acquire(ids.cpu() if self.inclusive_host else ids, ahead)
        except BaseException:
            self.host.drop_read_ahead(ahead)  # its batch refused before taking it
            raise
        addresses = held
        if self.device.type == "cuda" and not held.is_cuda:  # page-locked: the host won't wait
            addresses = held.pin_memory().to(self.device, non_blocking=True)
        if count is None:
            found = self.backend.lookup(self.l1, ids, step.counts, hold=hold)
        else:
            found = self.backend.lookup(self.l1, ids, step.counts, count, hold)
        self.count_step(step, found)
        decided = L2Record.read(self, found) if self.inclusive_host else None
        self.backend.move_rows(self, found, addresses)
        batch = Batch(ids, step.inverse, found.slots, addresses, transpose=step.transpose,
                      count=count, l1_locked=getattr(found, "holds", True),
                      lookup_number=self.l1.step)  # fmt: skip
        if decided is not None:  # L2 keeps what L1 holds: the pins move with the rows
            batch.l2_held, batch.l2_conflicts = held, decided.apply(self.host, held)
        return batch

    @property
    def reads_ahead(self) -> bool:
        """Whether a prefetched batch's L3 rows are read ahead of its step (an SSD tier), so
        that the step itself waits at its forward, in the plain loop's order (``pipeline.py``)."""
        return self.inclusive_host

    def read_ahead(self, step: UniqueStep) -> object | None:
        """Starts reading a later batch's rows that L2 does not hold from L3, on L3's I/O
        threads (``tierstore/read_ahead.py``); what :meth:`place` of that batch takes."""
        return self.host.read_ahead(step.ids)

    def drop_read_ahead(self, ahead: object | None) -> None:
        """Forgets a :meth:`read_ahead` whose batch will not be placed."""
        self.host.drop_read_ahead(ahead)

    def count_step(self, step: UniqueStep, found) -> None:
        """Called with each cache step's decisions (a ``Lookup``, or the CUDA backend's
        ``DeviceLookup``) for counters beyond L1's own: none here; a collection's group
        attributes hits and misses to its tables."""

    @property
    def step(self) -> int:
        """L1's count of lookups (its host-side step number; ``graphs.py`` sets it back after a
        capture and forward by each replay's lookups)."""
        return self.l1.step

    @step.setter
    def step(self, value: int) -> None:
        self.l1.step = value

    def graph_unsupported(self, optimizer: Optimizer | None) -> str | None:
        """Why this table's step cannot be captured in a CUDA graph (the backend's), or None."""
        return self.backend.graph_unsupported(self, optimizer)

    def load_hyper(self, optimizer: Optimizer | None) -> None:
        """Brings the kernels' copy of ``optimizer``'s lr and eps up to date (graphs.py)."""
        self.backend.load_hyper(self, optimizer)

    # ------------------------------------------------------------------ the side stream
    def side_stream(self) -> torch.cuda.Stream | None:
        """The stream prefetched lookups run on (CUDA, whole table in L2), else None: with an
        SSD tier the lookup reads the device on the host, so it runs in order."""
        if self.device.type != "cuda" or self.inclusive_host or self.l2_address is None:
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def mark_side_work(self) -> torch.cuda.Event:
        """Records that lookups were queued on the side stream up to now; returns the event."""
        event = torch.cuda.Event()
        event.record(self._side)
        self._side_tail = event
        return event

    def join_side(self) -> None:
        """Orders the current stream after every lookup queued on the side stream so far (no
        host wait): called before anything else reads or changes the cache's state."""
        if self._side_tail is None:
            return
        current = torch.cuda.current_stream(self.device)
        if current != self._side:  # the side stream's own work is in order already
            current.wait_event(self._side_tail)
            self._side_tail = None

    @property
    def side_pending(self) -> bool:
        """Whether lookups queued on the side stream may still run beside the current stream."""
        return self._side_tail is not None

    # ------------------------------------------------- a placed batch's rows, by the kernels
    def forward(
        self, batch: Batch, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:  # fmt: skip
        """Pooled bags ``(B, D)`` of a placed batch, ``mode`` sum or mean (``offsets``: ``B + 1``
        entries, the last ``n``; ``per_sample_weights``: ``(n,)`` or None)."""
        return self.backend.forward(self, batch, offsets, per_sample_weights, mode)

    def backward(
        self, batch: Batch, grad_out: torch.Tensor, offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None, mode: str, optimizer: Optimizer | None,
        want_weight_grad: bool,
    ) -> torch.Tensor | None:  # fmt: skip
        """A placed batch's backward from ``grad_out`` ``(B, D)``: each unique row's gradient,
        summed in index order, applied by the fused ``optimizer`` where the row lives (None:
        no update); returns the per-sample weights' gradient ``(n,)`` if ``want_weight_grad``."""
        return self.backend.backward(self, batch, grad_out, offsets, per_sample_weights, mode,
                                     optimizer, want_weight_grad)  # fmt: skip

    def gather(self, batch: Batch, cols: int | None = None) -> torch.Tensor:
        """A placed batch's rows ``(U, cols)`` (weights then state; all columns by default)
        from where they live: L1 slots, else L2 addresses."""
        return self.backend.gather(self, batch, cols)

    def scatter(self, batch: Batch, rows: torch.Tensor) -> None:
        """Stores a placed batch's updated rows ``(U, width)`` where they live (cached ones
        become dirty)."""
        self.backend.scatter(self, batch, rows)

    def release(self, batch: Batch) -> None:
        """Unlocks a batch's rows in L1 and L2 (once)."""
        if batch.released:
            return
        batch.released = True
        self.join_side()  # a later batch's lookup may still be choosing victims beside us
        if batch.l1_locked:  # else no L1 locks are left to release
            batch.l1_locked = False
            if batch.count is None:
                self.l1.release(batch.slots)
            else:
                self.l1.release(batch.slots, batch.count)
        self.host.release(batch.addresses if batch.l2_held is None else batch.l2_held)

    def conflicts_updated(self, batch: Batch) -> None:
        """Kernels updated the batch's conflict misses in L2 in place: an L2 that tracks dirty
        rows (over an SSD tier) marks them, from the host's copy of their addresses."""
        if batch.l2_conflicts is not None:
            self.host.mark_dirty(batch.l2_conflicts)

    def flush(self) -> None:
        """Writes every dirty row down to the lowest tier (one transaction with an SSD tier)."""
        self.join_side()
        slots, _ = self.l1.clean()
        if slots.numel():
            self.host.write(self.l1.home[slots], self.l1.rows(slots))
            self.flushed_rows += slots.numel()
        self.host.flush()

    def moved_to(
        self, device: torch.device, backend, cache_rows: int, ways: int, policy: str | Policy
    ) -> TieredStore:
        """This table's store with L1 and the kernels on ``device``: L1's dirty rows are
        written back to L2, then L1 is made anew (empty) on ``device`` over the same L2
        (page-locked for a CUDA device: that copies L2 once) and L3. Rows, optimizer state and
        counters are kept; the cache's contents are not (which, by the cache's transparency,
        changes no value). Refused while L1 holds a batch's locks, with nothing changed; this
        store is not to be used afterwards."""
        self.join_side()
        if bool((self.l1.locks != 0).any()):
            raise InvalidInputError(
                f"the table cannot move to {device} while a batch is in flight (prefetched, or "
                "a training forward whose backward has not run): move it between steps"
            )
        host = self.host
        slots, _ = self.l1.clean()  # L1's dirty rows down to L2 (a step's write-back)
        if slots.numel():
            host.write(self.l1.home[slots], self.l1.rows(slots))
            self.flushed_rows += slots.numel()
        data = host.data
        if device.type == "cuda" and not data.is_pinned():
            try:  # kernels read L2 in place over PCIe: only from page-locked memory
                host.page_lock()
            except RuntimeError as e:
                raise CapacityError(
                    f"moving the table to {device} page-locks its host tier (L2: "
                    f"{data.numel() * 4 / 2**30:.1f} GiB), which failed: {e}"
                ) from e
        if self.inclusive_host:  # the old L1's rows leave L2's pins
            cached = by_slot(self.l1.tags) != EMPTY
            host.unpin(self.l1.home[cached.to(self.l1.home.device)])
        new = TieredStore(self.num_rows, self.layout, cache_rows, ways, policy, device,
                          self.seed, self.init_scale, backend, host=host)  # fmt: skip
        new.l1.counters.copy_(self.l1.counters)
        new.flushed_rows = self.flushed_rows
        return new

    # ------------------------------------------------------------------ stats
    def stats(self) -> st.CacheStats:
        """A snapshot of the counters (one device read)."""
        self.join_side()
        c = self.l1.counters.tolist()
        rb = self.layout.row_bytes
        fills = c[st.MISSES] - c[st.CONFLICTS]
        out = st.CacheStats(
            requested=c[st.REQUESTS],
            unique=c[st.UNIQUE],
            hits=c[st.HITS],
            misses=c[st.MISSES],
            conflict_misses=c[st.CONFLICTS],
            evictions=c[st.EVICTIONS],
            writebacks=c[st.WRITEBACKS],
            bytes_l2_to_l1=fills * rb,
            bytes_l1_to_l2=(c[st.WRITEBACKS] + self.flushed_rows) * rb,
            bytes_l2_read_direct=c[st.CONFLICTS] * rb,
        )
        for k, v in self.host.stats().items():
            setattr(out, k, v)
        return out

    def held_locks(self) -> int:
        """Locks that batches hold now, 0 when none is in flight: L1's, plus those of an L2
        over an SSD tier beyond its one pin of each row L1 holds. Reads the device."""
        self.join_side()
        held = int(self.l1.locks.abs().sum())
        l2 = getattr(self.host, "cache", None)  # HostCache's (HostTable locks nothing)
        if l2 is not None:
            pins = int((by_slot(self.l1.tags) != EMPTY).sum())
            held += abs(int(l2.locks.sum()) - pins)
        return held

    def reset_stats(self) -> None:
        """Zeroes every counter."""
        self.join_side()
        self.l1.reset_counters()
        self.flushed_rows = 0
        self.host.reset_stats()

    def check_ids(self, ids: torch.Tensor, what: str = "indices") -> None:
        """Raises :class:`InvalidInputError` if any id is outside the table."""
        if ids.numel():
            lo, hi = torch.stack(list(torch.aminmax(ids))).tolist()
            check_id_range(lo, hi, self.num_rows, what)
