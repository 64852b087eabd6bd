"""Statistics of a trace that predict how it caches, computed vectorised per table.

- distinct ids (the compulsory misses of any cache) and one-hit wonders (ids requested once);
- the share of requests that go to the most requested 1 % and 10 % of the ids;
- a histogram of LRU stack (reuse) distances in log2 buckets: bucket 0 holds distance 0 (the
  same id again with nothing in between), bucket ``b >= 1`` distances ``[2**(b-1), 2**b)``.
  A fully associative LRU cache of ``2**b`` rows hits exactly the requests in buckets
  ``0..b``.

The distances need the table's ids in memory (8 bytes a request, plus temporaries).

:func:`shared_stats` gives the view of one cache shared by the tables, a row's key being
(table, id) (:mod:`tierstore.replay.keys`): the distinct keys over all tables, and the stack
distances of the requests in their order across tables (:meth:`Trace.interleaved`), so that its
histogram predicts the shared cache: a fully associative LRU of ``2**b`` rows holding every
table's rows hits the requests of buckets ``0..b``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..replay.fully_assoc import as_id_array, lru_stack_distances
from ..replay.keys import table_keys
from .base import Trace

TOP_SHARES = (0.01, 0.10)


@dataclass
class TableStats:
    """Statistics of one table's requests (or of all tables, for the total)."""

    name: str
    requests: int
    distinct: int
    one_hit_wonders: int
    top_1pct_share: float  # requests to the most requested 1 % of ids / requests
    top_10pct_share: float
    reuse_log2_hist: list[int] = field(default_factory=list)  # see the module docstring
    request_share: float = 1.0  # this table's requests / the trace's

    @property
    def first_requests(self) -> int:
        """Requests that miss in any cache (the first one to each id)."""
        return self.distinct

    def to_dict(self) -> dict:
        """Plain types, for JSON."""
        return asdict(self)


def _top_share(counts_desc: np.ndarray, requests: int, frac: float) -> float:
    if requests == 0:
        return 0.0
    k = max(1, math.ceil(frac * counts_desc.size))
    return float(counts_desc[:k].sum()) / requests


def log2_buckets(dist: np.ndarray) -> np.ndarray:
    """Requests per log2 bucket of the non-negative distances in ``dist``."""
    d = dist[dist >= 0]
    if d.size == 0:
        return np.zeros(0, np.int64)
    # frexp's exponent of d > 0 is its bit length (exact below 2**53)
    bucket = np.where(d > 0, np.frexp(d.astype(np.float64))[1], 0)
    return np.bincount(bucket).astype(np.int64)


def _count_stats(name: str, counts: np.ndarray, hist: np.ndarray) -> TableStats:
    requests = int(counts.sum())
    desc = np.sort(counts)[::-1]
    return TableStats(
        name=name,
        requests=requests,
        distinct=int(counts.size),
        one_hit_wonders=int(np.count_nonzero(counts == 1)),
        top_1pct_share=_top_share(desc, requests, TOP_SHARES[0]),
        top_10pct_share=_top_share(desc, requests, TOP_SHARES[1]),
        reuse_log2_hist=hist.tolist(),
    )


def table_stats(ids, name: str = "0") -> TableStats:
    """Statistics of one table's id stream."""
    ids = as_id_array(ids)
    counts = np.unique(ids, return_counts=True)[1] if ids.size else np.zeros(0, np.int64)
    return _count_stats(name, counts, log2_buckets(lru_stack_distances(ids)))


def trace_stats(trace: Trace | Iterable[np.ndarray]) -> tuple[list[TableStats], TableStats]:
    """Statistics of every table, and of the whole trace (tables are separate id spaces)."""
    if not isinstance(trace, Trace):
        trace = Trace(list(trace))
    per_table, all_counts, hists = [], [], []
    n = trace.requests
    for ids, name in zip(trace.tables, trace.names):
        counts = np.unique(ids, return_counts=True)[1] if ids.size else np.zeros(0, np.int64)
        hist = log2_buckets(lru_stack_distances(ids))
        per_table.append(_count_stats(name, counts, hist))
        per_table[-1].request_share = ids.size / n if n else 0.0
        all_counts.append(counts)
        hists.append(hist)
    width = max((h.size for h in hists), default=0)
    total_hist = np.zeros(width, np.int64)
    for h in hists:
        total_hist[: h.size] += h
    total = _count_stats(
        "all", np.concatenate(all_counts) if all_counts else np.zeros(0, np.int64), total_hist
    )
    return per_table, total


def shared_stats(trace: Trace) -> TableStats:
    """Statistics of one cache shared by every table of ``trace``, keyed by (table, id): the
    distinct keys, and the stack distances of the requests in order across tables."""
    tables, ids = trace.interleaved()
    keys = table_keys(tables, ids, len(trace.tables))[0]
    counts = np.unique(keys, return_counts=True)[1] if keys.size else np.zeros(0, np.int64)
    return _count_stats("shared", counts, log2_buckets(lru_stack_distances(keys)))


def format_stats(
    per_table: list[TableStats], total: TableStats, shared: TableStats | None = None
) -> str:
    """A plain-text report: one line per table (with its share of the requests where there
    are several), then the reuse-distance histogram: of the shared cache where ``shared`` is
    given, else of the total (each table's reuses within the table)."""
    many = len(per_table) > 1
    across = many and shared is not None  # the histogram is the shared cache's
    whole = shared or total
    rows = per_table + ([whole] if many else [])
    head = f"{'table':>10} {'requests':>12} {'share':>7} {'distinct':>11} {'one-hit':>10} {'top1%':>7} {'top10%':>7}"
    lines = [head]
    for s in rows:
        share = s.requests / whole.requests if whole.requests else 0.0
        lines.append(
            f"{s.name:>10} {s.requests:>12} {100 * share:>6.1f}% {s.distinct:>11} "
            f"{s.one_hit_wonders:>10} {100 * s.top_1pct_share:>6.1f}% {100 * s.top_10pct_share:>6.1f}%"
        )
    hist = whole.reuse_log2_hist if many else per_table[0].reuse_log2_hist
    reused = sum(hist)
    lines.append("")
    lines.append(
        f"LRU stack distance (log2 buckets), {reused} reuses + {total.distinct} first requests"
        + (", (table, id) keys in request order across tables:" if across else ":")
    )
    cum = 0
    for b, c in enumerate(hist):
        lo, hi = (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)
        cum += c
        share = c / total.requests if total.requests else 0.0
        lines.append(
            f"  {lo:>11} .. {hi:<11} {c:>12} {100 * share:6.2f}%"
            f"   LRU of {1 << b} rows{' shared' * across} "
            f"hits {100 * cum / max(total.requests, 1):6.2f}%"
        )
    return "\n".join(lines)
