"""bench/bench_soak.py's inference loops (issue 23, "what must hold" 3), short: every loop
leaves no lock, and repeating them grows neither the Python heap nor the process; the command
line writes its figures."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

import tierstore as ts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_soak as bs  # noqa: E402


@pytest.mark.parametrize("tier", [None, "ssd"])
def test_inference_loops_hold_nothing_after_a_round(device, tier, tmp_path):
    """Three rounds of the three loops (40 steps each) after five warm-up rounds: no lock after
    any block, and the Python heap's live objects (tracemalloc, after a collection: a batch,
    queue entry or tensor kept per step would add hundreds of kilobytes) end where the warm-up
    left them, within 64 KiB. What torch keeps settles over the first rounds, less and less
    each round (not per step): with torch's initial rows (no numba, as on the GPU machine) and
    an SSD tier, about 70 KB over the 3 rounds after 2 warm-up rounds, 24 KB over the next 3,
    13 KB over the 12 rounds after 12."""
    ssd = None if tier is None else ts.SSDConfig(tmp_path / "t", host_rows=1_024)
    emb = ts.TieredEmbeddingBag(
        bs.ROWS, bs.DIM, mode="sum", cache=ts.CacheConfig(rows=64, ways=4),
        optimizer=ts.RowWiseAdagrad(lr=0.05), device=device, ssd=ssd,
    )  # fmt: skip
    pool = bs.batches(torch.device(device))
    blocks = iter(range(10**6))

    def rounds(count: int) -> None:
        for _ in range(count):
            for loop in bs.LOOPS:
                bs.run_block(emb, loop, pool, 40 * next(blocks), 40)
                assert emb.store.held_locks() == 0, loop

    rounds(5)  # the warm-up: caches, pools and lazily made state settle
    tracemalloc.start()  # what the next rounds allocate and keep
    try:
        gc.collect()
        before = tracemalloc.take_snapshot()
        rounds(3)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, after.compare_to(before, "lineno")[:5]
    emb.close(flush=False)


def test_the_soak_command_writes_its_figures(tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_soak.py"), "--steps", "150", "--block",
         "50", "--device", "cpu", "--json", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["locks held after a block, most"]["value"] == 0
    assert abs(rows["resident memory growth after the first round"]["value"]) < bs.GROWTH_LIMIT_MIB


def test_the_soak_refuses_a_bad_step_count(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_soak.py", "--steps", "0"])
    with pytest.raises(SystemExit) as exit_:
        bs.main()
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err
