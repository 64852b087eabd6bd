"""A collection's tables one by one, as :mod:`~tierstore.checkpoint` sees a ``TieredEmbeddingBag``.

A table of a group is a slice of its group's rows (``base + id`` for ``id`` in ``[0, limit)``,
see :mod:`~tierstore.table_groups`). :class:`TableView` shows it with its own row ids, seed and
init scale: its store (:class:`TableRows`), its part of L2 and the SSD tier
(:class:`TableHost`) and of L1 (:class:`TableL1`). So a checkpoint holds, per table, the keys
a ``TieredEmbeddingBag`` of that table would hold, and loads into any grouping or cache sizes.

Shapes: ``n`` ids, ``R`` rows of the table, ``S`` L1 slots of its group.
"""

from __future__ import annotations

import torch

from .cache import EMPTY, by_slot
from .store import initial_rows
from .table_groups import TableGroup


class TableRows:
    """One table of a group seen as a store of its own (what :mod:`~tierstore.checkpoint` reads
    and writes): the table's own row ids ``[0, limit)``, shifted by ``base`` into the group's,
    and its own seed and init scale. Listings of stored, dirty and cached rows keep only the
    table's and give them table-local ids.

    ``listings``, shared by the views of one group while nothing writes (a save), keeps the
    group's SSD listing: it is read once per group, not once per table."""

    def __init__(self, group: TableGroup, k: int, listings: dict | None = None):
        cfg = group.tables[k]
        self.listings = listings
        self.group, self.base, self.limit = group, group.bases[k], group.limits[k]
        self.seed, self.init_scale = cfg.seed, cfg.init_scale
        store = group.store
        self.layout, self.device = store.layout, store.device
        self.inclusive_host = store.inclusive_host
        self.host = TableHost(self)
        self.l1 = TableL1(self)

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """The table-local ids among group row ``ids`` (order kept)."""
        inside = (ids >= self.base) & (ids < self.base + self.limit)
        return ids[inside] - self.base

    def flush(self) -> None:
        self.group.store.flush()

    def init_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return initial_rows(ids, self.layout, self.seed, self.init_scale, self.device)

    def read_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.group.store.read_rows(ids.to(torch.int64) + self.base)

    def write_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.group.store.write_rows(ids.to(torch.int64) + self.base, rows)


class TableHost:
    """The table's part of its group's L2 and SSD tier (see :class:`TableRows`)."""

    def __init__(self, rows: TableRows):
        self._rows = rows
        self.ssd = self

    @property
    def data(self) -> torch.Tensor:
        """The table's rows of a group held whole in L2 (a view: the table's rows are a slice)."""
        r = self._rows
        return r.group.store.host.data[r.base : r.base + r.limit]

    def stored_ids(self, flushed: bool = True, staged: bool = True) -> torch.Tensor:
        r = self._rows
        memo = r.listings
        if memo is None:
            return r.local(r.group.store.host.ssd.stored_ids(flushed, staged))
        if (flushed, staged) not in memo:
            memo[flushed, staged] = r.group.store.host.ssd.stored_ids(flushed, staged)
        return r.local(memo[flushed, staged])

    def dirty_ids(self) -> torch.Tensor:
        return self._rows.local(self._rows.group.store.host.dirty_ids())

    @property
    def flushed_since_mark(self) -> torch.Tensor | None:
        """The table's ids among those its group flushed since the incremental base (or None)."""
        log = self._rows.group.store.host.flushed_since_mark
        return None if log is None else self._rows.local(log)

    @flushed_since_mark.setter
    def flushed_since_mark(self, log: torch.Tensor) -> None:
        # restarting the log restarts the group's (every table of it is read by then)
        self._rows.group.store.host.flushed_since_mark = log


class TableL1:
    """The group's L1 with only the table's rows tagged, by table-local id (slots unchanged)."""

    def __init__(self, rows: TableRows):
        self._rows = rows

    def _mine(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._rows
        tags = by_slot(r.group.store.l1.tags)
        return tags, (tags >= r.base) & (tags < r.base + r.limit)

    @property
    def tags(self) -> torch.Tensor:
        tags, mine = self._mine()
        return torch.where(mine, tags - self._rows.base, torch.full_like(tags, EMPTY))

    @property
    def dirty(self) -> torch.Tensor:
        _, mine = self._mine()
        return by_slot(self._rows.group.store.l1.dirty) & mine

    def set_rows(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self._rows.group.store.l1.set_rows(slots, rows)


class TableView:
    """A collection's table as :mod:`~tierstore.checkpoint` sees a ``TieredEmbeddingBag``."""

    def __init__(self, group: TableGroup, k: int, listings: dict | None = None):
        cfg = group.tables[k]
        self.store = TableRows(group, k, listings)
        self.embedding_dim, self.num_embeddings = cfg.embedding_dim, cfg.num_embeddings
        self.optimizer = group.optimizer
