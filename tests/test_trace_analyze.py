"""Trace statistics: worked by hand on the golden trace, and the log2 buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tierstore.trace.analyze import (
    format_stats,
    log2_buckets,
    shared_stats,
    table_stats,
    trace_stats,
)
from tierstore.trace.cli import main as trace_main
from tierstore.trace.formats import Trace, load_trace

DATA = Path(__file__).parent / "data"


def test_golden_trace_stats_by_hand():
    ids = load_trace(DATA / "golden_trace.txt").tables[0]  # 1 2 3 1 4 2 1 3 2 5 1 2
    s = table_stats(ids)
    assert (s.requests, s.distinct, s.one_hit_wonders) == (12, 5, 2)  # ids 4 and 5 once
    # top 1 % and 10 % of 5 ids round up to one id: id 1 or 2, 4 requests each
    assert s.top_1pct_share == s.top_10pct_share == 4 / 12
    # stack distances 2,3,2,3,2,3,2 all fall in bucket 2 = [2, 4)
    assert s.reuse_log2_hist == [0, 0, 7]
    assert s.first_requests == 5


def test_log2_buckets():
    d = np.array([-1, 0, 1, 2, 3, 4, 7, 8, 2**40 - 1, 2**40])
    got = log2_buckets(d)
    want = np.bincount([int(x).bit_length() for x in d[d >= 0]])
    assert got.tolist() == want.tolist()
    assert log2_buckets(np.array([-1, -1])).size == 0


def test_trace_stats_totals_over_tables():
    a, b = np.array([1, 1, 2]), np.array([1, 3, 3, 3])
    per, total = trace_stats(Trace([a, b], ["a", "b"]))
    assert [s.name for s in per] == ["a", "b"]
    assert (total.requests, total.distinct, total.one_hit_wonders) == (7, 4, 2)
    assert total.reuse_log2_hist == [3]  # every reuse is immediate (distance 0)
    assert "top1%" in format_stats(per, total)


def test_cli_stats(tmp_path, capsys):
    assert trace_main(["stats", str(DATA / "golden_trace.txt")]) == 0
    out = capsys.readouterr().out
    assert "12" in out and "LRU stack distance" in out
    assert trace_main(["stats", str(DATA / "criteo_sample.txt"), "--json", "--table", "C3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in data["tables"]] == ["C3"]
    assert trace_main(["stats", str(tmp_path / "missing.tst")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_shared_stats_are_those_of_the_keys_in_request_order():
    """The shared view: distinct (table, id) keys, and the stack distances of the requests in
    their order across tables, against a literal LRU stack."""
    rng = np.random.default_rng(3)
    tables, ids = rng.integers(0, 3, 500), rng.integers(0, 40, 500)
    trace = Trace.from_requests(tables, ids, ["a", "b", "c"])
    s = shared_stats(trace)
    keys = list(zip(tables.tolist(), ids.tolist()))
    stack, dist = [], []
    for k in keys:
        if k in stack:
            dist.append(stack.index(k))  # rows used since, most recent first
            stack.remove(k)
        stack.insert(0, k)
    assert (s.requests, s.distinct) == (500, len(set(keys)))
    assert s.reuse_log2_hist == log2_buckets(np.array(dist)).tolist()
    per, total = trace_stats(trace)
    assert [p.request_share for p in per] == [np.mean(tables == t) for t in range(3)]
    assert total.distinct == s.distinct  # the same keys; only the order differs
    text = format_stats(per, total, s)
    assert "shared" in text and "(table, id) keys" in text


def test_cli_stats_reports_the_shared_view(capsys):
    argv = ["stats", str(DATA / "shared_trace.csv"), "--table-col", "table"]
    assert trace_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    trace = load_trace(DATA / "shared_trace.csv", table_col="table")
    assert data["shared"] == shared_stats(trace).to_dict()
    assert data["shared"]["distinct"] == 77 + 66 + 50
    shares = [t["request_share"] for t in data["tables"]]
    assert shares == [286 / 900, 432 / 900, 182 / 900]  # item, user, ad: by first appearance
    assert trace_main(argv) == 0
    assert "LRU of 256 rows shared hits  78.56%" in capsys.readouterr().out
