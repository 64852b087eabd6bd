"""How a collection's tables share stores: groups, their row ids, their share of the caches.

Shapes: ``T_g`` tables in a group, ``n`` ids, ``U`` unique rows of a step.

Tables that share a row layout (the same dim and the same optimizer with the same
hyper-parameters) form a *group*, backed by one :class:`GroupStore`: one L1, one L2 and, with a
path, one LMDB environment. A group's row ids are the concatenation of its tables' (table
``k``'s row ``r`` is group row ``bases[k] + r``, the bases being the cumulative table sizes, as
FBGEMM's table-batched embeddings lay them out); in a group with a ``num_embeddings=None``
table, the table's index within the group goes in the high bits instead (row
``(k << TAG_SHIFT) + r``, so such ids must lie in ``[0, 2**47)``). The engine itself is
unchanged: a group is one ordinary table to it, whose never-written rows take their value from
their own table's seed and table-local id, and whose cache steps are attributed to the tables
the ids came from (:meth:`GroupStore.count_step`).
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Sequence

import torch

from .cache import cache_shape
from .errors import InvalidInputError
from .hashing import seed_key
from .optim import Optimizer
from .store import RowLayout, RowSeeds, TieredStore, UniqueStep, initial_rows
from .table_config import TableConfig
from .validate import prefix_sums

TAG_SHIFT = 47  # ids of a table in a group with an unbounded table: [0, 2**47)
MAX_TAGGED_TABLES = 1 << (63 - TAG_SHIFT)  # tables per such group (the tag fits below bit 63)
# Per-table counters of a group, in the columns of GroupStore.table_counters
TABLE_COUNTERS = ("requested", "unique", "hits", "misses", "conflict_misses")


def split_rows(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` rows split in proportion to ``weights`` (largest remainders; each share at
    least 1): how a collection's ``cache_rows`` and ``host_rows`` are shared by its groups."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [max(1, math.floor(x)) for x in exact]
    while sum(shares) > total:  # the minimum of one row overshot: take from the most over
        i = max(
            (i for i in range(len(shares)) if shares[i] > 1), key=lambda i: shares[i] - exact[i]
        )
        shares[i] -= 1
    order = sorted(range(len(weights)), key=lambda i: shares[i] - exact[i])
    for i in order[: max(0, total - sum(shares))]:
        shares[i] += 1
    return shares


class TableGroup:
    """Tables that share one row layout and so one store.

    ``tables`` in collection order; ``bases[k]`` is added to table ``k``'s ids; ``limits[k]``
    bounds them (``num_embeddings``, or ``2**47`` in a tagged group). ``optimizer`` is the
    group's update (the owner :class:`~tierstore.autograd.TieredBagFunction` reads).
    """

    def __init__(self, name: str, tables: list[TableConfig], optimizer: Optimizer | None):
        self.name, self.tables, self.optimizer = name, tables, optimizer
        self.dim = tables[0].embedding_dim
        self.tagged = any(t.num_embeddings is None for t in tables)
        if self.tagged:
            if len(tables) > MAX_TAGGED_TABLES:
                raise InvalidInputError(
                    f"group {name!r}: at most {MAX_TAGGED_TABLES} tables may share a group with "
                    f"a num_embeddings=None table, got {len(tables)}"
                )
            self.bases = [k << TAG_SHIFT for k in range(len(tables))]
            self.limits = [t.num_embeddings or 1 << TAG_SHIFT for t in tables]
            self.num_rows = None
        else:
            self.limits = [t.num_embeddings for t in tables]
            self.bases = [0]
            for n in self.limits[:-1]:
                self.bases.append(self.bases[-1] + n)
            self.num_rows = sum(self.limits)
        self._bases_t = torch.tensor(self.bases, dtype=torch.int64)
        self.poolings = {t.pooling for t in tables}
        # The group's features in configured order, each with its table's base and pooling
        self.features = [f for t in tables for f in t.feature_names]
        self.feature_base = torch.tensor(
            [b for b, t in zip(self.bases, tables, strict=True) for _ in t.feature_names]
        )
        self.feature_mean = torch.tensor(
            [t.pooling == "mean" for t in tables for _ in t.feature_names]
        )
        self.store: GroupStore | None = None
        # the collection's lock, which the backward of the group's batches holds (autograd.py)
        self._lock = None

    @property
    def sample_major(self) -> bool:
        """Whether the group lays its bags out sample-major (bag ``(f, b)`` at ``b * F_g + f``,
        not ``f * B + b``), so that its pooled ``(B * F_g, D)`` is the ``(B, F_g * D)`` block of
        the collection's output with no transposing copy, forward or backward: where every table
        has one feature. A row's gradients then add up in the same order either way (rows of
        two tables never meet); a table with several features keeps its features' bags apart,
        as one lookup per feature would."""
        return all(len(t.feature_names) == 1 for t in self.tables)

    def to(self, device: torch.device) -> None:
        """Moves the per-feature and per-table tensors to ``device``."""
        self.feature_base = self.feature_base.to(device)
        self.feature_mean = self.feature_mean.to(device)
        self._bases_t = self._bases_t.to(device)

    def table_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Index within the group of the table that holds each group row id (``(n,)`` int64;
        no device read)."""
        if self.tagged:
            return ids >> TAG_SHIFT
        return torch.searchsorted(self._bases_t.to(ids.device), ids, right=True) - 1

    def initial_rows(
        self, ids: torch.Tensor, layout: RowLayout, device: torch.device
    ) -> torch.Tensor:
        """Initial rows ``(len(ids), width)`` of never-written group row ``ids``: each from its
        own table's seed and init scale, at its table-local id."""
        table = self.table_of(ids)
        rows = torch.empty((ids.numel(), layout.width), device=ids.device)
        # One piece per table present (not one pass over the ids per table of the group)
        order = torch.argsort(table, stable=True)
        present, counts = torch.unique_consecutive(table[order], return_counts=True)
        start = 0
        for k, c in zip(present.tolist(), counts.tolist(), strict=True):
            at = order[start : start + c]
            start += c
            cfg = self.tables[k]
            local = ids[at] - self.bases[k]
            rows[at] = initial_rows(local, layout, cfg.seed, cfg.init_scale, device)
        return rows

    def size_weight(self, unbounded: int) -> int:
        """The group's rows, an unbounded table counting as ``unbounded``."""
        return sum(t.num_embeddings or unbounded for t in self.tables)


