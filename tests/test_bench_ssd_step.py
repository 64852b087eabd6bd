"""``bench/bench_ssd_step.py`` at a tiny scale on the CPU: every row of both sections is in its
JSON with a finite figure, positive where it is a time, a count or a rate (the writes of dirty
L2 victims to L3 may be none), and the SSD rows read L3 (rows L3 held among them). Figures are
not judged: no timing assertion."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_ssd_step.py"

DLRM_ROWS = ["tables in L2 (no SSD tier), plain loop",
             "tables in L2 (no SSD tier), prefetching(depth=2)",
             "L3 written: every row (write_rows in chunks), flushed"]  # fmt: skip
BIG_ROWS = ["whole table in L2 (no SSD tier), plain loop",
            "whole table in L2 (no SSD tier), prefetching(depth=2)",
            "SSD tier, plain loop", "SSD tier, prefetching(depth=2)",
            "SSD tier, step rate, fastest loop",
            "SSD tier: share of its extra time hidden by prefetching"]  # fmt: skip


def _l3_rows(what: str) -> list[str]:
    return [
        f"{what}, {mode}: {figure}"
        for mode in ("plain", "prefetching")
        for figure in (
            "L3 rows read a step", "of them, rows L3 held", "L3 read time a step", "L3 read rate",
            "L3 rows written a step", "L3 write time a step",
        )
    ]  # fmt: skip


def test_bench_ssd_step_gives_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--scale", "0.002", "--torch-threads", "1",
           "--dir", str(tmp_path), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    dlrm = {r["name"]: r for r in results if r["section"].startswith("DLRM")}
    big = {r["name"]: r for r in results if not r["section"].startswith("DLRM")}
    expected_dlrm = list(DLRM_ROWS)
    for share in ("50%", "20%"):
        what = f"SSD tier, L2 = {share}"
        expected_dlrm += [f"{what}, plain loop", f"{what}, prefetching(depth=2)",
                          f"{what} / no SSD tier, fastest loop each",
                          f"{what}: share of its extra time hidden by prefetching",
                          *_l3_rows(what)]  # fmt: skip
    expected_big = BIG_ROWS + _l3_rows("SSD tier")
    assert sorted(dlrm) == sorted(expected_dlrm)
    assert sorted(big) == sorted(expected_big)
    for row in results:
        value = row["value"]
        if "L3 rows written" in row["name"] or "L3 write time" in row["name"]:
            assert math.isfinite(value) and value >= 0, row  # dirty L2 victims: maybe none
        elif row["unit"] == "share":  # 1 - a ratio of differences of noisy times: any value,
            assert isinstance(value, float), row  # NaN where the SSD tier cost no time
        else:
            assert math.isfinite(value) and value > 0, row
    # every row of the DLRM tables was written first: every L3 read finds its row (prefetching
    # also reads rows ahead, some of which are read again or found in L2 by their step)
    for share in ("50%", "20%"):
        for mode in ("plain", "prefetching"):
            what = f"SSD tier, L2 = {share}, {mode}"
            held = dlrm[f"{what}: of them, rows L3 held"]["value"]
            read = dlrm[f"{what}: L3 rows read a step"]["value"]
            if mode == "plain":
                assert held == pytest.approx(read)
            else:
                assert held >= 0.9 * read
    # the big table's L3 starts empty; by the timed steps, some of its reads find rows
    for mode in ("plain", "prefetching"):
        held = big[f"SSD tier, {mode}: of them, rows L3 held"]["value"]
        assert 0 < held < big[f"SSD tier, {mode}: L3 rows read a step"]["value"]
    assert done.stdout.count("losses equal to the no-SSD run's at every step: yes") == 2
    assert not list(tmp_path.glob("bench_ssd_step.*")), "the tables' directory is left behind"


def test_fill_l2_leaves_l2_full_and_dirty_and_every_value_as_it_was(tmp_path, monkeypatch):
    """``fill_l2`` (what each DLRM SSD run does before its warm-up): L2 ends full of rows that
    are dirty there or in L1 (so every later L2 miss writes a victim to L3), and no row's value
    changed (the runs' losses must still equal the run without an SSD tier's)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_ssd_step as bs
    import torch

    import tierstore as ts
    from tierstore.cache import EMPTY

    run = bs.Run(torch.device("cpu"), 1.0, True, tmp_path)
    rows, l2_rows = 3000, 1000
    table = ts.TieredEmbeddingBag(rows, 8, mode="sum", cache=ts.CacheConfig(rows=100),
                                  ssd=run.ssd("t", l2_rows), optimizer=ts.SGD(lr=0.5))  # fmt: skip
    every = torch.arange(rows)
    table.write_rows(every, torch.randn(rows, 8))
    table.flush()
    before = table.read_rows(every)
    assert int((table.store.host.cache.tags != EMPTY).sum()) == 0  # written rows go to L3
    bs.fill_l2(run, [table], l2_rows)
    host, l1 = table.store.host.cache, table.store.l1
    held = host.tags[host.tags != EMPTY]
    dirty = set(host.tags[host.dirty].tolist()) | set(l1.tags[l1.dirty].tolist())
    assert held.numel() >= 0.9 * l2_rows  # full but for set conflicts
    assert set(held.tolist()) <= dirty
    assert torch.equal(table.read_rows(every), before)
    table.close(flush=True)
