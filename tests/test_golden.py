"""Golden hit and miss counts of the engine's LRU and LFU on a small checked-in trace, and the
invariants that every replay checks at its end.

The trace, ``tests/data/engine_trace.txt``, is 64 batches of 64 row ids (Zipf(1.1) ranks over
3 000 rows, scattered by a random permutation), made once by::

    python -c "import numpy as np; rng = np.random.default_rng(26); z = rng.zipf(1.1, 40000) - 1;
    ids = rng.permutation(3000)[z[z < 3000][:4096]];
    np.savetxt('tests/data/engine_trace.txt', ids.reshape(64, 64), fmt='%d')"

(on one line; the file's header comment was added after). ``GOLDEN`` holds the counts that the
brute-force model of ``tests/cache_model.py`` gives on it, one id at a time, each batch
released before the next, as a replay does: written down once as literals, so that a change of
the engine's decisions (or of the model) fails here with the counts that moved.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_model import ModelCache

from tierstore import cache as cache_module
from tierstore import compiled
from tierstore.cache import EMPTY, SetAssociativeCache
from tierstore.errors import InternalError
from tierstore.replay import engine
from tierstore.replay.engine import EngineResult, replay_engine
from tierstore.replay.invariants import check_replay

TRACE = Path(__file__).parent / "data" / "engine_trace.txt"
NUM_ROWS = 3000  # every id of the trace is below it

# (policy, cache_rows, ways): (requests, unique, hits, misses, conflict misses, evictions),
# counted as CacheStats counts them (per unique id of a batch). From 1 row (ways clamped to
# rows) where nearly every miss is a conflict, to 1 024 rows where only a few sets overflow.
GOLDEN = {
    ("lru", 1, 32): (4096, 2621, 41, 2580, 2557, 22),
    ("lru", 16, 4): (4096, 2621, 342, 2279, 1598, 665),
    ("lru", 64, 8): (4096, 2621, 796, 1825, 58, 1703),
    ("lru", 200, 32): (4096, 2621, 1344, 1277, 0, 1053),
    ("lru", 500, 16): (4096, 2621, 1620, 1001, 0, 489),
    ("lru", 1000, 64): (4096, 2621, 1719, 902, 0, 5),
    ("lfu", 1, 32): (4096, 2621, 41, 2580, 2557, 22),
    ("lfu", 16, 4): (4096, 2621, 342, 2279, 1598, 665),
    ("lfu", 64, 8): (4096, 2621, 936, 1685, 58, 1563),
    ("lfu", 200, 32): (4096, 2621, 1440, 1181, 0, 957),
    ("lfu", 500, 16): (4096, 2621, 1637, 984, 0, 472),
    ("lfu", 1000, 64): (4096, 2621, 1718, 903, 0, 6),
}
COUNTS = ("requests", "unique", "hits", "misses", "conflicts", "evictions")


def batches() -> list[np.ndarray]:
    """The checked-in trace, one int64 array per batch."""
    return list(np.loadtxt(TRACE, dtype=np.int64))


def counts(result: EngineResult) -> tuple[int, ...]:
    return tuple(getattr(result, k) for k in COUNTS)


@pytest.fixture
def two_threads(monkeypatch):
    """The CPU replay's compiled step (where numba is installed), on two threads with a batch
    scored ahead, whatever this machine has."""
    if not compiled.COMPILED:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(engine, "_cores", lambda: 2)


def test_the_trace_is_the_checked_in_one():
    ids = np.concatenate(batches())
    assert len(batches()) == 64 and ids.size == 4096
    assert 0 <= ids.min() and ids.max() < NUM_ROWS
    assert np.unique(ids).size == 901


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_the_model_gives_the_golden_counts(key):
    """The literals are the brute-force model's, which sizes its LFU sketch as the engine
    documents (``FrequencySketch.for_cache``: width the next power of two of at least twice the
    rows and 1 024, halving after ten additions a row, 64 rows at least)."""
    policy, rows, ways = key
    ways = min(ways, rows)
    sets = math.ceil(rows / ways)
    capacity = sets * ways
    width, sample = 1 << max(10, (2 * capacity - 1).bit_length()), 10 * max(capacity, 64)
    model = ModelCache(sets, ways, policy, width, sample)
    for batch in batches():
        model.release(model.access(batch.tolist()))
    assert tuple(model.c[k] for k in COUNTS) == GOLDEN[key]
    assert model.c["writebacks"] == 0  # nothing is written in a replay


@pytest.mark.parametrize("num_rows", [None, NUM_ROWS])
@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_engine_replay_gives_the_golden_counts(two_threads, key, num_rows):
    policy, rows, ways = key
    result = replay_engine(batches(), rows, policy, ways, num_rows=num_rows)
    assert counts(result) == GOLDEN[key]


# the torch step (the specification, where numba is missing) on a few sizes: a second or two
# each on 2 cores, where the compiled step takes a tenth of that
@pytest.mark.parametrize(
    "key", [("lru", 16, 4), ("lfu", 64, 8), ("lru", 200, 32), ("lfu", 1000, 64)]
)
def test_the_torch_step_gives_the_golden_counts(monkeypatch, key):
    monkeypatch.setattr(cache_module, "COMPILED_STEP", False)
    policy, rows, ways = key
    assert counts(replay_engine(batches(), rows, policy, ways)) == GOLDEN[key]


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [None, NUM_ROWS])
@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_engine_replay_on_the_gpu_gives_the_golden_counts(key, num_rows):
    policy, rows, ways = key
    result = replay_engine(batches(), rows, policy, ways, device="cuda", num_rows=num_rows)
    assert counts(result) == GOLDEN[key]


# --- the invariants checked at the end of every replay -----------------------------------------


def stepped_cache(policy: str = "lru") -> tuple[SetAssociativeCache, EngineResult]:
    """A 64-row, 8-way cache stepped through the first 20 batches of the trace, each released,
    and its counters as a replay reports them."""
    cache = SetAssociativeCache(64, 8, policy, "cpu")
    for batch in batches()[:20]:
        uniq, n = torch.unique(torch.from_numpy(batch), return_counts=True)
        cache.release(cache.lookup(uniq, n).slots)
    result = EngineResult(policy, cache.capacity)
    c = cache.counters.tolist()
    result.requests, result.unique, result.hits, result.misses = c[0], c[1], c[2], c[3]
    result.conflicts, result.evictions = c[4], c[5]
    return cache, result


def test_a_released_cache_passes_the_check():
    cache, result = stepped_cache()
    assert result.evictions > 0 and result.conflicts > 0  # the check has something to count
    check_replay(result, cache)


def lock_a_way(cache, result):
    cache.locks.view(-1)[5] = 1


def empty_a_way(cache, result):  # behind the counters' back
    slot = int(torch.nonzero(cache.tags.view(-1) != EMPTY)[0])
    cache.tags.view(-1)[slot] = EMPTY


def add(field: str, to: str, by: int = 1):
    def damage(cache, result):
        setattr(result, field, getattr(result, to) + by)

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (lock_a_way, "1 ways of L1 still locked"),
        (add("hits", "hits"), r"hits \d+ \+ misses \d+ != unique"),
        (add("unique", "requests"), "> requests"),
        (add("conflicts", "misses"), "conflicts"),
        (add("evictions", "evictions"), "ways hold a row"),
        (empty_a_way, "ways hold a row"),
    ],
)
def test_each_broken_invariant_raises(damage, message):
    cache, result = stepped_cache()
    damage(cache, result)
    with pytest.raises(InternalError, match=message):
        check_replay(result, cache)


def test_a_replay_whose_batches_stay_locked_raises(monkeypatch):
    """The check runs at the end of every replay: a step that never releases its batch (here a
    release that does nothing) is caught there, not reported as a hit ratio."""
    monkeypatch.setattr(cache_module, "COMPILED_STEP", False)
    monkeypatch.setattr(SetAssociativeCache, "release", lambda self, slots, count=None: None)
    with pytest.raises(InternalError, match="still locked"):
        replay_engine(batches()[:4], 64, "lru", 8)


def test_a_two_level_replay_passes_the_check():
    """L2's locks are the pins of the rows L1 holds, and every L1 miss is an L2 hit or an L3
    read (checked by the replay itself, which would raise)."""
    result = replay_engine(batches(), 16, "lru", 4, host_rows=256)
    assert result.l2_hits + result.l3_reads == result.misses > 0
    assert counts(result) == GOLDEN[("lru", 16, 4)]