class GroupStore(TieredStore):
    """A group's store: one table to the engine, whose never-written rows take their value from
    their own table's (seed, init_scale) and table-local id (:meth:`TableGroup.initial_rows`),
    and which counts each step per table of origin (:attr:`table_counters`)."""

    def __init__(self, group: TableGroup, *args, **kwargs):
        self._group = group
        super().__init__(*args, **kwargs)
        # (T_g, len(TABLE_COUNTERS)) int64 on the device, summed over the steps
        self.table_counters = torch.zeros(
            (len(group.tables), len(TABLE_COUNTERS)), dtype=torch.int64, device=self.device
        )

    def init_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._group.initial_rows(ids, self.layout, self.device)

    def seeds(self) -> RowSeeds:
        """Each table's base, seed key and init scale (:meth:`TableGroup.initial_rows`)."""
        tables, dev = self._group.tables, self.device
        return RowSeeds(torch.tensor(self._group.bases, dtype=torch.int64, device=dev),
                        torch.tensor([seed_key(t.seed) for t in tables], dtype=torch.int64,
                                     device=dev),
                        torch.tensor([t.init_scale for t in tables], dtype=torch.float32,
                                     device=dev))  # fmt: skip

    def count_step(self, step: UniqueStep, found) -> None:
        """Adds a step's requests, unique rows, hits, misses and conflict misses to the
        counters of the tables its ids came from: a few vectorised ops, no device read (a
        sync-free CUDA step's buffers are masked by its device-side count)."""
        ids, slots = found.ids, found.slots  # (U,) or buffers of which `count` are used
        u, t = ids.numel(), len(self._group.tables)
        filled = getattr(found, "filled", None)  # the CUDA step's: 1 where inserted this step
        hit = found.hit if filled is None else (slots >= 0) & (filled == 0)
        table = self._group.table_of(ids).clamp(0, t - 1)
        count = getattr(found, "count", None)
        if count is not None:  # entries past the batch's unique count go to a spare table
            used = torch.arange(u, device=ids.device) < count.to(torch.int64)
            table = torch.where(used, table, t)
        parts = (step.counts[:u], torch.ones_like(ids), hit, ~hit, slots < 0)
        per_id = torch.stack([p.to(torch.int64) for p in parts], 0)  # (5, U)
        # The ids ascend, so their tables do (the spare one last): each table's sums are the
        # differences of running sums at its ends (an index_add_ would contend on t rows).
        # One scan of the flattened (5 U,) sums: torch scans a 1-D tensor with one fast
        # device-wide kernel, but a (5, U) tensor along its inner dim row by row (3.1 ms on an
        # H100 for U = 1.7 M) and a (U, 5) one down its outer dim slower still (467 ms, U = 1 M)
        cum = prefix_sums(per_id.reshape(-1))  # (5 U + 1,)
        ends = torch.searchsorted(table, torch.arange(t, device=ids.device), right=True)
        bounds = torch.cat([ends.new_zeros(1), ends])  # (t + 1,) where each table's ids begin
        at = cum[torch.arange(per_id.shape[0], device=ids.device)[:, None] * u + bounds]
        self.table_counters += (at[:, 1:] - at[:, :-1]).T  # (t, 5)

    def reset_stats(self) -> None:
        super().reset_stats()
        self.table_counters.zero_()


