"""``TieredEmbeddingBagCollection``: many tables behind shared tiers, with TorchRec's input and
output layouts.

Shapes: ``B`` samples, ``F`` features, ``T`` tables, ``D_t`` the dim of table ``t``, ``n`` ids.

Tables that share a row layout (the same dim and the same optimizer with the same
hyper-parameters) form a *group*, backed by one :class:`~tierstore.store.TieredStore`: one L1,
one L2 and, with ``path``, one LMDB environment. A group's row ids are the concatenation of
its tables' (table ``t``'s row ``r`` is group row ``base[t] + r``, the bases being the
cumulative table sizes, as FBGEMM's table-batched embeddings lay them out); in a group with a
``num_embeddings=None`` table, the table's index within the group goes in the high bits
instead (row ``(k << 47) + r``, so such ids must lie in ``[0, 2**47)``). The engine itself is
unchanged: a group is one ordinary table to it, whose never-written rows take their value
from their own table's seed and table-local id (so a table here starts from exactly the rows
a ``TieredEmbeddingBag`` with that seed starts from).

Checkpoints are per table: ``state_dict()`` holds, under ``tables.<name>.``, the keys a
``TieredEmbeddingBag`` of that table would hold (``weight (R, D_t)``, ``optimizer_state``,
sparse ``ids``, ``_extra_state``), with the table's own row ids, written and read by
:mod:`~tierstore.checkpoint` through a view of the table's part of its group. So a checkpoint
loads into a collection of other cache sizes, table order, grouping or tiers, and one table's
entries into a single ``TieredEmbeddingBag`` of the same seed, and back.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import shutil
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from . import checkpoint, graphs
from .autograd import BatchHandle, TieredBagFunction
from .cache import EMPTY, by_slot, cache_shape
from .errors import InvalidInputError, NotATableError, StorageError, TableMismatchError
from .keyed import JaggedBatch, KeyedTensor, check_jagged, parse_jagged
from .module import _backend_for
from .optim import SGD, Optimizer, optimizer_from_dict
from .stats import CacheStats
from .store import Batch, BatchMode, RowLayout, TieredStore, initial_rows

_POOLINGS = ("sum", "mean")
TAG_SHIFT = 47  # ids of a table in a group with an unbounded table: [0, 2**47)
MAX_TAGGED_TABLES = 1 << (63 - TAG_SHIFT)  # tables per such group (the tag fits below bit 63)
MANIFEST = "collection.json"


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """One embedding table of a :class:`TieredEmbeddingBagCollection` (as TorchRec's
    ``EmbeddingBagConfig``).

    Args:
        name: the table's name (unique in the collection).
        embedding_dim: ``D_t``, a multiple of 4 (rows then fill whole 16-byte words).
        num_embeddings: rows; ``None`` for any id in ``[0, 2**47)`` (needs the collection's
            ``path``: an SSD tier).
        feature_names: the input features looked up in this table (default: ``(name,)``);
            unique across the collection. Each gives one ``(B, D_t)`` output.
        pooling: ``"sum"`` (default, as TorchRec) or ``"mean"``.
        seed: never-written rows are a deterministic function of (seed, row id); default: the
            CRC-32 of ``name``, so that tables start apart and a table keeps its rows whatever
            its place in the list.
        init_scale: never-written rows are uniform on ``[-init_scale, init_scale)`` (default
            ``1/sqrt(D_t)``).
        optimizer: this table's optimizer, overriding the collection's (tables with different
            optimizers or hyper-parameters go to different groups).
    """

    name: str
    embedding_dim: int
    num_embeddings: int | None
    feature_names: tuple[str, ...] = ()
    pooling: str = "sum"
    seed: int | None = None
    init_scale: float | None = None
    optimizer: Optimizer | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InvalidInputError(f"TableConfig: name must be a non-empty str, got {self.name!r}")
        where = f"table {self.name!r}"
        dim = self.embedding_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 4 or dim % 4:
            raise InvalidInputError(
                f"{where}: embedding_dim must be a positive multiple of 4, got {dim!r}"
            )
        rows = self.num_embeddings
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise InvalidInputError(
                f"{where}: num_embeddings must be a positive int or None, got {rows!r}"
            )
        names = (self.name,) if not self.feature_names else self.feature_names
        if isinstance(names, str) or not all(isinstance(f, str) and f for f in names):
            raise InvalidInputError(
                f"{where}: feature_names must be a list of non-empty str, got {names!r}"
            )
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{where}: feature_names repeat a name: {list(names)}")
        object.__setattr__(self, "feature_names", tuple(names))
        if self.pooling not in _POOLINGS:
            raise InvalidInputError(
                f"{where}: pooling must be one of {_POOLINGS}, got {self.pooling!r}"
            )
        if self.seed is None:
            object.__setattr__(self, "seed", zlib.crc32(self.name.encode()))
        elif not isinstance(self.seed, int):
            raise InvalidInputError(f"{where}: seed must be an int, got {self.seed!r}")
        scale = 1.0 / math.sqrt(dim) if self.init_scale is None else self.init_scale
        if not isinstance(scale, int | float) or not scale > 0:
            raise InvalidInputError(f"{where}: init_scale must be positive, got {scale!r}")
        object.__setattr__(self, "init_scale", float(scale))
        if self.optimizer is not None and not isinstance(self.optimizer, Optimizer):
            raise InvalidInputError(
                f"{where}: optimizer must be a tierstore optimizer, got {self.optimizer!r}"
            )

    def manifest(self, optimizer: Optimizer | None) -> dict:
        """What a collection's directory records of the table (with its optimizer in use)."""
        return {
            "name": self.name,
            "embedding_dim": self.embedding_dim,
            "num_embeddings": self.num_embeddings,
            "feature_names": list(self.feature_names),
            "pooling": self.pooling,
            "seed": self.seed,
            "init_scale": self.init_scale,
            "optimizer": optimizer.to_dict() if optimizer is not None else None,
        }


