"""The interface of a host tier: what the store (``store.py``), the backends and the checkpoint
call on the tier below L1.

Two classes implement it: :class:`~tierstore.host.HostTable` (the whole table in host memory)
and :class:`~tierstore.host_cache.HostCache` (L2 as a cache over the SSD tier). The store holds
one as ``TieredStore.host`` and reaches it through these names only. (A collection's table, as
the checkpoint sees it, has a view of its group's L2 with only the names the checkpoint reads.)

Shapes: ``U`` unique rows of a batch, ``k`` rows, rows of ``width`` floats.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class HostTier(Protocol):
    """A tier of rows in host memory that gives each row of a batch in flight an *address*, a
    row index into :attr:`data` valid until the batch is released (kernels update rows there)."""

    #: (rows, width) float32 host rows; page-locked when the kernels address them in place
    data: torch.Tensor
    #: (rows,) uint8: 1 where the row at that address was ever written, or None (kept by none)
    written: torch.Tensor | None

    def acquire(self, ids: torch.Tensor, ahead: object | None = None) -> torch.Tensor:
        """(U,) int64 addresses of a batch's unique ``ids`` (ascending), locked until
        :meth:`release`; raises with nothing changed if the tier cannot hold them. ``ahead``:
        the batch's :meth:`read_ahead`."""

    def read_ahead(self, ids: torch.Tensor) -> object | None:
        """Starts reading what a later batch's ``acquire`` of unique ``ids`` will need from
        the tier below (on its I/O threads); what :meth:`acquire` takes as ``ahead``, or None
        (nothing to read; a tier with nothing below always)."""

    def drop_read_ahead(self, ahead: object | None) -> None:
        """Forgets a :meth:`read_ahead` whose batch will not be acquired."""

    def release(self, addresses: torch.Tensor) -> None:
        """Unlocks a batch's ``addresses``."""

    def read(self, addresses: torch.Tensor) -> torch.Tensor:
        """(k, width) rows at ``addresses``."""

    def write(self, addresses: torch.Tensor, rows: torch.Tensor) -> None:
        """Stores (k, width) ``rows`` at ``addresses`` (dirty for the tier below, if any)."""

    def pin(self, addresses: torch.Tensor) -> None:
        """Rows that entered L1: an inclusive tier keeps them until :meth:`unpin`."""

    def unpin(self, addresses: torch.Tensor) -> None:
        """Rows that left L1."""

    def mark_dirty(self, addresses: torch.Tensor) -> None:
        """Rows that kernels wrote in place (dirty for the tier below, if any)."""

    def peek(self, ids: torch.Tensor) -> torch.Tensor:
        """(k, width) current rows of ``ids``, changing no cache state."""

    def poke(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites the rows of ``ids``, changing no cache state."""

    def page_lock(self) -> None:
        """Page-locks :attr:`data` (and :attr:`written`), in place or a copy, so that a device reads
        them over PCIe; raises ``RuntimeError`` with nothing changed if the host cannot."""

    def flush(self) -> None:
        """Writes every dirty row to the tier below (durably), if any."""

    def check_writable(self, doing: str) -> None:
        """Raises ``ReadOnlyTableError`` naming ``doing`` if the tier was opened read-only."""

    def stats(self) -> dict[str, int]:
        """The tier's own counters, as fields of :class:`~tierstore.stats.CacheStats`."""

    def reset_stats(self) -> None:
        """Zeroes the tier's own counters."""

    def close(self) -> None:
        """Closes the tier below, if any."""
