"""A multi-table trace replayed through one cache shared by its tables, with per-table
attribution; and, for comparison, each table in a cache of its own, the size split among them.

A row's identity in the shared cache is (table, id), keyed as
:class:`~tierstore.TieredEmbeddingBagCollection` keys it (:mod:`tierstore.replay.keys`); the
table of a key is its high bits, so each step's hits are attributed to tables by a shift of its
unique keys, vectorised.

Per table, as for the whole cache: ``requested``, ``unique`` (lookups: a key once per batch),
``hits``, ``misses``, ``hit_ratio = 1 - misses / requested``, ``unique_hit_ratio`` and the
table's compulsory-miss floor; the tables' hits, lookups and requests add up to the cache's
(:func:`~tierstore.replay.invariants.check_attribution` checks it after every replay).
Every policy attributes: the engine's from its hit flags (each step's, or each request's at
batch 1), the reference ones (``opt``, ``fa-lru``, ``s3fifo``, ``wtinylfu``) from whether each
request hit, which their loops record as they go (``hit_flags``); a table's hits are then one
``bincount`` of the requests' tables weighted by those flags. OPT's flags are those of one
optimal schedule (:mod:`~tierstore.replay.bounds`): its hits are unique, their split among
tables need not be.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidInputError
from ..progress import progress
from ..trace.base import Trace
from . import reference_hits
from .engine import EngineResult, replay_engine
from .invariants import check_attribution
from .keys import key_tables, table_keys
from .sweep import (
    ENGINE_POLICIES,
    _replay_engine_policy,
    check_policies,
    engine_row,
    reference_row,
    replay_table,
    steps_per_request,
    warm_up_engine,
    warm_up_reference,
)

# Where the per-table rows of a shared replay differ from a whole-cache row (and the columns a
# table of them shows).
TABLE_COLUMNS = [
    "table", "cache", "policy", "asked_rows", "cache_rows", "requested", "request_share",
    "unique", "hits", "misses", "hit_ratio", "unique_hit_ratio", "floor_hit_ratio",
]  # fmt: skip


class TableCounts:
    """An ``observe`` hook of :func:`~tierstore.replay.engine.replay_engine`: each table's
    lookups and hits, summed on the cache's device (no host read per batch)."""

    def __init__(self, n_tables: int, device: str | torch.device):
        self.n_tables = n_tables
        self.unique = torch.zeros(n_tables, dtype=torch.int64, device=device)
        self.hits = torch.zeros(n_tables, dtype=torch.int64, device=device)

    def __call__(self, uniq: torch.Tensor, hit: torch.Tensor) -> None:
        t = key_tables(uniq, self.n_tables)
        self.unique.index_add_(0, t, torch.ones_like(t))
        self.hits.index_add_(0, t, hit.to(torch.int64))


def split_sizes(size: int, weights: Sequence[int]) -> list[int]:
    """``size`` rows split among tables in proportion to ``weights`` (their distinct ids), by
    largest remainder; a table of weight 0 gets none, any other at least one row."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() == 0:
        return [0] * w.size
    exact = size * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    left = size - int(base.sum())
    base[np.argsort(base - exact, kind="stable")[:left]] += 1
    return np.where(w > 0, np.maximum(base, 1), 0).tolist()


@dataclass
class SharedTrace:
    """A trace's requests in order, keyed for the shared cache.

    Attributes:
        names: the tables' names.
        tables: ``(n,)`` int64, the table of each request.
        keys: ``(n,)`` int64, its key (:func:`table_keys`).
        exact: the keys are the ids themselves, tagged with the table (not hashed).
        requested: ``(T,)`` requests per table.
        distinct: ``(T,)`` distinct keys per table.
    """

    names: list[str]
    tables: np.ndarray
    keys: np.ndarray
    exact: bool
    requested: np.ndarray
    distinct: np.ndarray

    @classmethod
    def of(cls, trace: Trace) -> SharedTrace:
        """Keys ``trace`` in request order (:meth:`Trace.interleaved`)."""
        n_tables = len(trace.names)
        tables, ids = trace.interleaved()
        keys, exact = table_keys(tables, ids, n_tables)
        requested = np.bincount(tables, minlength=n_tables)
        distinct = np.bincount(key_tables(np.unique(keys), n_tables), minlength=n_tables)
        return cls(list(trace.names), tables, keys, exact, requested, distinct)

    @property
    def distinct_keys(self) -> int:
        """Distinct keys over all tables: the shared cache's compulsory misses."""
        return int(self.distinct.sum())


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else 0.0