@dataclass
class CollectionStats:
    """Counters of a collection. The caches are per group (tables of one dim and optimizer
    share them), so hits and bytes are per group; ``requested`` is per table.

    Attributes:
        overall: every group's counters summed.
        groups: each group's counters (see :attr:`TieredEmbeddingBagCollection.groups`).
        group_of: table name to its group's name.
        requested: table name to the ids looked up in it.
    """

    overall: CacheStats
    groups: dict[str, CacheStats]
    group_of: dict[str, str]
    requested: dict[str, int]

    def table(self, name: str) -> CacheStats:
        """The counters of the group that holds table ``name`` (shared with its group)."""
        return self.groups[self.group_of[name]]

    @property
    def hit_ratio(self) -> float:
        """1 - L1 misses per id looked up, all groups together (``CacheStats.hit_ratio``)."""
        return self.overall.hit_ratio

    @property
    def unique_hit_ratio(self) -> float:
        """L1 hits per unique row looked up, all groups together."""
        return self.overall.unique_hit_ratio


def _sum_stats(parts: Sequence[CacheStats]) -> CacheStats:
    out = CacheStats()
    for f in fields(CacheStats):
        setattr(out, f.name, sum(getattr(p, f.name) for p in parts))
    return out


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


class _GroupStore(TieredStore):
    """A group's store: one table to the engine, whose never-written rows take their value from
    their own table's (seed, init_scale) and table-local id (:meth:`_Group.initial_rows`)."""

    def __init__(self, group: _Group, *args, **kwargs):
        self._group = group
        super().__init__(*args, **kwargs)

    def init_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._group.initial_rows(ids, self.layout, self.device)


class _Group:
    """Tables that share one row layout and so one store.

    ``tables`` in collection order; ``bases[k]`` is added to table ``k``'s ids; ``limits[k]``
    bounds them (``num_embeddings``, or ``2**47`` in a tagged group).
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
        self.store: TieredStore | None = None

    def to(self, device: torch.device) -> None:
        """Moves the per-feature tensors to ``device``."""
        self.feature_base = self.feature_base.to(device)
        self.feature_mean = self.feature_mean.to(device)

    def table_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Index within the group of the table that holds each group row id."""
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


