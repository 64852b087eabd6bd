"""Reading a later batch's L3 rows ahead of its step, on L3's I/O threads.

With an SSD tier a batch's step waits for the rows it misses in L2 to come from L3. The
prefetch pipeline (``pipeline.py``) knows the batches ahead: as soon as a later batch's unique
ids are known, :meth:`~tierstore.host_cache.HostCache.read_ahead` starts reading the rows that
L2 does not hold then, and the batch's own step (:meth:`~tierstore.host_cache.HostCache.acquire`,
at its forward, in the order of the plain loop) takes from those reads the rows it still needs
from L3. Meanwhile the host queues and the device computes the batches before it.

A row read ahead may change in L3 before its batch's step: an earlier batch brings it into L2,
updates it and writes it back (an evicted dirty row, an overflow row retired, a flush, a
``write_rows``). :class:`WriteLog` records the ids of every L3 write made while a read ahead is
open; a row written after its read ahead started is read again at the step. So the step sees
exactly what it would have read itself: the read ahead only moves the reads earlier.

Shapes: ``k`` ids read ahead, ``m`` ids a step reads from L3; rows of ``width`` floats.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class ReadAhead:
    """L3 rows of a later batch, being read on L3's I/O threads.

    Attributes:
        ids: (k,) int64 ascending: the batch's rows that L2 did not hold when it was asked.
        reading: the future of their (k, width) float32 rows.
        since: the :class:`WriteLog`'s sequence number when the read started.
    """

    ids: torch.Tensor
    reading: concurrent.futures.Future
    since: int


class WriteLog:
    """Ids written to L3 while any :class:`ReadAhead` is open, by sequence number; kept only as
    far back as the oldest open read ahead (nothing is kept while none is open)."""

    def __init__(self) -> None:
        self.seq = 0
        self.open: list[ReadAhead] = []
        self.entries: list[tuple[int, torch.Tensor]] = []  # (seq, ids written then)

    def start(self, ids: torch.Tensor, reading: concurrent.futures.Future) -> ReadAhead:
        """Records a read ahead started now."""
        ahead = ReadAhead(ids, reading, self.seq)
        self.open.append(ahead)
        return ahead

    def wrote(self, ids: torch.Tensor) -> None:
        """Records an L3 write of ``ids`` (any order); called before or after the write, never
        before a read ahead that the write must invalidate was started."""
        if self.open and ids.numel():
            self.seq += 1
            self.entries.append((self.seq, ids.detach().cpu().clone()))

    def close(self, ahead: ReadAhead) -> None:
        """Forgets ``ahead`` (taken or dropped) and the log entries no open one needs."""
        self.open = [a for a in self.open if a is not ahead]
        oldest = min((a.since for a in self.open), default=self.seq)
        self.entries = [(s, ids) for s, ids in self.entries if s > oldest]

    def usable(self, ahead: ReadAhead, want: torch.Tensor) -> torch.Tensor:
        """(m,) bool: which of ``want`` ((m,) int64 ascending) ``ahead`` reads and L3 has not
        changed since it started. Closes ``ahead``; does not wait for its read."""
        written = [ids for s, ids in self.entries if s > ahead.since]
        self.close(ahead)
        if ahead.ids.numel() == 0 or want.numel() == 0:
            return torch.zeros(want.numel(), dtype=torch.bool)
        fresh = torch.ones(ahead.ids.numel(), dtype=torch.bool)
        if written:
            fresh = ~torch.isin(ahead.ids, torch.cat(written))
        pos = torch.searchsorted(ahead.ids, want).clamp_(max=ahead.ids.numel() - 1)
        return (ahead.ids[pos] == want) & fresh[pos]


def rows_read_ahead(ahead: ReadAhead, ids: torch.Tensor, read) -> torch.Tensor:
    """(len(ids), width) rows of ``ids`` (ascending, all among ``ahead.ids``) from ``ahead``'s
    read, once it is done; if that read failed, ``read(ids)`` reads them now (and raises there
    if L3 is damaged)."""
    try:
        rows = ahead.reading.result()
    except Exception:  # noqa: BLE001 (the read below reports what is wrong, if still wrong)
        return read(ids)
    return rows[torch.searchsorted(ahead.ids, ids)]
