"""The vectorised cache step against the brute-force model, counter for counter."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch
from cache_model import ModelCache
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore import cache as cache_module
from tierstore import compiled
from tierstore import stats as S
from tierstore.cache import EMPTY, SetAssociativeCache, cache_shape
from tierstore.cache_compiled import CompiledCache
from tierstore.errors import CapacityError, InvalidInputError
from tierstore.policy import FrequencySketch


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def cache_step(request, monkeypatch):
    """Every test here runs on both CPU steps: the compiled twin (where numba is installed) and
    the torch specification, each against the brute-force model."""
    if request.param == "torch":
        monkeypatch.setattr(cache_module, "COMPILED_STEP", False)
    elif not compiled.COMPILED:
        pytest.skip("numba is not installed")
    return request.param


def make_pair(rows, ways, policy, device="cpu", sample=40, id_bound=None):
    cache = CompiledCache(rows, ways, policy, device, id_bound=id_bound)  # per cache_step
    width = 64
    if policy == "lfu":  # a small sketch that halves often, so aging is exercised
        cache.sketch = FrequencySketch(width, sample, device)
    return cache, ModelCache(cache.sets, cache.ways, policy, width, sample)


def assert_same_state(cache: SetAssociativeCache, model: ModelCache):
    tags = [[None if t == EMPTY else t for t in row] for row in cache.tags.tolist()]
    assert tags == model.tags
    assert cache.stamps.tolist() == model.stamps
    assert cache.dirty.tolist() == model.dirty
    assert cache.locks.tolist() == model.locks
    c = cache.counters.tolist()
    m = model.c
    assert c[S.REQUESTS] == m["requests"] and c[S.UNIQUE] == m["unique"]
    assert c[S.HITS] == m["hits"] and c[S.MISSES] == m["misses"]
    assert c[S.CONFLICTS] == m["conflicts"] and c[S.EVICTIONS] == m["evictions"]
    assert c[S.WRITEBACKS] == m["writebacks"]


def run_trace(cache, model, batches, in_flight, rng, device="cpu"):
    """Replays ``batches`` through both, keeping up to ``in_flight`` batches locked and marking
    random rows dirty, and compares every slot and the whole state after each step."""
    pending = deque()
    for batch in batches:
        ids_t = torch.tensor(batch, dtype=torch.int64, device=device)
        uniq, counts = torch.unique(ids_t, return_counts=True)
        got = cache.lookup(uniq, counts)
        want = model.access(batch)
        assert dict(zip(uniq.tolist(), got.slots.tolist())) == want
        placed = [s for s in want.values() if s >= 0]
        dirty = rng.sample(placed, k=len(placed) // 2)
        cache.mark_dirty(torch.tensor(dirty, dtype=torch.int64, device=device))
        for s in dirty:
            model.mark_dirty(s)
        pending.append((got.slots, want))
        while len(pending) > in_flight:
            slots, w = pending.popleft()
            cache.release(slots)
            model.release(w)
        assert_same_state(cache, model)


traces = st.lists(st.lists(st.integers(0, 80), min_size=1, max_size=40), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 48),
    ways=st.integers(1, 8),
    policy=st.sampled_from(["lru", "lfu"]),
    batches=traces,
    in_flight=st.integers(0, 2),
    seed=st.integers(0, 2**32),
    indexed=st.booleans(),
)
def test_cache_matches_brute_force_model(rows, ways, policy, batches, in_flight, seed, indexed):
    """``indexed``: the cache also keeps a slot per id (the replay's find); same decisions."""
    cache, model = make_pair(rows, ways, policy, id_bound=81 if indexed else None)
    run_trace(cache, model, batches, in_flight, random.Random(seed))
    if indexed:  # the index agrees with the tags
        where = {t: slot for slot, t in enumerate(cache.tags.view(-1).tolist()) if t != EMPTY}
        assert cache.find(torch.arange(81)).tolist() == [where.get(i, -1) for i in range(81)]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_matches_model_on_zipf_trace_with_conflicts(policy):
    """A longer skewed trace over a small 4-way cache, with batches held in flight."""
    gen = torch.Generator().manual_seed(7)
    w = 1.0 / torch.arange(1, 501, dtype=torch.float64) ** 1.1
    batches = [
        torch.multinomial(w, 60, replacement=True, generator=gen).tolist() for _ in range(40)
    ]
    # hashed-looking ids: spread over int64, negative ones included
    ids = (torch.randperm(500, generator=gen) * 0x9E3779B97F4A7C1 - 7).tolist()
    batches = [[ids[i] for i in b] for b in batches]
    cache, model = make_pair(40, 4, policy)
    run_trace(cache, model, batches, in_flight=2, rng=random.Random(1))
    c = cache.counters.tolist()
    assert c[S.CONFLICTS] > 0 and c[S.EVICTIONS] > 0 and c[S.WRITEBACKS] > 0


@pytest.mark.parametrize("jump", [1 << 20, 1 << 40])
def test_lru_scores_far_apart_order_victims_the_same(jump):
    """Steps that jump far apart: score ranges past 2**25 take the 64-bit victim sort, smaller
    ones the 32-bit one; the model decides both the same way."""
    rng = random.Random(jump)
    batches = [[rng.randrange(60) for _ in range(25)] for _ in range(12)]
    cache, model = make_pair(24, 4, "lru")
    pending = deque()
    for k, batch in enumerate(batches):
        if k % 3 == 2:  # a long pause: the older half of the scores are far below the new ones
            cache.step += jump
            model.step += jump
        uniq, counts = torch.unique(torch.tensor(batch), return_counts=True)
        got = cache.lookup(uniq, counts)
        assert dict(zip(uniq.tolist(), got.slots.tolist())) == model.access(batch)
        pending.append(got.slots)
        if len(pending) > 1:
            slots = pending.popleft()
            cache.release(slots)
            model.release({i: s for i, s in enumerate(slots.tolist())})
        assert_same_state(cache, model)


def test_strict_lookup_raises_before_any_change():
    cache = CompiledCache(4, 4, "lru")  # per cache_step: a compiled step, then strict ones
    first = cache.lookup(torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int64))
    before = [t.clone() for t in (cache.tags, cache.stamps, cache.locks, cache.counters)]
    with pytest.raises(CapacityError, match="unique rows"):
        cache.lookup(torch.tensor([5, 6]), torch.ones(2, dtype=torch.int64), strict=True)
    for a, b in zip(before, (cache.tags, cache.stamps, cache.locks, cache.counters)):
        assert torch.equal(a, b)
    assert cache.step == 1
    cache.release(first.slots)
    cache.lookup(torch.tensor([5, 6]), torch.ones(2, dtype=torch.int64), strict=True)


def test_cache_shape():
    assert cache_shape(1, 32) == (1, 1)
    assert cache_shape(100, 32) == (4, 32)
    with pytest.raises(InvalidInputError):
        cache_shape(0, 32)
    with pytest.raises(InvalidInputError):
        cache_shape(10, 0)