class _TableRows:
    """One table of a group seen as a store of its own (what :mod:`~tierstore.checkpoint` reads
    and writes): the table's own row ids ``[0, limit)``, shifted by ``base`` into the group's,
    and its own seed and init scale. Listings of stored, dirty and cached rows keep only the
    table's and give them table-local ids.

    ``listings``, shared by the views of one group while nothing writes (a save), keeps the
    group's SSD listing: it is read once per group, not once per table."""

    def __init__(self, group: _Group, k: int, listings: dict | None = None):
        cfg = group.tables[k]
        self.listings = listings
        self.group, self.base, self.limit = group, group.bases[k], group.limits[k]
        self.seed, self.init_scale = cfg.seed, cfg.init_scale
        store = group.store
        self.layout, self.device = store.layout, store.device
        self.inclusive_host = store.inclusive_host
        self.host = _TableHost(self)
        self.l1 = _TableL1(self)

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

    def set_l1_rows(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.group.store.set_l1_rows(slots, rows)


class _TableHost:
    """The table's part of its group's L2 and SSD tier (see :class:`_TableRows`)."""

    def __init__(self, rows: _TableRows):
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


class _TableL1:
    """The group's L1 with only the table's rows tagged, by table-local id (slots unchanged)."""

    def __init__(self, rows: _TableRows):
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


class _TableView:
    """A collection's table as :mod:`~tierstore.checkpoint` sees a ``TieredEmbeddingBag``."""

    def __init__(self, group: _Group, k: int, listings: dict | None = None):
        cfg = group.tables[k]
        self.store = _TableRows(group, k, listings)
        self.embedding_dim, self.num_embeddings = cfg.embedding_dim, cfg.num_embeddings
        self.optimizer = group.optimizer


@dataclass
class _GroupInput:
    """A group's share of a batch: its ids (group row ids), offsets and weights."""

    ids: torch.Tensor  # (n_g,) int64 group row ids, feature-major
    offsets: torch.Tensor  # (F_g * B + 1,) int64
    weights: torch.Tensor | None  # (n_g,) float32, or None
    mode: str


@dataclass
class _Prepared:
    """A checked batch: each group's input, and the ids per table (for the stats)."""

    groups: list[_GroupInput]
    batch_size: int
    requested: dict[str, int] = field(default_factory=dict)


class TieredEmbeddingBagCollection(nn.Module):
    """Many embedding tables in shared tiers, fed and read as TorchRec's
    ``EmbeddingBagCollection`` (``KeyedJaggedTensor`` in, ``KeyedTensor`` out).

    Shapes: ``B`` samples, ``F`` features, ``D_t`` table ``t``'s dim; the output is
    ``(B, sum over features of their table's D_t)``.

    Tables of one dim and one optimizer form a group with one L1, one L2 and one SSD
    environment, so a collection of one dim and one optimizer has exactly one cache and runs
    one lookup, one forward and one backward per batch for all its tables; a row's identity in
    the cache is (table, id), and the hot rows of every table of a group compete for its
    space. Tables of other dims go to other groups, so that narrow rows never take a wide
    row's space in any tier. ``cache_rows`` and ``host_rows`` are split across groups in
    proportion to their rows (a ``num_embeddings=None`` table counts as the largest bounded
    table, or 1 if there is none): see :attr:`groups` for each group's share.

    Pooling is per table. A group whose tables all pool alike runs in that mode; a group that
    mixes ``"mean"`` and ``"sum"`` tables, or a ``"mean"`` group given per-sample weights,
    runs in ``"sum"`` with each id of a ``"mean"`` bag weighted by ``1/len`` (times its
    weight): equal to the mean up to rounding.

    With ``path``, the collection is a directory: ``collection.json`` lists its tables, and each
    group is an LMDB environment in a subdirectory named after the group (``dim64-sgd``; a
    second group of that dim and optimizer name, with other hyper-parameters, is
    ``dim64-sgd-2``). A flush is one transaction per group.

    Args:
        tables: the :class:`TableConfig` list; the output's keys are their features, tables in
            order and each table's features in order.
        cache_rows: L1 rows, all groups together (default: 20 % of each group's rows).
        ways, policy: L1's associativity and replacement policy (every group's).
        host_rows: L2 rows with an SSD tier, all groups together (default per group: as
            ``TieredEmbeddingBag``'s).
        path: the collection's directory (an SSD tier for every group).
        optimizer: the tables' optimizer unless a table gives its own; ``None``: no training.
        device: where L1 and the kernels live (default ``"cuda"`` when available).
        ssd_options: passed to each group's SSD tier (``block_rows``, ``compression_level``,
            ``map_size``, ``io_threads``, ``host_ways``).

    Example::

        >>> import torch, tierstore as ts
        >>> col = ts.TieredEmbeddingBagCollection(
        ...     tables=[ts.TableConfig(name="user", embedding_dim=8, num_embeddings=100),
        ...             ts.TableConfig(name="item", embedding_dim=4, num_embeddings=50,
        ...                            feature_names=["item", "last_item"])],
        ...     cache_rows=32, device="cpu")
        >>> kt = col(keys=["user", "item", "last_item"], values=torch.tensor([1, 2, 3, 4, 5]),
        ...          lengths=torch.tensor([1, 1, 2, 0, 1, 0]))
        >>> kt.values().shape, kt.keys(), kt.to_dict()["item"].shape
        (torch.Size([2, 16]), ['user', 'item', 'last_item'], torch.Size([2, 4]))
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        cache_rows: int | None = None,
        ways: int = 32,
        policy: str = "lru",
        host_rows: int | None = None,
        path: str | os.PathLike | None = None,
        optimizer: Optimizer | None = SGD(lr=0.01),  # noqa: B008 (frozen, immutable)
        device: torch.device | str | None = None,
        ssd_options: dict | None = None,
    ):
        super().__init__()
        tables = list(tables)
        self._check_tables(tables, path)
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise InvalidInputError(
                f"optimizer must be a tierstore optimizer or None, got {optimizer!r}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tables = tables
        self.groups: list[_Group] = self._group_tables(tables, optimizer)
        for g in self.groups:
            g.to(self.device)
        # Where each table and feature lives: (group, index in group), and the output's keys
        self._table_at = {t.name: (g, k) for g in self.groups for k, t in enumerate(g.tables)}
        self.feature_keys = [f for t in tables for f in t.feature_names]
        self._feature_table = {f: t for t in tables for f in t.feature_names}
        self._requested = {t.name: 0 for t in tables}
        self._dims = [self._feature_table[f].embedding_dim for f in self.feature_keys]
        self._columns = self._column_order()
        caches, hosts = self._shares(cache_rows, host_rows, path is not None)
        root = None if path is None else pathlib.Path(path)
        existed = root is not None and root.exists()
        created = root is not None and self._open_directory(root)
        opened: list[_Group] = []
        try:
            for g, c, h in zip(self.groups, caches, hosts, strict=True):
                self._build_store(g, c, ways, policy, h, root, ssd_options or {})
                opened.append(g)
        except BaseException:
            for g in opened:
                g.store.host.close()
            if created:  # a collection made by this call and not finished: leave no trace
                for child in root.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
                if not existed:
                    root.rmdir()
            raise
        self.path = root
        self._prefetched: deque[tuple[list[torch.Tensor], list[Batch]]] = deque()

    # ------------------------------------------------------------------ construction
    def _column_order(self) -> torch.Tensor | None:
        """Where each output column (key order) is in the groups' outputs side by side, or
        ``None`` where the two orders agree (every collection of one group)."""
        start, at = 0, {}
        for g in self.groups:
            for f in g.features:
                at[f] = start
                start += g.dim
        cols = [
            at[f] + c
            for f in self.feature_keys
            for c in range(self._feature_table[f].embedding_dim)
        ]
        if cols == list(range(len(cols))):
            return None
        return torch.tensor(cols, dtype=torch.int64, device=self.device)

    @staticmethod
    def _check_tables(tables: list, path) -> None:
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

    @staticmethod
    def _group_tables(tables: list[TableConfig], optimizer: Optimizer | None) -> list[_Group]:
        members: dict[tuple, list[TableConfig]] = {}
        for t in tables:
            opt = t.optimizer if t.optimizer is not None else optimizer
            members.setdefault((t.embedding_dim, opt), []).append(t)
        groups, seen = [], {}
        for (dim, opt), ts in members.items():
            stem = f"dim{dim}-{opt.name if opt is not None else 'frozen'}"
            seen[stem] = seen.get(stem, 0) + 1
            name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
            groups.append(_Group(name, ts, opt))
        return groups

    def _shares(self, cache_rows, host_rows, ssd: bool) -> tuple[list, list]:
        bounded = [t.num_embeddings for t in self.tables if t.num_embeddings is not None]
        weights = [g.size_weight(max(bounded, default=1)) for g in self.groups]
        if cache_rows is None:
            if any(g.tagged for g in self.groups):
                raise InvalidInputError("cache_rows is required with a num_embeddings=None table")
            caches = [max(1, math.ceil(0.2 * g.num_rows)) for g in self.groups]
        elif not isinstance(cache_rows, int) or cache_rows < len(self.groups):
            raise InvalidInputError(
                f"cache_rows must be an int of at least one row per group ({len(self.groups)} "
                f"groups), got {cache_rows!r}"
            )
        else:
            caches = split_rows(cache_rows, weights)
        if host_rows is not None and not ssd:
            raise InvalidInputError("host_rows only applies with an SSD tier: give path=")
        if host_rows is None:
            hosts = [None] * len(self.groups)
        elif not isinstance(host_rows, int) or host_rows < len(self.groups):
            raise InvalidInputError(f"host_rows must be a positive int, got {host_rows!r}")
        else:
            hosts = split_rows(host_rows, weights)
        return caches, hosts

    def _manifest(self) -> dict:
        return {
            "format": "tierstore-collection",
            "version": 1,
            "groups": {g.name: [t.name for t in g.tables] for g in self.groups},
            "tables": [t.manifest(self._table_at[t.name][0].optimizer) for t in self.tables],
        }

    def _open_directory(self, root: pathlib.Path) -> bool:
        """Checks that ``root`` holds this very collection, or creates it (its manifest): then
        returns True."""
        want = self._manifest()
        mfile = root / MANIFEST
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            if not mfile.is_file():
                kind = "a single table" if (root / "data.mdb").exists() else "no collection"
                raise NotATableError(f"{root}: holds {kind} (no {MANIFEST})")
            have = self.read_manifest(root)
            self._compare_manifest(root, have, want)
            return False
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
            os.replace(tmp, mfile)
        except OSError as exc:
            raise StorageError(f"{root}: cannot create the collection ({exc})") from exc
        return True

    @staticmethod
    def read_manifest(root: str | os.PathLike) -> dict:
        """The ``collection.json`` of the collection at ``root``."""
        mfile = pathlib.Path(root) / MANIFEST
        try:
            have = json.loads(mfile.read_text())
        except FileNotFoundError as exc:
            raise NotATableError(f"{root}: not a tierstore collection (no {MANIFEST})") from exc
        except (OSError, ValueError) as exc:
            raise StorageError(f"{mfile}: unreadable ({exc})") from exc
        if not isinstance(have, dict) or have.get("format") != "tierstore-collection":
            raise NotATableError(f"{mfile}: not a tierstore collection manifest")
        return have

    @staticmethod
    def _compare_manifest(root: pathlib.Path, have: dict, want: dict) -> None:
        stored = {t["name"]: t for t in have.get("tables", [])}
        wanted = {t["name"]: t for t in want["tables"]}
        keys = ("embedding_dim", "num_embeddings", "seed", "init_scale")
        for name, t in wanted.items():
            if name not in stored:
                raise TableMismatchError(
                    f"{root}: holds other tables ({sorted(stored)}); table {name!r} is not one"
                )
            s = stored[name]
            wrong = [f"{k}={s.get(k)!r} (expected {t[k]!r})" for k in keys if s.get(k) != t[k]]
            if (s.get("optimizer") or {}).get("name") != (t["optimizer"] or {}).get("name"):
                wrong.append(f"optimizer {(s.get('optimizer') or {}).get('name')!r}")
            if wrong:
                raise TableMismatchError(f"{root}: table {name!r} was made with {', '.join(wrong)}")
        extra = sorted(set(stored) - set(wanted))
        if extra or have.get("groups") != want["groups"]:
            raise TableMismatchError(
                f"{root}: holds other tables or groups (stored {have.get('groups')}, configured "
                f"{want['groups']}): tables {extra} are not configured"
                if extra
                else f"{root}: its tables are grouped as {have.get('groups')}, not as "
                f"{want['groups']} (the same tables, in the same order, with the same optimizers)"
            )

    def _build_store(self, g: _Group, cache_rows, ways, policy, host_rows, root, ssd_options):
        opt = g.optimizer
        layout = RowLayout(g.dim, opt.state_width(g.dim) if opt else 0,
                           opt.initial_state if opt else 0.0)  # fmt: skip
        host = None
        if root is not None:
            from .host_cache import open_host_cache, table_meta

            sets, l1_ways = cache_shape(cache_rows, ways)
            meta = table_meta(g.num_rows, layout, 0, 0.0, opt)
            meta["tables"] = [t.name for t in g.tables]
            init = functools.partial(g.initial_rows, layout=layout, device=self.device)
            host = open_host_cache(root / g.name, g.num_rows, layout, host_rows, sets * l1_ways,
                                   policy, self.device, init, meta, **ssd_options)  # fmt: skip
        try:
            g.store = _GroupStore(g, g.num_rows, layout, cache_rows, ways, policy, self.device,
                                  0, 0.0, _backend_for(self.device), host=host)  # fmt: skip
        except BaseException:
            if host is not None:
                host.close()
            raise

    # ------------------------------------------------------------------ the batch
    def _prepare(self, features, keys, values, lengths, offsets, weights) -> _Prepared:
        batch = parse_jagged(features, keys=keys, values=values, lengths=lengths,
                             offsets=offsets, weights=weights, device=self.device,
                             check_keys=self._match_keys)  # fmt: skip
        position = self._match_keys(batch.keys)
        owners = [self._feature_table[k].name for k in batch.keys]
        limits = [self._limit(self._table_at[t]) for t in owners]
        counts = check_jagged(batch, limits, owners)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        prepared = _Prepared([], batch.batch_size)
        for t, c in zip(owners, counts, strict=True):
            prepared.requested[t] = prepared.requested.get(t, 0) + c
        for g in self.groups:
            prepared.groups.append(self._group_input(g, batch, position, starts))
        return prepared

    @staticmethod
    def _limit(at: tuple[_Group, int]) -> int:
        g, k = at
        return g.limits[k]

    def _match_keys(self, keys: list[str]) -> dict[str, int]:
        """The batch's position of each configured feature; refuses unknown, missing and
        repeated keys."""
        position: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in position:
                raise InvalidInputError(f"feature {k!r} appears twice in the batch's keys")
            if k not in self._feature_table:
                raise InvalidInputError(
                    f"feature {k!r} is not a feature of any table; features: {self.feature_keys}"
                )
            position[k] = i
        missing = [k for k in self.feature_keys if k not in position]
        if missing:
            raise InvalidInputError(
                f"the batch lacks feature {missing[0]!r} (table "
                f"{self._feature_table[missing[0]].name!r})"
                + (f" and {missing[1:]}" if missing[1:] else "")
            )
        return position

    def _group_input(self, g: _Group, batch: JaggedBatch, position, starts) -> _GroupInput:
        """The group's features (configured order) as one flat batch of group row ids, in a
        fixed number of tensor ops whatever the number of features: each feature's values are
        gathered from where the input put them and shifted by their table's base."""
        sel = [position[f] for f in g.features]  # each group feature's place in the input
        counts = [starts[i + 1] - starts[i] for i in sel]
        n = sum(counts)
        dev = self.device
        seg = torch.tensor(counts, dtype=torch.int64, device=dev)
        if sel == list(range(sel[0], sel[0] + len(sel))):  # in input order, one slice
            src = slice(starts[sel[0]], starts[sel[0]] + n)
        else:  # value j of the group comes from input value src[j]
            begin = torch.tensor([starts[i] for i in sel], dtype=torch.int64, device=dev)
            shift = begin - (seg.cumsum(0) - seg)  # input start minus group start, per feature
            src = torch.arange(n, device=dev) + shift.repeat_interleave(seg, output_size=n)
        ids = batch.values[src] + g.feature_base.repeat_interleave(seg, output_size=n)
        lengths = batch.lengths[sel].reshape(-1)  # (F_g * B,) feature-major
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        psw = None if batch.weights is None else batch.weights[src]
        if g.poolings == {"mean"} and psw is None:
            mode = "mean"
        elif "mean" not in g.poolings:
            mode = "sum"
        else:  # a mean bag as a sum with each id weighted 1/len (times its own weight)
            mode = "sum"
            per_bag = torch.where(
                g.feature_mean.unsqueeze(1),
                1.0 / batch.lengths[sel].clamp(min=1).to(torch.float32),
                torch.ones((), device=dev),
            ).reshape(-1)
            scale = per_bag.repeat_interleave(lengths, output_size=n)
            psw = scale if psw is None else psw * scale
        return _GroupInput(ids, offsets, psw, mode)

    def forward(
        self,
        features=None,
        *,
        keys: Sequence[str] | None = None,
        values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> KeyedTensor:
        """Pooled embeddings of every feature, ``(B, sum D)`` in a :class:`KeyedTensor`.

        The batch is a ``KeyedJaggedTensor`` (positional), a dict of feature name to
        ``(indices, offsets)`` (``nn.EmbeddingBag``'s input), or ``keys``, ``values (n,)``
        (feature-major), ``lengths (F * B,)`` or ``offsets (F * B + 1,)`` and ``weights (n,)``.
        Every feature of the collection must be given, each with the same ``B``. Bad input
        raises :class:`InvalidInputError` naming the feature and table, with nothing changed.
        """
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            graphs.refuse_capture()
        prep = self._prepare(features, keys, values, lengths, offsets, weights)
        batches = self._take_prefetched(prep)
        looked_up = batches is not None
        outs: list[torch.Tensor] = []
        try:
            for i, (g, gin) in enumerate(zip(self.groups, prep.groups, strict=True)):
                outs.append(self._group_forward(g, gin, batches[i] if looked_up else None))
        except BaseException:
            if looked_up:  # the prefetched batches not yet handed to a forward
                for g, b in zip(self.groups[len(outs) :], batches[len(outs) :], strict=True):
                    g.store.release(b)
            raise
        for t, c in prep.requested.items():
            self._requested[t] += c
        return self._keyed(outs, prep.batch_size)

    def _group_forward(self, g: _Group, gin: _GroupInput, batch: Batch | None) -> torch.Tensor:
        psw = gin.weights
        # rows are updated only in training mode with grad enabled, as the single-table module
        update = self.training and torch.is_grad_enabled() and g.optimizer is not None
        training = update or (torch.is_grad_enabled() and psw is not None and psw.requires_grad)
        store = g.store
        if batch is None:
            batch = store.lookup(gin.ids, None, BatchMode.TRAIN if training else BatchMode.EVAL)
        if training:
            handle = BatchHandle(batch, store.release)
            anchor = torch.empty(0, device=self.device, requires_grad=True)  # see module.py
            return TieredBagFunction.apply(anchor, psw, g, handle, gin.offsets, gin.mode, update)
        try:
            return store.backend.forward(store, batch, gin.offsets, psw, gin.mode)
        finally:
            store.release(batch)

    def _keyed(self, outs: list[torch.Tensor], b: int) -> KeyedTensor:
        """The groups' ``(F_g * B, D_g)`` outputs as one ``(B, sum D)`` tensor in key order: per
        group one transposing copy, then one column gather where the groups' features
        interleave in the key order (a select and a cat per feature would cost a full-size
        gradient per feature in the backward)."""
        parts = [
            out.view(len(g.features), b, g.dim).transpose(0, 1).reshape(b, len(g.features) * g.dim)
            for g, out in zip(self.groups, outs, strict=True)
        ]
        values = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self._columns is not None:
            values = values.index_select(1, self._columns)
        return KeyedTensor(self.feature_keys, self._dims, values)

    def prefetch(
        self,
        features=None,
        *,
        keys: Sequence[str] | None = None,
        values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Looks up a future batch now (same forms as :meth:`forward`): its rows are moved in
        and locked in every group, so that its forward finds them in place. Batches are
        consumed in the order they were prefetched."""
        prep = self._prepare(features, keys, values, lengths, offsets, weights)
        batches: list[Batch] = []
        try:
            for g, gin in zip(self.groups, prep.groups, strict=True):
                batches.append(g.store.lookup(gin.ids, None, BatchMode.TRAIN))
        except BaseException:
            for g, b in zip(self.groups, batches, strict=False):
                g.store.release(b)
            raise
        self._prefetched.append(([gin.ids for gin in prep.groups], batches))

    def _take_prefetched(self, prep: _Prepared) -> list[Batch] | None:
        if not self._prefetched:
            return None
        ids, batches = self._prefetched[0]
        same = all(torch.equal(a, gin.ids) for a, gin in zip(ids, prep.groups, strict=True))
        if not same:
            raise InvalidInputError(
                "forward's ids differ from the oldest prefetched batch: prefetch batches in the "
                "order forward will see them"
            )
        self._prefetched.popleft()
        return batches

    # ------------------------------------------------------------------ rows and tiers
    def _table(self, name: str) -> tuple[_Group, int]:
        if name not in self._table_at:
            raise InvalidInputError(f"no table named {name!r}; tables: {list(self._table_at)}")
        return self._table_at[name]

    def _row_ids(self, name: str, ids) -> tuple[_Group, torch.Tensor]:
        g, k = self._table(name)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError(f"table {name!r}: ids must be an int32 or int64 tensor")
        ids = ids.reshape(-1).to(self.device, torch.int64)
        if ids.numel():
            lo, hi = torch.stack(list(torch.aminmax(ids))).tolist()
            if lo < 0 or hi >= g.limits[k]:
                raise InvalidInputError(
                    f"table {name!r}: ids must be in [0, {g.limits[k]}), found "
                    f"{lo if lo < 0 else hi}"
                )
        return g, ids + g.bases[k]

    def read_rows(self, table: str, ids: torch.Tensor, with_state: bool = False) -> torch.Tensor:
        """Current weights ``(len(ids), D_t)`` of table ``table``'s rows ``ids`` (its own ids),
        and the optimizer state after them with ``with_state``. Changes nothing."""
        g, rows = self._row_ids(table, ids)
        out = g.store.read_rows(rows)
        return out if with_state else out[:, : g.dim].contiguous()

    def write_rows(self, table: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrites the weights of table ``table``'s unique rows ``ids`` with
        ``values (len(ids), D_t)``; their optimizer state is kept."""
        g, rows = self._row_ids(table, ids)
        if not isinstance(values, torch.Tensor) or values.shape != (rows.numel(), g.dim):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise InvalidInputError(
                f"table {table!r}: values must have shape ({rows.numel()}, {g.dim}), got {got}"
            )
        if not values.is_floating_point():
            raise InvalidInputError(f"table {table!r}: values must be floating point")
        if torch.unique(rows).numel() != rows.numel():
            raise InvalidInputError(f"table {table!r}: write_rows ids must be unique")
        whole = g.store.read_rows(rows)
        whole[:, : g.dim] = values.to(whole.device, torch.float32)
        g.store.write_rows(rows, whole)

    def flush(self) -> None:
        """Writes every dirty row down to the lowest tier: with an SSD tier, one durable
        transaction per group."""
        for g in self.groups:
            g.store.flush()

    def close(self) -> None:
        """Closes every group's SSD tier (without flushing: call :meth:`flush` first)."""
        for g in self.groups:
            g.store.host.close()

    def stats(self) -> CollectionStats:
        """Counters per group and overall, and the ids looked up per table."""
        groups = {g.name: g.store.stats() for g in self.groups}
        return CollectionStats(
            overall=_sum_stats(list(groups.values())),
            groups=groups,
            group_of={t.name: g.name for g in self.groups for t in g.tables},
            requested=dict(self._requested),
        )

    def reset_stats(self) -> None:
        """Zeroes every counter."""
        for g in self.groups:
            g.store.reset_stats()
        self._requested = dict.fromkeys(self._requested, 0)

    # ------------------------------------------------------------------ checkpoints
    # Per table, under ``tables.<name>.``: the keys of a ``TieredEmbeddingBag`` (``weight``,
    # ``optimizer_state``, sparse ``ids``, ``_extra_state``) with the table's own row ids, so
    # that a checkpoint loads into a collection of any cache sizes, grouping or tiers, and one
    # table's entries load into a single ``TieredEmbeddingBag`` of the same seed.
    def table_views(self, reading: bool = False) -> list[tuple[str, _TableView]]:
        """``(key prefix, view)`` per table, in table order: each table as
        :mod:`~tierstore.checkpoint` reads and writes a ``TieredEmbeddingBag``. With
        ``reading`` (no row may change while the views are used), a group's SSD listing is
        read once for all its tables."""
        listings: dict[str, dict | None] = {g.name: {} if reading else None for g in self.groups}
        out = []
        for t in self.tables:
            g, k = self._table_at[t.name]
            out.append((f"tables.{t.name}.", _TableView(g, k, listings[g.name])))
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, view in self.table_views(reading=True):
            checkpoint.save_table(view, destination, prefix + key)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._prefetched:
            raise InvalidInputError(
                "load_state_dict with prefetched batches pending: run their forwards first"
            )
        views = self.table_views()
        ours = {prefix + key + k for key, _ in views for k in checkpoint.KEYS}
        for key, view in views:  # every table checked before the first row changes
            checkpoint.check_table(view, state_dict, prefix + key)
        for key, view in views:
            checkpoint.load_table(view, state_dict, prefix + key, missing_keys)
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with ``strict``, missing and unexpected keys raise
        before any row changes (torch reports them only after loading the rest)."""
        if strict:
            views = self.table_views()
            ours = {key + k for key, _ in views for k in checkpoint.KEYS}
            missing = [
                key + k
                for key, view in views
                for k in ("weight", "optimizer_state")
                if key + k not in state_dict and (k == "weight" or view.store.layout.state_width)
            ]
            unexpected = [k for k in state_dict if k not in ours]
            if missing or unexpected:
                msgs = []
                if unexpected:
                    msgs.append(f"Unexpected key(s) in state_dict: {unexpected}. ")
                if missing:
                    msgs.append(f"Missing key(s) in state_dict: {missing}. ")
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                    + "\n\t".join(msgs)
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def incremental_state_dict(self, prefix: str = "") -> dict:
        """Every table's rows changed since :meth:`mark_checkpoint` or the last incremental
        checkpoint, keyed as ``state_dict`` keys them (sparse form), then flushes; see
        :func:`tierstore.checkpoint.incremental_state_dict`. Needs an SSD tier (``path``)."""
        return checkpoint.incremental_state_dict(self, prefix)

    def mark_checkpoint(self) -> None:
        """Flushes and makes now the base of the next :meth:`incremental_state_dict` (call it
        right after saving a full ``state_dict``). Needs an SSD tier (``path``)."""
        checkpoint.mark_checkpoint(self)

    def __reduce_ex__(self, protocol):
        raise checkpoint.not_picklable(self)

    @classmethod
    def open(cls, path: str | os.PathLike, **options) -> TieredEmbeddingBagCollection:
        """Reopens the collection at ``path`` with the tables (and their optimizers) its
        ``collection.json`` lists; ``options`` as the constructor's (not ``tables`` nor
        ``optimizer``: to train on with other hyper-parameters, build the collection with
        ``TableConfig``s whose optimizers differ from the stored ones in those alone)."""
        if "tables" in options or "optimizer" in options:
            raise InvalidInputError(
                "open() takes the tables and their optimizers from the collection's directory; "
                "construct TieredEmbeddingBagCollection(tables, path=...) to give them"
            )
        have = cls.read_manifest(path)
        tables = []
        for t in have["tables"]:
            opt = optimizer_from_dict(t["optimizer"])
            tables.append(TableConfig(
                name=t["name"], embedding_dim=t["embedding_dim"],
                num_embeddings=t["num_embeddings"], feature_names=tuple(t["feature_names"]),
                pooling=t["pooling"], seed=t["seed"], init_scale=t["init_scale"],
                optimizer=opt,
            ))  # fmt: skip
        return cls(tables, path=path, optimizer=None, **options)  # each table brings its own

    def extra_repr(self) -> str:
        parts = []
        for g in self.groups:
            l1 = g.store.l1
            parts.append(
                f"{g.name}: tables={[t.name for t in g.tables]}, cache={l1.sets}x{l1.ways}"
            )
        return f"device={self.device}\n" + "\n".join(parts)