def check_tables(tables: list, path) -> None:
    """Refuses a collection's table list (:class:`InvalidInputError`) unless it holds at least
    one :class:`TableConfig`, names are unique, feature names are unique across tables, and a
    ``num_embeddings=None`` table comes with an SSD tier (``path``)."""
    if not tables:
        raise InvalidInputError("tables must hold at least one TableConfig")
    names, features = set(), {}
    for t in tables:
        if not isinstance(t, TableConfig):
            raise InvalidInputError(f"tables must be TableConfig, got {type(t).__name__}")
        if t.name in names:
            raise InvalidInputError(f"two tables are named {t.name!r}: names must be unique")
        names.add(t.name)
        for f in t.feature_names:
            if f in features:
                raise InvalidInputError(
                    f"feature {f!r} of table {t.name!r} is also a feature of table "
                    f"{features[f]!r}: feature names must be unique across tables"
                )
            features[f] = t.name
        if t.num_embeddings is None and path is None:
            raise InvalidInputError(
                f"table {t.name!r}: num_embeddings=None (any id) needs an SSD tier: give "
                "the collection a path="
            )


def group_tables(tables: list[TableConfig], optimizer: Optimizer | None) -> list[TableGroup]:
    """The tables grouped by (dim, optimizer), groups in order of their first table; a group is
    named ``dim{D}-{optimizer}`` (``-2``, ``-3``... for more groups of that stem)."""
    members: dict[tuple, list[TableConfig]] = {}
    for t in tables:
        opt = t.optimizer if t.optimizer is not None else optimizer
        members.setdefault((t.embedding_dim, opt), []).append(t)
    groups, seen = [], {}
    for (dim, opt), ts in members.items():
        stem = f"dim{dim}-{opt.name if opt is not None else 'frozen'}"
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        groups.append(TableGroup(name, ts, opt))
    return groups


def row_shares(
    groups: list[TableGroup], cache_rows: int | None, host_rows: int | None, ssd: bool
) -> tuple[list[int], list[int | None]]:
    """Each group's L1 rows and L2 rows (``None``: the store's default), the collection's
    totals split in proportion to the groups' rows (an unbounded table counting as the largest
    bounded one, or 1 if there is none); L1's default is 20 % of each group's rows."""
    bounded = [t.num_embeddings for g in groups for t in g.tables if t.num_embeddings]
    weights = [g.size_weight(max(bounded, default=1)) for g in groups]
    if cache_rows is None:
        if any(g.tagged for g in groups):
            raise InvalidInputError("cache_rows is required with a num_embeddings=None table")
        caches = [max(1, math.ceil(0.2 * g.num_rows)) for g in groups]
    elif not isinstance(cache_rows, int) or cache_rows < len(groups):
        raise InvalidInputError(
            f"cache_rows must be an int of at least one row per group ({len(groups)} "
            f"groups), got {cache_rows!r}"
        )
    else:
        caches = split_rows(cache_rows, weights)
    if host_rows is not None and not ssd:
        raise InvalidInputError("host_rows only applies with an SSD tier: give path=")
    if host_rows is None:
        hosts: list[int | None] = [None] * len(groups)
    elif not isinstance(host_rows, int) or host_rows < len(groups):
        raise InvalidInputError(f"host_rows must be a positive int, got {host_rows!r}")
    else:
        hosts = list(split_rows(host_rows, weights))
    return caches, hosts


def build_store(
    g: TableGroup,
    cache_rows: int,
    ways: int,
    policy,
    host_rows: int | None,
    root: pathlib.Path | None,
    device: torch.device,
    backend,
    ssd_options: dict,
) -> None:
    """Opens the group's tiers into ``g.store``: with ``root``, its SSD tier is the LMDB
    environment ``root / g.name`` (its metadata names the group's tables)."""
    opt = g.optimizer
    layout = RowLayout(g.dim, opt.state_width(g.dim) if opt else 0,
                       opt.initial_state if opt else 0.0)  # fmt: skip
    host = None
    if root is not None:
        from .host_cache import open_host_cache, table_meta

        sets, l1_ways = cache_shape(cache_rows, ways)
        meta = table_meta(g.num_rows, layout, 0, 0.0, opt)
        meta["tables"] = [t.name for t in g.tables]
        init = functools.partial(g.initial_rows, layout=layout, device=device)
        host = open_host_cache(root / g.name, g.num_rows, layout, host_rows, sets * l1_ways,
                               policy, device, init, meta, **ssd_options)  # fmt: skip
    try:
        g.store = GroupStore(g, g.num_rows, layout, cache_rows, ways, policy, device,
                             0, 0.0, backend, host=host)  # fmt: skip
    except BaseException:
        if host is not None:
            host.close()
        raise
