"""The batch-1 replay loop (``replay/single.py``) against the cache step it shortcuts, and caches
wider than 64 ways: the compiled step against the torch step, and a fully associative cache
against a brute-force LRU."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore import cache as cache_module
from tierstore.cache import SetAssociativeCache
from tierstore.cache_compiled import CompiledCache
from tierstore.policy import FrequencySketch
from tierstore.replay import lru_hits
from tierstore.replay.engine import replay_engine
from tierstore.replay.single import replay_requests, step_each

STATE = ("tags", "stamps", "locks", "dirty", "counters")


def twins(rows, ways, policy, bound, sample):
    caches = [CompiledCache(rows, ways, policy, id_bound=bound) for _ in range(2)]
    if sample is not None and policy == "lfu":  # a small sketch that halves often
        for c in caches:
            c.sketch = FrequencySketch(64, sample)
    return caches


def assert_same(a: SetAssociativeCache, b: SetAssociativeCache):
    for name in STATE:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.step == b.step
    if a.sketch is not None:
        assert torch.equal(a.sketch.counters, b.sketch.counters)
        assert torch.equal(a.sketch.additions, b.sketch.additions)
    if a._slot_of is not None:
        assert torch.equal(a._slot_of, b._slot_of)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (7, 7), (40, 7), (64, 4), (300, 32), (200, 100), (150, 150)]),
    policy=st.sampled_from(["lru", "lfu"]),
    indexed=st.booleans(),
    sample=st.sampled_from([None, 7, 50]),
    seed=st.integers(0, 2**32 - 1),
)
def test_step_each_equals_lookup_and_release_per_id(shape, policy, indexed, sample, seed):
    rng = np.random.default_rng(seed)
    universe = 600
    ids = (rng.zipf(1.2, 400) - 1) % universe
    a, b = twins(*shape, policy, universe if indexed else None, sample)
    dirty = torch.from_numpy(rng.integers(0, a.capacity, 5))
    for i, x in enumerate(ids.tolist()):  # the reference: a batch of one id, then its release
        found = a.lookup(torch.tensor([x]), torch.tensor([1]))
        a.release(found.slots)
        if i == 100:
            a.mark_dirty(dirty)  # dirty victims are written back: counted
    step_each(b, ids[:101])
    b.mark_dirty(dirty)
    step_each(b, ids[101:])
    assert_same(a, b)


def test_step_each_refuses_ids_beyond_the_bound_before_any_change():
    cache = SetAssociativeCache(8, 2, "lfu", id_bound=10)
    before = cache.counters.clone()
    with pytest.raises(IndexError):
        step_each(cache, np.array([1, 2, 10]))
    assert torch.equal(cache.counters, before) and cache.step == 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("rows, ways, num_rows", [(50, 8, None), (50, 8, 3000), (200, 256, 3000)])
def test_replay_requests_equals_the_batched_replay_at_batch_1(policy, rows, ways, num_rows):
    rng = np.random.default_rng(rows + ways)
    ids = (rng.zipf(1.1, 1500) - 1) % 3000
    want = replay_engine([ids[i : i + 1] for i in range(ids.size)], rows, policy, ways)
    got = replay_requests(ids, rows, policy, ways, num_rows=num_rows)
    fields = ("requests", "unique", "hits", "misses", "conflicts", "evictions", "cache_rows")
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    assert got.hit_ratio == got.unique_hit_ratio == pytest.approx(1 - got.misses / ids.size)


def brute_force_lru_hits(ids, size: int) -> int:
    """A fully associative LRU cache of ``size`` rows, request by request."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for x in ids.tolist():
        if x in cache:
            hits += 1
            cache.move_to_end(x)
        else:
            cache[x] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits


@pytest.mark.parametrize("size", [1, 5, 97, 130])
def test_a_fully_associative_engine_cache_at_batch_1_is_exact_lru(size):
    rng = np.random.default_rng(size)
    ids = (rng.zipf(1.05, 4000) - 1) % 1000
    want = brute_force_lru_hits(ids, size)
    r = replay_requests(ids, size, "lru", ways=size, num_rows=1000)
    assert (r.cache_rows, r.hits) == (size, want)
    assert int(lru_hits(ids, [size], show=False)[0]) == want


@pytest.mark.parametrize("rows, ways, policy, bound", [
    (300, 300, "lru", None), (1000, 128, "lfu", 5000), (130, 65, "lfu", None),
    (500, 100, "lru", 5000),
])  # fmt: skip
def test_wide_sets_compiled_step_equals_torch_step(rows, ways, policy, bound):
    """Batches (many misses a set) through caches of more than 64 ways, some locks held."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(rows)
    a, b = twins(rows, ways, policy, bound, None)
    assert a.ways == min(ways, rows)
    for k in range(25):
        ids = (rng.zipf(1.1, rng.integers(1, 400)) - 1) % 5000
        uniq, counts = torch.unique(torch.from_numpy(ids), return_counts=True)
        cache_module.COMPILED_STEP = False
        try:
            want = a.lookup(uniq, counts)
        finally:
            cache_module.COMPILED_STEP = True
        got = b.lookup(uniq, counts)
        for f in ("slots", "fill_index", "fill_slots", "victim_ids", "hit"):
            assert torch.equal(getattr(want, f), getattr(got, f)), (k, f)
        assert_same(a, b)
        if k % 3:  # every third batch stays locked: conflict misses later
            cache_module.COMPILED_STEP = False
            try:
                a.release(want.slots)
            finally:
                cache_module.COMPILED_STEP = True
            b.release(got.slots)


@pytest.mark.gpu
def test_cuda_cache_refuses_more_than_64_ways():
    from tierstore import cuda
    from tierstore.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="64 ways"):
        cuda.new_cache(1000, 128, "lru", "cuda")
    assert cuda.new_cache(100, 64, "lru", "cuda").ways == 64
