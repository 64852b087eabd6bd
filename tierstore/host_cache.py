"""L2 over L3: a set-associative cache of rows in host memory in front of the SSD tier.

It follows the L1 rules (``cache.py``) with two additions. Every row of a batch in flight is
locked here too, so that an L1 conflict miss can always be served from L2; and L2 is
*inclusive* of L1: a row cached in L1 is pinned in L2 (one more lock), so that a dirty L1
victim always finds its L2 address. Each batch step does its fallible I/O (reading misses
from L3, staging dirty victims to L3) between planning and committing, so a failure leaves
both tiers exactly as they were.

The overflow rule. A set can be asked for more rows than it has unlocked ways (the hash puts
many of a batch's rows, or of L1's, in one set) while L2 as a whole has room. Such a row (an
L2 *conflict miss*) borrows an evictable way of any other set: that way's row is evicted as
usual, its tag is left empty so that no lookup finds it there, and the row lives in it, listed
in a small side index (``overflow``), for as long as it is locked (by batches in flight, or by
L1 holding it). Once unlocked, the next step writes it to L3 if dirty and frees the way. So a
batch fails with :class:`CapacityError` only when L2 as a whole cannot hold every locked row:

    L2 capacity (host_rows, rounded up to whole sets) >= L1's capacity + the unique rows of
    every batch in flight (the current one and those prefetched ahead)

and this bound is exact: the hash never makes a batch that meets it fail.
"""

from __future__ import annotations

import math
import pathlib

import torch

from . import stats as st
from .cache import EMPTY, by_slot
from .cache_compiled import CompiledCache
from .errors import (
    CapacityError,
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    ReadOnlyTableError,
    TableMismatchError,
    TierstoreError,
)
from .host import allocate_rows, pinned
from .optim import Optimizer
from .read_ahead import ReadAhead, WriteLog, rows_read_ahead
from .ssd import SSDTier

_FLUSH_CHUNK = 1 << 16  # rows per flush write: bounds the memory a flush needs


