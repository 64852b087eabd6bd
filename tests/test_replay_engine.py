"""The replayed set-associative LRU/LFU equals the engine's own stats(), counter for counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import cache as cache_module
from tierstore import cache_compiled
from tierstore.replay import engine
from tierstore.replay.engine import replay_engine


def trace(seed, steps=30, n=96, rows=500):
    gen = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.0
    return [torch.multinomial(w, n, replacement=True, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("cache_rows, ways", [(1, 32), (20, 4), (64, 32), (500, 8)])
def test_replay_equals_engine_stats(device, policy, cache_rows, ways):
    batches = trace(cache_rows + ways)
    emb = ts.TieredEmbeddingBag(
        500,
        4,
        cache=ts.CacheConfig(rows=cache_rows, ways=ways, policy=policy),
        device=device,
        optimizer=ts.SGD(0.1),
    )
    for ids in batches:
        emb(ids.to(device), torch.tensor([0], device=device)).sum().backward()
    s = emb.stats()
    r = replay_engine(batches, cache_rows, policy, ways, device=device)
    assert (r.requests, r.unique, r.hits, r.misses, r.conflicts, r.evictions) == (
        s.requested,
        s.unique,
        s.hits,
        s.misses,
        s.conflict_misses,
        s.evictions,
    )
    assert r.hits > 0 and (r.evictions > 0 or r.conflicts > 0 or cache_rows == 500)
    # ids known to lie below num_rows (the CPU cache keeps a slot index per id, the CUDA
    # unique step sorts 32-bit keys): the same counts
    narrow = replay_engine(batches, cache_rows, policy, ways, device=device, num_rows=500)
    assert (narrow.requests, narrow.hits, narrow.evictions) == (r.requests, r.hits, r.evictions)


def test_two_level_replay_attributes_every_miss(tmp_path):
    batches = trace(3)
    r = replay_engine(batches, 20, "lru", 4, host_rows=128)
    assert r.l2_hits + r.l3_reads == r.misses
    emb = ts.TieredEmbeddingBag(
        500,
        4,
        cache=ts.CacheConfig(rows=20, ways=4),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=128),
        optimizer=None,
    )
    for ids in batches:
        emb(ids, torch.tensor([0]))
    s = emb.stats()
    assert (r.hits, r.misses) == (s.hits, s.misses)
    assert r.l3_reads == s.l2_misses


COUNTS = ("requests", "unique", "hits", "misses", "conflicts", "evictions")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("num_rows", [None, 500])
def test_replay_on_two_threads_equals_the_torch_step(monkeypatch, policy, num_rows):
    """The CPU replay scores each batch (unique step, sketch) on a worker thread one batch
    ahead of the rest of its step: the same counts as the torch step batch after batch, over
    enough batches that the sketch halves several times."""
    pytest.importorskip("numba")
    batches = trace(7, steps=80)
    placed = []
    place = cache_compiled.CompiledCache.place

    def counted_place(*args):
        placed.append(1)
        return place(*args)

    monkeypatch.setattr(cache_compiled.CompiledCache, "place", counted_place)
    monkeypatch.setattr(engine, "_cores", lambda: 2)  # whatever this machine has
    ahead = replay_engine(batches, 64, policy, 8, num_rows=num_rows)
    assert len(placed) == len(batches) - 1  # all but the first, which compiles the step
    monkeypatch.setattr(cache_module, "COMPILED_STEP", False)
    serial = replay_engine(batches, 64, policy, 8, num_rows=num_rows)
    assert [getattr(ahead, k) for k in COUNTS] == [getattr(serial, k) for k in COUNTS]
    assert ahead.evictions > 0


def test_an_id_beyond_num_rows_stops_the_replay(monkeypatch):
    monkeypatch.setattr(engine, "_cores", lambda: 2)
    batches = trace(8, steps=6)
    batches[4] = batches[4] + 500
    with pytest.raises(IndexError):
        replay_engine(batches, 64, "lfu", 8, num_rows=500)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 1000])
def test_unique_counts_as_numpy(narrow, n):
    ids = np.random.default_rng(n).zipf(1.2, n) % 300 + (0 if narrow else (1 << 40))
    uniq, counts = engine._unique(ids.astype(np.int64), narrow)
    want_uniq, want_counts = np.unique(ids, return_counts=True)
    assert uniq.dtype == np.int64 and counts.dtype == np.int64
    assert np.array_equal(uniq, want_uniq) and np.array_equal(counts, want_counts)


@pytest.mark.parametrize("num_rows", [500, 100_000])
def test_replay_with_an_id_bound_counts_the_same(device, num_rows):
    """Told the ids' bound (on the GPU: a histogram unique step where the bound is at most 32
    times a batch's length, here 500, else the sort), the replay counts what it counts without."""
    batches = trace(9, steps=40)
    bounded = replay_engine(batches, 64, "lfu", 8, device=device, num_rows=num_rows)
    reference = replay_engine(batches, 64, "lfu", 8, device="cpu")
    assert [getattr(bounded, k) for k in COUNTS] == [getattr(reference, k) for k in COUNTS]


@pytest.mark.parametrize("num_rows", [500, 100_000])
def test_an_id_beyond_the_bound_raises(device, num_rows):
    batches = trace(8, steps=6)
    batches[4] = batches[4] + num_rows
    with pytest.raises(IndexError, match=r"ids must lie in \[0, "):
        replay_engine(batches, 64, "lru", 8, device=device, num_rows=num_rows)
