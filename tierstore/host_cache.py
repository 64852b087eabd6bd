"""L2 over L3: a set-associative cache of rows in host memory in front of the SSD tier.

It follows the L1 rules (``cache.py``) with two additions. Every row of a batch in flight is
locked here too, so that an L1 conflict miss can always be served from L2; and L2 is
*inclusive* of L1: a row cached in L1 is pinned in L2 (one more lock), so that a dirty L1
victim always finds its L2 address. Each batch step does its fallible I/O (reading misses
from L3, staging dirty victims to L3) between planning and committing, so a failure leaves
both tiers exactly as they were.
"""

from __future__ import annotations

import pathlib

import torch

from . import stats as st
from .cache import SetAssociativeCache
from .errors import InvalidInputError, TableMismatchError
from .host import allocate_rows
from .optim import Optimizer
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
    """

    def __init__(self, ssd: SSDTier, host_rows: int, ways: int, policy, pin: bool):
        self.ssd = ssd
        self.cache = SetAssociativeCache(host_rows, ways, policy, "cpu")
        self.data = allocate_rows(self.cache.capacity, ssd.row_width, pin, "the host tier (L2)")
        self.row_bytes = 4 * ssd.row_width
        self.flushed_rows = 0
        # Ids flushed since the last incremental checkpoint's base (checkpoint.py), ascending;
        # None: not recorded (no base marked)
        self.flushed_since_mark: torch.Tensor | None = None

    # -------------------------------------------------------------- the batch step
    def acquire(self, ids: torch.Tensor) -> torch.Tensor:
        """L2 addresses of a batch's unique rows (ascending), locked until :meth:`release`.

        Raises :class:`CapacityError` naming ``host_rows`` if the batch cannot fit, and any
        storage error of L3, before anything changes.
        """
        cpu_ids = ids.cpu()
        plan = self.cache.plan(cpu_ids, strict=True)
        fill_ids = plan.fill_ids
        # The misses are read on L3's I/O thread while this one stages the dirty victims.
        reading = self.ssd.read_async(fill_ids) if fill_ids.numel() else None
        dirty = plan.victim_dirty
        if bool(dirty.any()):
            victims, order = torch.sort(plan.victim_ids[dirty])
            self.ssd.write(victims, self.data[plan.fill_slots[dirty][order]])
        rows = reading.result() if reading is not None else None
        self.cache.commit(plan, torch.ones_like(cpu_ids))
        if rows is not None:
            self.data[plan.fill_slots] = rows
        return plan.slots.to(ids.device)

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
        slots = self.cache.find(ids)
        rows = torch.empty((ids.numel(), self.ssd.row_width))
        cached = slots >= 0
        rows[cached] = self.data[slots[cached]]
        if not bool(cached.all()):
            rest, inverse = torch.unique(ids[~cached], return_inverse=True)
            rows[~cached] = self.ssd.read(rest)[inverse]
        return rows

    def poke(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites rows of unique ``ids``: in L2 if cached (dirty), else staged in L3."""
        ids, rows = ids.cpu(), rows.cpu()
        slots = self.cache.find(ids)
        cached = slots >= 0
        self.write(slots[cached], rows[cached])
        if not bool(cached.all()):
            rest, order = torch.sort(ids[~cached])
            self.ssd.write(rest, rows[~cached][order])

    # -------------------------------------------------------------- durability
    def flush(self) -> None:
        """Writes every dirty L2 row, and the rows staged since the last flush, into L3 in one
        transaction, chunk by chunk; durable when this returns."""
        slots = self.cache.dirty.view(-1).nonzero().squeeze(1)
        ids = self.cache.tags.view(-1)[slots]
        ids, order = torch.sort(ids)
        slots = slots[order]
        if self.flushed_since_mark is not None:  # the flush makes these rows clean: note them
            staged = self.ssd.stored_ids(flushed=False)
            self.flushed_since_mark = torch.unique(
                torch.cat([self.flushed_since_mark, ids, staged])
            )
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
        }

    def reset_stats(self) -> None:
        """Zeroes the L2 counters."""
        self.cache.reset_counters()
        self.flushed_rows = 0


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
    **ssd_options,
) -> HostCache:
    """Opens the table at ``path`` (creating it if the directory holds none) and puts an L2
    cache of ``host_rows`` rows and ``host_ways`` ways over it.

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
        ssd = SSDTier.open(path, init_rows, expect=expect, **ssd_options)
        stored = (ssd.meta.get("optimizer") or {}).get("name")
        wanted = (meta["optimizer"] or {}).get("name")
        if stored != wanted:
            ssd.close()
            raise TableMismatchError(
                f"{path}: the table was trained with optimizer {stored!r}, not {wanted!r}"
            )
    else:
        ssd = SSDTier.create(path, meta, init_rows, **ssd_options)
    return HostCache(ssd, host_rows, host_ways, policy, pin=device.type == "cuda")
