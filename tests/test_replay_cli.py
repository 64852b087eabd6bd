"""``tierstore replay`` end to end on small traces: the table, the CSV, the bounds, the errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tierstore.cli import main
from tierstore.errors import InvalidInputError
from tierstore.replay.engine import replay_engine
from tierstore.trace import write_trace, zipf_trace


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "z.tst"
    write_trace(path, [zipf_trace(20_000, 2_000, 1.0, seed=3)])
    return path


def test_replay_prints_every_policy_and_the_bounds(trace_file, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert (
        main(
            [
                "replay",
                str(trace_file),
                "--cache-rows",
                "5%,20%",
                "--batch",
                "1000",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for name in ("lru (32-way)", "lfu (32-way)", "opt", "fa-lru", "s3fifo", "wtinylfu"):
        assert name in text
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12
    ids = zipf_trace(20_000, 2_000, 1.0, seed=3)
    distinct = np.unique(ids).size
    for r in rows:
        assert float(r["hit_ratio"]) <= float(r["floor_hit_ratio"]) + 1e-12
    by = {(r["policy"], int(r["cache_rows"])): r for r in rows}
    size = int(rows[0]["cache_rows"])
    assert size == int(np.ceil(distinct * 0.05))
    # the engine rows are the engine's own counters
    batches = [ids[a : a + 1000] for a in range(0, ids.size, 1000)]
    want = replay_engine(batches, size, "lru", 32)
    assert int(by[("lru (32-way)", size)]["hits"]) == want.hits
    # OPT beats every fully associative policy at the same size
    for p in ("fa-lru", "s3fifo", "wtinylfu"):
        assert int(by[("opt", size)]["hits"]) >= int(by[(p, size)]["hits"])


def test_two_level_replay_columns(trace_file, capsys):
    assert (
        main(
            [
                "replay",
                str(trace_file),
                "--cache-rows",
                "50",
                "--policies",
                "lru",
                "--host-rows",
                "400",
                "--batch",
                "500",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "l2_hits" in text and "l3_reads" in text


def test_bad_arguments_and_traces(tmp_path, trace_file):
    with pytest.raises(InvalidInputError, match="percentage"):
        main(["replay", str(trace_file), "--cache-rows", "ten"])
    with pytest.raises(InvalidInputError, match="unknown policies"):
        main(["replay", str(trace_file), "--policies", "mru"])
    bad = tmp_path / "bad.tst"
    bad.write_bytes(b"NOTATRACE" + bytes(64))
    with pytest.raises(InvalidInputError, match="bad.tst"):
        main(["replay", str(bad)])
