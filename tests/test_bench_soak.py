"""bench/bench_soak.py's inference loops (issue 23, "what must hold" 3), short: every loop
leaves no lock, and repeating them grows neither the Python heap nor the process; the command
line writes its figures."""

from __future__ import annotations

import collections
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


def _live_objects_by_type() -> collections.Counter:
    """How many objects the garbage collector tracks, by type name, after a collection: every
    tensor, batch, list and queue entry (not ints, strings or bytes)."""
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


@pytest.mark.parametrize("tier", [None, "ssd"])
def test_inference_loops_hold_nothing_after_a_round(device, tier, tmp_path):
    """After five warm-up rounds of the three loops (40 steps each), six more: no lock after any
    block; over the first three (360 steps), no type of object the garbage collector sees
    (tensors, batches, lists, queue entries) grows by 100 or more (one tensor kept per lookup
    adds 120); over the last three, the Python heap (tracemalloc, which also sees ints, strings
    and bytes) grows by less than 160 KiB, about 450 B a step. Without a leak no tracked type
    grows after the warm-up but for a few dozen objects made once (lazy state, the SSD tier's
    worker threads), while the heap moves by what torch keeps as it settles (on the GPU machine,
    torch's initial rows and an SSD tier: 103 KB over 3 rounds after 2 warm-up rounds, 84 KB
    after 5); so the object count is the tight check and the heap the loose one."""
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
    objects_before = _live_objects_by_type()
    rounds(3)
    grown_types = _live_objects_by_type() - objects_before
    assert not {name: n for name, n in grown_types.items() if n >= 100}, grown_types
    tracemalloc.start()  # what the next rounds allocate and keep
    try:
        gc.collect()
        heap_before = tracemalloc.take_snapshot()
        rounds(3)
        gc.collect()
        heap_after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in heap_after.compare_to(heap_before, "filename"))
    assert grown < 160 * 1024, heap_after.compare_to(heap_before, "lineno")[:5]
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