class HostCache:
    """L2 as a cache of ``host_rows`` rows over an :class:`~tierstore.ssd.SSDTier`.

    Args:
        ssd: the L3 tier.
        host_rows: L2 capacity in rows (rounded up to whole sets).
        ways: associativity.
        policy: replacement policy name.
        pin: page-lock ``data`` so that GPU kernels can address it.
        l1_rows: L1's capacity (the rows L1 may pin here), for the capacity rule's message.
    """

    def __init__(
        self, ssd: SSDTier, host_rows: int, ways: int, policy, pin: bool, l1_rows: int = 0
    ):
        self.ssd = ssd
        # its plan and release compiled where numba is installed (commit is the torch step)
        self.cache = CompiledCache(host_rows, ways, policy, "cpu")
        self.data, self._data_own = allocate_rows(
            self.cache.capacity, ssd.row_width, pin, "the host tier (L2)"
        )
        self.row_bytes = 4 * ssd.row_width
        self.flushed_rows = 0
        # Ids flushed since the last incremental checkpoint's base (checkpoint.py), ascending;
        # None: not recorded (no base marked)
        self.flushed_since_mark: torch.Tensor | None = None
        self.l1_rows = l1_rows
        self.read_only = ssd.readonly
        self.written = None  # no map of written rows (HostTier.written): fills read every row
        # The overflow: rows living in borrowed ways (tag EMPTY, locked), ids ascending.
        self.overflow_ids = torch.empty(0, dtype=torch.int64)  # (V,)
        self.overflow_slots = torch.empty(0, dtype=torch.int64)  # (V,) their ways
        self.l3_writes = WriteLog()  # what read aheads must not take (read_ahead.py)
        self.rows_read_ahead = 0  # rows that steps took from read aheads

    # -------------------------------------------------------------- the batch step
    def read_ahead(self, ids: torch.Tensor) -> ReadAhead | None:
        """Starts reading, on L3's I/O threads, the rows of a later batch's unique ``ids``
        (ascending) that L2 does not hold now; :meth:`acquire` of that batch takes them
        (``tierstore/read_ahead.py``). None if L2 holds every row."""
        cpu_ids = ids.cpu()
        missing = cpu_ids[self._find(cpu_ids) < 0]
        if missing.numel() == 0:
            return None
        return self.l3_writes.start(missing, self.ssd.read_async(missing))

    def drop_read_ahead(self, ahead: ReadAhead | None) -> None:
        """Forgets a read ahead whose batch will not be stepped (its read finishes unused)."""
        if ahead is not None:
            self.l3_writes.close(ahead)

    def acquire(self, ids: torch.Tensor, ahead: ReadAhead | None = None) -> torch.Tensor:
        """L2 addresses of a batch's unique rows (ascending), locked until :meth:`release`.
        Rows it reads from L3 come from ``ahead`` (the batch's :meth:`read_ahead`) where that
        read them and L3 has not changed them since.

        Raises :class:`CapacityError` naming ``host_rows`` if L2 cannot hold every locked row
        (the rule in this module's docstring), and any storage error of L3, before anything
        changes (rows that left the overflow may have been staged to L3: same values).
        """
        cpu_ids = ids.cpu()
        self._retire_overflow()
        in_overflow, overflow_slots = self._find_overflow(cpu_ids)
        rest = cpu_ids[~in_overflow] if in_overflow.any() else cpu_ids
        plan = self.cache.plan(rest)
        conflict = plan.slots < 0
        dest = plan.slots.clone()  # where each row of rest will live
        victim_ids, victim_slots = plan.victim_ids, plan.fill_slots
        victim_dirty = plan.victim_dirty
        borrowed = None
        if bool(conflict.any()):
            borrowed = self._borrow(int(conflict.sum()), plan, cpu_ids.numel())
            dest[conflict] = borrowed
            tags, dirty = by_slot(self.cache.tags), by_slot(self.cache.dirty)
            taken = tags[borrowed]
            victim_ids = torch.cat([victim_ids, taken])
            victim_slots = torch.cat([victim_slots, borrowed])
            victim_dirty = torch.cat([victim_dirty, dirty[borrowed] & (taken != EMPTY)])
        read = conflict.clone()
        read[plan.fill_index] = True
        read_ids = rest[read]  # ascending
        have = None if ahead is None else self.l3_writes.usable(ahead, read_ids)
        unread = read_ids if have is None else read_ids[~have]
        # The misses are read on L3's I/O thread while this one stages the dirty victims.
        reading = self.ssd.read_async(unread) if unread.numel() else None
        if bool(victim_dirty.any()):
            victims, order = torch.sort(victim_ids[victim_dirty])
            self._write_l3(victims, self.data[victim_slots[victim_dirty][order]])
        rows = reading.result() if reading is not None else None
        if have is not None and bool(have.any()):  # the rows read ahead, and the others
            read_rows, rows = rows, torch.empty((read_ids.numel(), self.ssd.row_width))
            rows[have] = rows_read_ahead(ahead, read_ids[have], self.ssd.read)
            self.rows_read_ahead += int(have.sum())
            if read_rows is not None:
                rows[~have] = read_rows
        self.cache.commit(plan, torch.ones_like(rest))
        if borrowed is not None:
            fills = plan.fill_slots.numel()
            self._lend(borrowed, rest[conflict], victim_ids[fills:], victim_dirty[fills:])
        if rows is not None:
            self.data[dest[read]] = rows
        if not bool(in_overflow.any()):
            return dest.to(ids.device)
        by_slot(self.cache.locks).index_add_(
            0, overflow_slots, torch.ones_like(overflow_slots, dtype=torch.int32)
        )
        self.cache.counters[[st.REQUESTS, st.UNIQUE, st.HITS]] += overflow_slots.numel()
        out = torch.empty_like(cpu_ids)
        out[~in_overflow] = dest
        out[in_overflow] = overflow_slots
        return out.to(ids.device)

    # -------------------------------------------------------------- the overflow
    def _find_overflow(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``ids`` live in the overflow, and the slots of those that do."""
        if self.overflow_ids.numel() == 0:
            return torch.zeros(ids.numel(), dtype=torch.bool), self.overflow_slots
        pos = torch.searchsorted(self.overflow_ids, ids).clamp_(max=self.overflow_ids.numel() - 1)
        found = self.overflow_ids[pos] == ids
        return found, self.overflow_slots[pos[found]]

    def _borrow(self, need: int, plan, unique: int) -> torch.Tensor:
        """``need`` evictable ways of any set for a step's L2 conflict misses, best victims
        first (empty, then lowest score), or CapacityError before anything changes."""
        cache = self.cache
        key = by_slot(cache.stamps).clone()
        key[by_slot(cache.tags) == EMPTY] = torch.iinfo(torch.int64).min
        taken = by_slot(cache.locks) > 0
        taken[plan.slots[plan.slots >= 0]] = True  # this step's hits and fills
        free = int((~taken).sum())
        if free < need:
            locked = int((by_slot(cache.locks) > 0).sum())
            raise CapacityError(
                f"the batch's {unique} unique rows do not fit in L2 (host_rows: "
                f"{cache.capacity} rows, {cache.sets} sets x {cache.ways} ways): {locked} rows "
                f"are locked by L1 (up to {self.l1_rows} rows) and the batches in flight, and "
                f"{need} rows find no way. L2 must hold L1's rows plus the unique rows of every "
                "batch in flight: make host_rows at least L1's capacity plus the largest "
                "batch's unique rows (per batch prefetched ahead), or the batch smaller"
            )
        key[taken] = torch.iinfo(torch.int64).max
        return torch.topk(key, need, largest=False, sorted=True).indices

    def _lend(
        self, slots: torch.Tensor, ids: torch.Tensor, evicted: torch.Tensor, dirty: torch.Tensor
    ) -> None:
        """Puts rows ``ids`` (ascending) in borrowed ways ``slots``: tag empty (no set finds
        them), locked by this step, listed in the overflow index."""
        cache = self.cache
        by_slot(cache.tags)[slots] = EMPTY
        by_slot(cache.dirty)[slots] = False
        by_slot(cache.stamps)[slots] = 0
        by_slot(cache.locks)[slots] = 1
        gone = evicted != EMPTY
        cache.counters[st.EVICTIONS] += int(gone.sum())
        cache.counters[st.WRITEBACKS] += int(dirty.sum())
        ids = torch.cat([self.overflow_ids, ids])
        ids, order = torch.sort(ids)
        self.overflow_ids = ids
        self.overflow_slots = torch.cat([self.overflow_slots, slots])[order]

    def _retire_overflow(self) -> None:
        """Overflow rows that nothing locks any more go to L3 (if dirty); their ways are freed
        (empty and unlocked). Changes no row's value."""
        if self.overflow_ids.numel() == 0:
            return
        cache = self.cache
        idle = by_slot(cache.locks)[self.overflow_slots] == 0
        if not bool(idle.any()):
            return
        slots, ids = self.overflow_slots[idle], self.overflow_ids[idle]
        dirty = by_slot(cache.dirty)[slots]
        if bool(dirty.any()):
            self._write_l3(ids[dirty], self.data[slots[dirty]])  # ids stay ascending
        by_slot(cache.dirty)[slots] = False
        self.overflow_ids, self.overflow_slots = (
            self.overflow_ids[~idle],
            self.overflow_slots[~idle],
        )

    def _write_l3(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Stages rows of ``ids`` (ascending) in L3, noting them for the read aheads."""
        self.l3_writes.wrote(ids)
        self.ssd.write(ids, rows)

    def _find(self, ids: torch.Tensor) -> torch.Tensor:
        """L2 address of each of ``ids`` (in a set's way or in the overflow), -1 if not held."""
        slots = self.cache.find(ids)
        if self.overflow_ids.numel():
            in_overflow, overflow_slots = self._find_overflow(ids)
            slots[in_overflow] = overflow_slots
        return slots

    def _ids_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Row id held at each L2 address (overflow rows included)."""
        ids = by_slot(self.cache.tags)[slots]
        lent = ids == EMPTY
        if bool(lent.any()):
            order = torch.argsort(self.overflow_slots)
            pos = torch.searchsorted(self.overflow_slots[order], slots[lent])
            ids[lent] = self.overflow_ids[order[pos]]
        return ids

    def dirty_ids(self) -> torch.Tensor:
        """Ids of the dirty L2 rows (overflow rows included), in L2 address order."""
        return self._ids_of(self.cache.dirty.view(-1).nonzero().squeeze(1))

    def check_writable(self, doing: str) -> None:
        """Raises :class:`ReadOnlyTableError` if the table was opened read-only."""
        if self.read_only:
            raise ReadOnlyTableError(
                f"{self.ssd.path}: the table was opened read_only: {doing} is refused (run "
                "inference under torch.no_grad() or open it with optimizer=None)"
            )

    def release(self, addresses: torch.Tensor) -> None:
        """Unlocks a finished batch's rows."""
        self.cache.release(addresses.cpu())

    def pin(self, addresses: torch.Tensor) -> None:
        """Rows that entered L1 stay in L2 while they are there."""
        self.cache.locks.view(-1)[addresses.cpu()] += 1

    def unpin(self, addresses: torch.Tensor) -> None:
        """Rows that left L1."""
        self.cache.locks.view(-1)[addresses.cpu()] -= 1

    def read(self, addresses: torch.Tensor) -> torch.Tensor:
        """Rows at L2 ``addresses``."""
        return self.data[addresses.cpu()]

    def write(self, addresses: torch.Tensor, rows: torch.Tensor) -> None:
        """Stores rows at L2 ``addresses`` and marks them dirty."""
        addresses = addresses.cpu()
        self.data[addresses] = rows.cpu()
        self.mark_dirty(addresses)

    def mark_dirty(self, addresses: torch.Tensor) -> None:
        """Rows that kernels updated in place at L2 ``addresses`` (they must reach L3)."""
        self.cache.mark_dirty(addresses.cpu())

    # -------------------------------------------------------------- rows by id
    def peek(self, ids: torch.Tensor) -> torch.Tensor:
        """Current rows of ``ids`` (L2 if cached, else L3) without changing any cache state."""
        ids = ids.cpu()
        slots = self._find(ids)
        rows = torch.empty((ids.numel(), self.ssd.row_width))
        cached = slots >= 0
        rows[cached] = self.data[slots[cached]]
        if not bool(cached.all()):
            rest, inverse = torch.unique(ids[~cached], return_inverse=True)
            rows[~cached] = self.ssd.read(rest)[inverse]
        return rows

    def poke(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites rows of unique ``ids``: in L2 if cached (dirty), else staged in L3."""
        self.check_writable("write_rows")
        ids, rows = ids.cpu(), rows.cpu()
        slots = self._find(ids)
        cached = slots >= 0
        if not bool(cached.all()):  # first the write that can fail (a full map or disk)
            rest, order = torch.sort(ids[~cached])
            self._write_l3(rest, rows[~cached][order])
        self.write(slots[cached], rows[cached])

    def page_lock(self) -> None:
        """Page-locks ``data`` (in place where large: :func:`~tierstore.host.pinned`), once; L2
        keeps no map of written rows (``written``)."""
        if not self.data.is_pinned():
            self.data = pinned(self.data, self._data_own)

    # -------------------------------------------------------------- durability
    def flush(self) -> None:
        """Writes every dirty L2 row, and the rows staged since the last flush, into L3 in one
        transaction, chunk by chunk; durable when this returns."""
        self.check_writable("flush")
        slots = self.cache.dirty.view(-1).nonzero().squeeze(1)
        ids = self._ids_of(slots)
        ids, order = torch.sort(ids)
        slots = slots[order]
        if self.flushed_since_mark is not None:  # the flush makes these rows clean: note them
            staged = self.ssd.stored_ids(flushed=False)
            self.flushed_since_mark = torch.unique(
                torch.cat([self.flushed_since_mark, ids, staged])
            )
        self.l3_writes.wrote(ids)  # read aheads of these rows may predate their new values
        with self.ssd.flush_begin() as writer:
            for lo in range(0, slots.numel(), _FLUSH_CHUNK):
                part = slots[lo : lo + _FLUSH_CHUNK]
                writer.write(ids[lo : lo + _FLUSH_CHUNK], self.data[part])
        # only now, with the transaction durable, are the rows clean
        self.cache.dirty.view(-1)[slots] = False
        self.flushed_rows += slots.numel()

    def close(self) -> None:
        """Closes L3 (without flushing)."""
        self.ssd.close()

    # -------------------------------------------------------------- stats
    def stats(self) -> dict[str, int]:
        """L2 counters and the bytes moved between L2 and L3."""
        c = self.cache.counters.tolist()
        return {
            "l2_hits": c[st.HITS],
            "l2_misses": c[st.MISSES],
            "l2_evictions": c[st.EVICTIONS],
            "l2_writebacks": c[st.WRITEBACKS],
            "bytes_l3_to_l2": c[st.MISSES] * self.row_bytes,
            "bytes_l2_to_l3": (c[st.WRITEBACKS] + self.flushed_rows) * self.row_bytes,
            "bytes_l3_read_ahead": self.rows_read_ahead * self.row_bytes,
        }

    def reset_stats(self) -> None:
        """Zeroes the L2 counters."""
        self.cache.reset_counters()
        self.flushed_rows = self.rows_read_ahead = 0


def table_meta(
    num_embeddings: int | None, layout, seed: int, init_scale: float, optimizer: Optimizer | None
) -> dict:
    """What an SSD table records about itself, and what a reopening must agree with."""
    return {
        "num_embeddings": num_embeddings,
        "embedding_dim": layout.dim,
        "row_width": layout.width,
        "dtype": "float32",
        "seed": seed,
        "init_scale": init_scale,
        "optimizer": optimizer.to_dict() if optimizer is not None else None,
    }


def check_table_meta(path, meta: dict) -> None:
    """Validates by type and range what :func:`table_meta` stored (the SSD tier checks its own
    keys and every checksum): a value that passes its checksum but is out of range (an edit,
    or another program) raises :class:`CorruptBlockError` naming the key, never a KeyError,
    TypeError, ValueError or OverflowError later."""

    def bad(what: str) -> CorruptBlockError:
        return CorruptBlockError(f"{path}: stored metadata is invalid: {what}")

    def integer(key: str, lo: int, hi: int, optional: bool = False) -> None:
        value = meta.get(key)
        if optional and value is None:
            return
        if type(value) is not int or not lo <= value <= hi:
            raise bad(f"{key}={value!r}, expected an int in [{lo}, {hi}]")

    integer("num_embeddings", 1, (1 << 63) - 1, optional=True)
    integer("embedding_dim", 1, 1 << 20)
    integer("seed", -(1 << 63), (1 << 64) - 1)
    if meta.get("dtype") != "float32":
        raise bad(f"dtype={meta.get('dtype')!r}, expected 'float32'")
    scale = meta.get("init_scale")
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale < 0:
        raise bad(f"init_scale={scale!r}, expected a finite number >= 0")
    stored = meta.get("optimizer")
    if stored is not None and not isinstance(stored, dict):
        raise bad(f"optimizer={stored!r}, expected an object or null")
    from .optim import optimizer_from_dict

    try:
        optimizer = optimizer_from_dict(stored)
    except (TierstoreError, TypeError, ValueError, KeyError) as exc:
        raise bad(f"optimizer={stored!r} ({exc})") from None
    state = optimizer.state_width(meta["embedding_dim"]) if optimizer is not None else 0
    if meta.get("row_width") != meta["embedding_dim"] + state:
        raise bad(
            f"row_width={meta.get('row_width')!r}, but embedding_dim={meta['embedding_dim']} "
            f"and the optimizer's state need {meta['embedding_dim'] + state}"
        )


def read_table_meta(path) -> dict:
    """The stored metadata of the table at ``path``, checked (:func:`check_table_meta`)."""
    meta = SSDTier.read_meta(path)
    check_table_meta(path, meta)
    return meta


def open_host_cache(
    path,
    num_embeddings: int | None,
    layout,
    host_rows: int | None,
    cache_capacity: int,
    policy,
    device: torch.device,
    init_rows,
    meta: dict,
    host_ways: int = 32,
    read_only: bool = False,
    **ssd_options,
) -> HostCache:
    """Opens the table at ``path`` (creating it if the directory holds none) and puts an L2
    cache of ``host_rows`` rows and ``host_ways`` ways over it.

    ``read_only`` opens an existing table without its writer lock, beside a process that
    may be training it: reads see L3 as of the latest completed flush when they reach it,
    and the table refuses training, ``write_rows`` and ``flush`` (:class:`ReadOnlyTableError`).

    L2 must hold every row of a batch at once; many ways make that safe for any batch of up to
    about half of ``host_rows`` unique rows, whatever the hash does."""
    if host_rows is None:
        host_rows = max(4 * cache_capacity, 1 << 16)
    if host_rows < cache_capacity:
        raise InvalidInputError(
            f"host_rows ({host_rows}) must be at least the L1 capacity ({cache_capacity}): "
            "L2 holds every row that L1 holds"
        )
    path = pathlib.Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):  # a table, or an error
        keys = ("embedding_dim", "row_width", "dtype", "num_embeddings", "seed", "init_scale")
        expect = {k: meta[k] for k in keys}
        ssd = SSDTier.open(path, init_rows, expect=expect, readonly=read_only, **ssd_options)
        try:
            check_table_meta(path, ssd.meta)
        except BaseException:
            ssd.close()
            raise
        stored = (ssd.meta.get("optimizer") or {}).get("name")
        wanted = (meta["optimizer"] or {}).get("name")
        if stored != wanted:
            ssd.close()
            raise TableMismatchError(
                f"{path}: the table was trained with optimizer {stored!r}, not {wanted!r}"
            )
    elif read_only:
        raise NotATableError(f"{path}: no table to open read-only (the directory is empty)")
    else:
        ssd = SSDTier.create(path, meta, init_rows, **ssd_options)
    return HostCache(
        ssd, host_rows, host_ways, policy, pin=device.type == "cuda", l1_rows=cache_capacity
    )
