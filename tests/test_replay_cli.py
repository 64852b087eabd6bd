"""``tierstore replay`` end to end on small traces: the table, the CSV, the bounds, the sizes it
reports, the batched labels, Criteo input and the metric names it shares with ``run``."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from tierstore.cli import main
from tierstore.job import COLUMNS as RUN_COLUMNS
from tierstore.replay import bounds, shared, sweep
from tierstore.replay.engine import replay_engine
from tierstore.stats import CacheStats
from tierstore.trace import write_trace, zipf_trace
from tierstore.trace.base import Trace

DATA = Path(__file__).parent / "data"


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "z.tst"
    write_trace(path, [zipf_trace(20_000, 2_000, 1.0, seed=3)])
    return path


def replay_csv(tmp_path, *argv) -> list[dict]:
    out = tmp_path / "r.csv"
    assert main(["replay", *map(str, argv), "--csv", str(out)]) == 0
    return list(csv.DictReader(open(out)))


def test_replay_prints_every_policy_and_the_bounds(trace_file, tmp_path, capsys):
    rows = replay_csv(tmp_path, trace_file, "--cache-rows", "5%,20%", "--batch", "1000")
    text = capsys.readouterr().out
    for name in ("lru (32-way, batched 1000)", "lfu (32-way, batched 1000)", "opt", "fa-lru",
                 "s3fifo", "wtinylfu", "batched: an id repeated inside a batch"):  # fmt: skip
        assert name in text
    assert len(rows) == 12
    ids = zipf_trace(20_000, 2_000, 1.0, seed=3)
    distinct = np.unique(ids).size
    for r in rows:
        assert float(r["hit_ratio"]) <= float(r["floor_hit_ratio"]) + 1e-12
    by = {(r["policy"], int(r["asked_rows"])): r for r in rows}
    size = int(rows[0]["asked_rows"])
    assert size == math.floor(distinct * 0.05)  # percentages round down, as libCacheSim
    # the engine rows are the engine's own counters
    batches = [ids[a : a + 1000] for a in range(0, ids.size, 1000)]
    want = replay_engine(batches, size, "lru", 32)
    got = by[("lru (32-way, batched 1000)", size)]
    assert (int(got["hits"]), int(got["cache_rows"])) == (want.hits, want.cache_rows)
    assert int(got["batch"]) == 1000 and int(by[("opt", size)]["batch"]) == 1
    # OPT beats every fully associative policy at the same size
    for p in ("fa-lru", "s3fifo", "wtinylfu"):
        assert int(by[("opt", size)]["hits"]) >= int(by[(p, size)]["hits"])


def test_reported_rows_are_the_rows_held(trace_file, tmp_path, capsys):
    """97 rows asked of a 32-way cache: 4 sets, 128 rows held and reported; a fully
    associative cache (ways >= rows, any ways now) holds exactly what was asked and, at batch
    1, hits exactly as fully associative LRU."""
    rows = replay_csv(tmp_path, trace_file, "--cache-rows", "97", "--batch", "1",
                      "--policies", "lru,fa-lru")  # fmt: skip
    by = {r["policy"]: r for r in rows}
    assert (int(by["lru (32-way)"]["asked_rows"]), int(by["lru (32-way)"]["cache_rows"])) == (
        97,
        128,
    )
    wide = replay_csv(tmp_path, trace_file, "--cache-rows", "97", "--batch", "1",
                      "--policies", "lru,fa-lru", "--ways", "128")  # fmt: skip
    wide_by = {r["policy"]: r for r in wide}
    lru = wide_by["lru (128-way)"]
    assert int(lru["cache_rows"]) == 97
    assert lru["hits"] == wide_by["fa-lru"]["hits"]
    assert lru["hit_ratio"] == wide_by["fa-lru"]["hit_ratio"]


def test_percentages_round_down_and_never_to_zero():
    assert sweep.parse_sizes("1%,50%,100%", 199) == [1, 99, 199]
    assert sweep.parse_sizes("0.1%", 50) == [1]
    assert sweep.parse_sizes("10,5%", 1000) == [10, 50]


def test_batch_1_rows_are_labelled_per_request(trace_file, tmp_path, capsys):
    rows = replay_csv(tmp_path, trace_file, "--cache-rows", "200", "--batch", "1",
                      "--policies", "lru,lfu,opt")  # fmt: skip
    assert [r["policy"] for r in rows] == ["lru (32-way)", "lfu (32-way)", "opt"]
    assert {r["batch"] for r in rows} == {"1"}
    # per request: every request is a lookup, and the engine's LRU can't beat OPT
    assert all(r["requested"] == r["unique"] == "20000" for r in rows)
    assert int(rows[0]["hits"]) <= int(rows[2]["hits"])


def test_every_timed_replay_follows_a_warm_up(monkeypatch, trace_file):
    """req_per_s excludes compilation: the first engine replay of each policy is untimed."""
    calls = []
    real = sweep._replay_engine_policy

    def spy(ids, size, policy, **kw):
        calls.append((policy, kw["desc"]))
        return real(ids, size, policy, **kw)

    monkeypatch.setattr(sweep, "_replay_engine_policy", spy)
    ids = zipf_trace(5000, 500, 1.0, seed=1)
    sweep.replay_table(ids, [10, 20], ["lru", "lfu"], batch=100)
    assert [d == "warm-up" for _, d in calls] == [True, False, False] * 2


@pytest.mark.parametrize("multi_table", [False, True])
def test_opt_loop_runs_first_in_the_warm_up(monkeypatch, multi_table):
    """OPT's greedy loop (compiled on first use) first runs untimed, in the warm-up, even where
    the first few thousand ids fit in the smallest cache (and OPT needs no loop for them)."""
    events = []
    greedy, hits = bounds._best_fit, sweep.reference_hits

    def spy_greedy(*args):
        events.append("greedy")
        return greedy(*args)

    def spy_hits(name, ids, *args, **kw):
        events.append(len(ids))
        return hits(name, ids, *args, **kw)

    monkeypatch.setattr(bounds, "_best_fit", spy_greedy)
    for module in (sweep, shared):  # the warm-up's call, and the timed one's
        monkeypatch.setattr(module, "reference_hits", spy_hits)
    rng = np.random.default_rng(4)
    ids = np.concatenate([rng.integers(0, 100, 5000), rng.integers(0, 3000, 5000)])
    if multi_table:
        trace = Trace.from_requests(np.arange(ids.size) % 2, ids, ["a", "b"])
        shared.replay_shared(trace, [500], ["opt"])
    else:
        sweep.replay_table(ids, [500], ["opt"])
    warm_up = events.index(4096)
    assert events.index("greedy") == warm_up + 1 and events[warm_up + 2] == ids.size


def test_two_level_replay_columns(trace_file, capsys):
    argv = ["replay", str(trace_file), "--cache-rows", "50", "--policies", "lru",
            "--host-rows", "400", "--batch", "500"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "l2_hits" in text and "l3_reads" in text


def test_one_name_per_metric_across_run_replay_and_stats():
    for name in ("hit_ratio", "unique_hit_ratio", "cache_rows", "req_per_s"):
        assert name in RUN_COLUMNS and name in sweep.COLUMNS
    assert "conflict_misses" in RUN_COLUMNS
    s = CacheStats(requested=10, unique=4, hits=1, misses=3)
    assert (s.hit_ratio, s.unique_hit_ratio) == (0.7, 0.25)
    for field in ("requested", "unique", "hits", "misses"):
        assert field in sweep.COLUMNS and hasattr(s, field)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert (s.hit_rate, s.request_hit_rate) == (0.25, 0.7)  # the old names, deprecated
    assert [w.category for w in seen] == [DeprecationWarning] * 2


def test_criteo_rows_with_stripped_trailing_fields(tmp_path, capsys):
    """Some copies of the Criteo dataset cut a row's trailing empty fields: read as missing."""
    good = (DATA / "criteo_sample.txt").read_text().splitlines()
    stripped = [line.rstrip("\t") for line in good]
    cut = good[0].split("\t")[:20]  # C7 onwards missing
    lines = stripped + ["\t".join(cut)]
    assert any(len(line.split("\t")) < 40 for line in lines)
    path = tmp_path / "day.txt"
    path.write_text("\n".join(lines) + "\n")
    rows = replay_csv(tmp_path, path, "--format", "criteo", "--table", "C1",
                      "--cache-rows", "2", "--policies", "opt", "--batch", "1")  # fmt: skip
    want = [int(line.split("\t")[14], 16) for line in lines if line.split("\t")[14:15] != [""]]
    assert int(rows[0]["requested"]) == len(want)
