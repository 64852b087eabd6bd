"""Synthetic traces: seeded, the right popularity law, hot ids shuffled, drift and scans."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.errors import InvalidInputError
from tierstore.trace.cli import main as trace_main
from tierstore.trace.formats import load_trace
from tierstore.trace.generate import (
    drift_trace,
    generate_trace,
    permute,
    scan_mix_trace,
    zipf_ranks,
    zipf_trace,
)


@pytest.mark.parametrize("universe", [1, 2, 3, 7, 64, 1000, 12345])
def test_permute_is_a_bijection(universe):
    p = permute(np.arange(universe), universe, key=99)
    assert np.array_equal(np.sort(p), np.arange(universe))
    assert np.array_equal(p, permute(np.arange(universe), universe, key=99))
    if universe > 10:
        assert not np.array_equal(p, permute(np.arange(universe), universe, key=100))


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0, 1.2, 2.5])
def test_zipf_ranks_follow_the_law(alpha):
    n, universe = 400_000, 30
    ranks = zipf_ranks(np.random.default_rng(4), n, universe, alpha)
    assert ranks.min() >= 0 and ranks.max() < universe
    p = np.arange(1, universe + 1, dtype=float) ** -alpha
    p /= p.sum()
    freq = np.bincount(ranks, minlength=universe) / n
    # within 5 standard errors in every bin
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all()


def test_zipf_is_seeded_and_its_hot_ids_are_not_the_small_ones():
    a = zipf_trace(200_000, 100_000, 1.0, seed=1)
    assert np.array_equal(a, zipf_trace(200_000, 100_000, 1.0, seed=1))
    assert not np.array_equal(a, zipf_trace(200_000, 100_000, 1.0, seed=2))
    assert a.min() >= 0 and a.max() < 100_000
    ids, counts = np.unique(a, return_counts=True)
    hot = ids[np.argsort(counts)[::-1][:100]]
    assert 20_000 < hot.mean() < 80_000  # spread over the id space, not 0..99


def test_skew_grows_with_alpha():
    def top_share(alpha):
        c = np.unique(zipf_trace(100_000, 10_000, alpha, seed=0), return_counts=True)[1]
        return np.sort(c)[::-1][:100].sum() / 100_000

    assert top_share(0.8) < top_share(1.0) < top_share(1.2)


def test_drift_moves_the_hot_set():
    n = 200_000
    d = drift_trace(n, 50_000, 1.2, period=10_000, step=500, seed=3)

    def hot(part):
        ids, counts = np.unique(part, return_counts=True)
        return set(ids[np.argsort(counts)[::-1][:20]].tolist())

    assert len(hot(d[: n // 10]) & hot(d[-n // 10 :])) == 0
    still = drift_trace(n, 50_000, 1.2, period=10_000, step=0, seed=3)
    assert len(hot(still[: n // 10]) & hot(still[-n // 10 :])) >= 15


def test_scan_mix_inserts_runs_of_consecutive_ids():
    n, length = 50_000, 1000
    s = scan_mix_trace(n, 1_000_000, 1.0, scan_fraction=0.2, scan_length=length, seed=5)
    assert s.size == n
    steps = np.diff(s) == 1
    # the scans contribute ~ 0.2 n consecutive steps; Zipf alone almost none
    assert 0.19 * n <= np.count_nonzero(steps) <= 0.21 * n
    assert np.array_equal(
        s, scan_mix_trace(n, 1_000_000, 1.0, scan_fraction=0.2, scan_length=length, seed=5)
    )
    assert scan_mix_trace(100, 50, 1.0, scan_fraction=0.0, seed=1).size == 100


def test_generate_tables_and_errors():
    t = generate_trace("zipf", 1000, 100, 1.0, seed=5, tables=3)
    assert t.names == ["t0", "t1", "t2"]
    assert all(x.size == 1000 for x in t.tables)
    assert not np.array_equal(t.tables[0], t.tables[1])
    with pytest.raises(InvalidInputError, match="unknown trace kind"):
        generate_trace("pareto", 10, 10)
    with pytest.raises(InvalidInputError, match="alpha"):
        zipf_trace(10, 10, -1.0)
    with pytest.raises(InvalidInputError, match="universe"):
        zipf_trace(10, 0)


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "g.tst.zst"
    assert (
        trace_main(
            [
                "generate",
                str(out),
                "--kind",
                "scan-mix",
                "--requests",
                "5000",
                "--universe",
                "2000",
                "--alpha",
                "0.9",
                "--seed",
                "7",
                "--tables",
                "2",
                "--scan-fraction",
                "0.1",
                "--scan-length",
                "100",
            ]
        )
        == 0
    )
    t = load_trace(out)
    assert [x.size for x in t.tables] == [5000, 5000]
    assert "10000 ids" in capsys.readouterr().out
