"""Counters of a collection: per group (one store each), per table, and overall.

A group's caches are shared by its tables, so what L1 does for a group is counted once for the
group (:class:`~tierstore.stats.CacheStats` of its store) and, for the counts that belong to
one id's table, once more per table of origin (:meth:`~tierstore.table_groups.GroupStore.count_step`):
requests, unique rows, hits, misses and conflict misses, and the bytes those moved. Evictions,
write-backs and the L2/L3 counters belong to the group (a table's row may evict another
table's) and are zero in a table's counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from .stats import CacheStats
from .table_groups import TABLE_COUNTERS, TableGroup


@dataclass
class CollectionStats:
    """Counters of a collection since creation (or the last ``reset_stats()``).

    Attributes:
        overall: every group's counters summed.
        groups: each group's counters (see :attr:`TieredEmbeddingBagCollection.groups`).
        tables: each table's share of its group's counters: ``requested``, ``unique``,
            ``hits``, ``misses``, ``conflict_misses``, ``bytes_l2_to_l1`` and
            ``bytes_l2_read_direct``, counted from the ids' table of origin (the tables of a
            group sum to the group's); the other fields are the group's alone and zero here.
        group_of: table name to its group's name.
    """

    overall: CacheStats
    groups: dict[str, CacheStats]
    tables: dict[str, CacheStats]
    group_of: dict[str, str]

    @property
    def requested(self) -> dict[str, int]:
        """Table name to the ids looked up in it."""
        return {name: s.requested for name, s in self.tables.items()}

    def table(self, name: str) -> CacheStats:
        """Table ``name``'s own counters (see :attr:`tables`)."""
        return self.tables[name]

    @property
    def hit_ratio(self) -> float:
        """1 - L1 misses per id looked up, all groups together (``CacheStats.hit_ratio``)."""
        return self.overall.hit_ratio

    @property
    def unique_hit_ratio(self) -> float:
        """L1 hits per unique row looked up, all groups together."""
        return self.overall.unique_hit_ratio


def sum_stats(parts: Sequence[CacheStats]) -> CacheStats:
    """The field-wise sum of ``parts``."""
    out = CacheStats()
    for f in fields(CacheStats):
        setattr(out, f.name, sum(getattr(p, f.name) for p in parts))
    return out


def collection_stats(groups: Sequence[TableGroup], table_order: Sequence[str]) -> CollectionStats:
    """A snapshot of every group's and table's counters (two device reads per group);
    ``tables`` in ``table_order``."""
    by_group, by_table = {}, {}
    for g in groups:
        by_group[g.name] = g.store.stats()
        rb = g.store.layout.row_bytes
        for t, row in zip(g.tables, g.store.table_counters.tolist(), strict=True):
            c = dict(zip(TABLE_COUNTERS, row, strict=True))
            fills = c["misses"] - c["conflict_misses"]
            by_table[t.name] = CacheStats(
                **c, bytes_l2_to_l1=fills * rb, bytes_l2_read_direct=c["conflict_misses"] * rb
            )
    return CollectionStats(
        overall=sum_stats(list(by_group.values())),
        groups=by_group,
        tables={name: by_table[name] for name in table_order},
        group_of={t.name: g.name for g in groups for t in g.tables},
    )