def _table_rows(s: SharedTrace, base: dict, unique, hits) -> list[dict]:
    """Per-table rows of one replay of the shared cache (``base``: its whole-cache row)."""
    n = s.keys.size
    rows = []
    for t, name in enumerate(s.names):
        req, u, h = int(s.requested[t]), int(unique[t]), int(hits[t])
        rows.append({
            **base, "table": name, "requested": req, "request_share": _ratio(req, n),
            "unique": u, "hits": h, "misses": u - h, "hit_ratio": _ratio(h + req - u, req),
            "unique_hit_ratio": _ratio(h, u), "evictions": "", "req_per_s": "",
            "floor_hit_ratio": 1.0 - _ratio(s.distinct[t], req) if req else 0.0,
        })  # fmt: skip
        if "l2_hits" in base:  # L2 and L3 are not attributed to tables
            rows[-1].update(l1_hits=h, l2_hits="", l3_reads="")
    return rows


def _engine(s: SharedTrace, sizes, policy, opts: dict, label: str) -> list[dict]:
    """The shared cache under an engine policy at each size: whole-cache and per-table rows."""
    n_tables = len(s.names)
    batch = opts["batch"]
    run = dict(ways=opts["ways"], device=opts["device"], host_rows=opts["host_rows"])
    warm_up_engine(s.keys, max(sizes), policy, batch, num_rows=None, **run)
    per_request = steps_per_request(batch, run["host_rows"], run["device"])
    rows = []
    for size in sizes:
        counts = TableCounts(n_tables, opts["device"])
        flags = np.zeros(s.keys.size, np.bool_) if per_request else None
        r = _replay_engine_policy(
            s.keys, size, policy, batch=batch, num_rows=None, desc=f"{label} {policy} {size}",
            hits=flags, observe=counts, **run,
        )  # fmt: skip
        unique, hits = counts.unique.cpu().numpy(), counts.hits.cpu().numpy()
        if per_request:  # each request a lookup; the flags say which hit
            unique, hits = s.requested, _hits_per_table(s, flags)
        check_attribution(r, s.requested, unique, hits)
        row = engine_row(r, size, run["ways"], batch, two_level=bool(run["host_rows"]))
        row.update(table=label, cache="shared", floor_hit_ratio=_floor(s))
        rows.append(row)
        rows += _table_rows(s, {**row, "cache": "shared"}, unique, hits)
    return rows


def _hits_per_table(s: SharedTrace, hit: np.ndarray) -> np.ndarray:
    """``(T,)`` int64: each table's requests of those flagged in ``hit`` (``(n,)`` bool). A
    weighted count (exact: counts stay far below 2**53) in one pass, some three times faster
    than gathering the hits' tables first."""
    return np.bincount(s.tables, weights=hit, minlength=len(s.names)).astype(np.int64)


def _floor(s: SharedTrace) -> float:
    return 1.0 - _ratio(s.distinct_keys, s.keys.size) if s.keys.size else 0.0


def _reference(s: SharedTrace, sizes, policy: str, label: str) -> list[dict]:
    """The shared cache under a reference policy (fully associative, per request) at each
    size: whole-cache and per-table rows, a table's hits counted from the requests' hit flags.
    ``req_per_s`` excludes compilation (an untimed replay of the first few thousand keys) and
    the attribution, as :func:`~tierstore.replay.sweep.replay_table`'s."""
    n = s.keys.size
    warm_up_reference(policy, s.keys)
    flags = np.zeros((len(sizes), n), np.bool_)  # whether each request hit: a byte a request
    t0 = time.perf_counter()
    totals = reference_hits(policy, s.keys, list(sizes), hit_flags=flags)
    per_size = (time.perf_counter() - t0) / max(len(sizes), 1)
    rows = []
    for size, total, hit in zip(sizes, totals.tolist(), flags):
        hits = _hits_per_table(s, hit)
        whole = EngineResult(policy, size, requests=n, unique=n, hits=total, misses=n - total)
        check_attribution(whole, s.requested, s.requested, hits)  # each request a lookup
        row = reference_row(policy, size, n, total, per_size)
        row.update(table=label, cache="shared", floor_hit_ratio=_floor(s))
        rows.append(row)
        rows += _table_rows(s, row, s.requested, hits)
    return rows


_SUMMED = ("cache_rows", "requested", "unique", "hits", "misses")


def _own_engine(ids, own, policy, cuts, opts: dict, name: str) -> list[dict]:
    """A table's own cache under an engine policy at each of ``own`` sizes, stepped with the
    table's part of each batch of the shared replay (``cuts``: where its ids' batches end)."""
    batches = [b for b in np.split(ids, cuts) if b.size]
    run = dict(ways=opts["ways"], device=opts["device"], host_rows=opts["host_rows"])
    rows = []
    for size in own:
        source = (torch.from_numpy(b).to(run["device"]) for b in batches)
        shown = progress(source, f"{name} {policy} {size}", len(batches) > 50, len(batches))
        r = replay_engine(shown, size, policy, **run)
        rows.append(engine_row(r, size, run["ways"], opts["batch"], bool(run["host_rows"])))
    return rows


def _own_caches(s: SharedTrace, trace: Trace, sizes, policies, opts: dict, label: str):
    """Each table in its own cache, ``sizes`` split by distinct ids, stepped with its part of
    each batch of the shared replay: per-table rows, then a whole row per (policy, size)
    summing them (``cache_rows``: the rows all of them hold)."""
    split = [split_sizes(size, s.distinct) for size in sizes]
    batch = opts["batch"]
    batched = not steps_per_request(batch, opts["host_rows"], opts["device"])
    bounds = np.arange(batch, s.keys.size, batch)
    for policy in policies:  # untimed: compiles the loops once, not per table
        if policy in ENGINE_POLICIES and batched:
            warm_up_engine(s.keys, max(sizes), policy, batch, num_rows=None, ways=opts["ways"],
                           device=opts["device"], host_rows=opts["host_rows"])  # fmt: skip
    rows, sums = [], {}
    for t, (name, ids) in enumerate(zip(trace.names, trace.tables)):
        own = [sp[t] for sp in split]
        if not ids.size:
            continue
        cuts = np.searchsorted(np.flatnonzero(s.tables == t), bounds)
        for policy in policies:
            if policy in ENGINE_POLICIES and batched:
                got = _own_engine(ids, own, policy, cuts, opts, name)
                floor = 1.0 - _ratio(s.distinct[t], ids.size)
                for row in got:
                    row.update(table=name, floor_hit_ratio=floor)
            else:
                got = replay_table(ids, own, [policy], table=name, **opts)
            for size, row in zip(sizes, got):  # in the order of sizes
                row.update(
                    asked_rows=size, cache="per-table", request_share=_ratio(ids.size, s.keys.size)
                )
                rows.append(row)
                if (row["policy"], size) not in sums:
                    first = {**row, "table": label, "seconds": 0.0, **dict.fromkeys(_SUMMED, 0)}
                    del first["request_share"]
                    sums[row["policy"], size] = first
                total = sums[row["policy"], size]
                for key in _SUMMED:
                    total[key] += row[key]
                total["seconds"] += row["requested"] / row["req_per_s"]
    whole = []
    for total in sums.values():
        n, u = total["requested"], total["unique"]
        total.update(
            hit_ratio=1.0 - _ratio(total["misses"], n), unique_hit_ratio=_ratio(total["hits"], u),
            evictions="", floor_hit_ratio=_floor(s), req_per_s=n / max(total.pop("seconds"), 1e-9),
        )  # fmt: skip
        whole.append(total)
    return whole + rows


def replay_shared(
    trace: Trace,
    sizes: Sequence[int],
    policies: Sequence[str],
    *,
    label: str = "all",
    ways: int = 32,
    batch: int = 65536,
    device: str = "cpu",
    host_rows: int | None = None,
    per_table_cache: bool = False,
) -> list[dict]:
    """Result rows of ``trace`` replayed through one cache shared by its tables, keyed by
    (table, id), at each of ``sizes`` (rows of the shared cache) under each policy.

    Every row has :data:`~tierstore.replay.sweep.COLUMNS` and ``cache`` (``shared``, or
    ``per-table`` for the comparison); a row whose ``table`` is ``label`` covers every table,
    the others (with ``request_share``) one table. ``per_table_cache``: also replay each table
    in a cache of its own, each size split among them by distinct ids (:func:`split_sizes`);
    their rows keep the shared size in ``asked_rows`` and hold their own in ``cache_rows``.
    The other arguments are :func:`~tierstore.replay.sweep.replay_table`'s.
    """
    check_policies(policies)
    if batch < 1:
        raise InvalidInputError(f"batch must be at least 1, got {batch}")
    s = SharedTrace.of(trace)
    opts = dict(ways=ways, batch=batch, device=device, host_rows=host_rows)
    rows: list[dict] = []
    for policy in policies:
        if policy in ENGINE_POLICIES:
            rows += _engine(s, sizes, policy, opts, label)
        else:
            rows += _reference(s, sizes, policy, label)
    if per_table_cache:
        rows += _own_caches(s, trace, sizes, policies, opts, label)
    for row in rows:
        row["keys"] = "exact" if s.exact else "hashed"
    return rows
