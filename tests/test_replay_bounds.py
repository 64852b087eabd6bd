"""Belady's OPT, the compulsory floor and fully associative LRU against hand-worked golden
traces, literal one-request-at-a-time models, and hypothesis properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore import compiled
from tierstore.errors import InvalidInputError
from tierstore.replay import (
    REFERENCE,
    bounds,
    compulsory_misses,
    fully_assoc,
    lru_hits,
    lru_stack_distances,
    next_use,
    opt_hits,
    opt_misses,
    previous_use,
    reference_hits,
)
from tierstore.trace.formats import load_trace

GOLDEN = Path(__file__).parent / "data" / "golden_trace.txt"  # 1 2 3 1 4 2 1 3 2 5 1 2


# --- obviously correct models, one request at a time ---------------------------------------


def belady_model(ids: list[int], capacity: int) -> int:
    """Literal Belady: on a miss with a full cache, evict the row used farthest in future."""
    never = len(ids)
    nxt, last = [never] * len(ids), {}
    for t in range(len(ids) - 1, -1, -1):
        nxt[t] = last.get(ids[t], never)
        last[ids[t]] = t
    cache: dict[int, int] = {}  # id -> its next use
    hits = 0
    for t, x in enumerate(ids):
        if x in cache:
            hits += 1
        elif capacity > 0:
            if len(cache) == capacity:
                del cache[max(cache, key=cache.__getitem__)]
            cache[x] = 0
        if x in cache:
            cache[x] = nxt[t]
    return hits


def lru_model_distances(ids: list[int]) -> list[int]:
    """Mattson's stack: the position of the id in an MRU-first list, then move it to front."""
    stack: list[int] = []
    out = []
    for x in ids:
        if x in stack:
            k = stack.index(x)
            out.append(k)
            stack.pop(k)
        else:
            out.append(-1)
        stack.insert(0, x)
    return out


def lru_model_hits(ids: list[int], capacity: int) -> int:
    return sum(0 <= d < capacity for d in lru_model_distances(ids))


def schedule_fits(ids: list[int], hit: list[bool], capacity: int) -> bool:
    """Whether a cache of ``capacity`` rows (demand fetch) can hit exactly the requests
    ``hit``: each hit's id was requested before and stayed cached since, and at every request
    the cache holds its id plus the ids kept across it, at most ``capacity`` in all."""
    last: dict[int, int] = {}
    kept = []  # (previous request, this request) of each hit
    for i, x in enumerate(ids):
        if hit[i]:
            if x not in last:
                return False
            kept.append((last[x], i))
        last[x] = i
    if capacity == 0:
        return not kept
    return all(1 + sum(p < t < i for p, i in kept) <= capacity for t in range(len(ids)))


# --- golden --------------------------------------------------------------------------------


def test_golden_trace_worked_by_hand():
    ids = load_trace(GOLDEN).tables[0]
    assert ids.tolist() == [1, 2, 3, 1, 4, 2, 1, 3, 2, 5, 1, 2]
    sizes = [0, 1, 2, 3, 4, 5]
    # LRU stack distances by hand: [-,-,-,2,-,3,2,3,2,-,3,2]
    assert lru_stack_distances(ids).tolist() == [-1, -1, -1, 2, -1, 3, 2, 3, 2, -1, 3, 2]
    assert lru_hits(ids, sizes).tolist() == [0, 0, 0, 4, 7, 7]
    # OPT by hand: C=2 hits at t=3,6,8,11; C=3 at t=3,5,6,8,10,11; C=4 all 7 reuses
    assert opt_hits(ids, sizes).tolist() == [0, 0, 4, 6, 7, 7]
    assert compulsory_misses(ids) == 5
    assert opt_misses(ids, [3]).tolist() == [6]


def test_immediate_reuse_is_all_a_one_row_cache_hits():
    ids = np.array([4, 4, 4, 1, 4, 4, 2, 2])
    assert opt_hits(ids, [1]).tolist() == [4]
    assert lru_hits(ids, [1]).tolist() == [4]


def test_empty_and_tiny():
    for f in (opt_hits, lru_hits):
        assert f(np.array([], np.int64), [0, 1, 5]).tolist() == [0, 0, 0]
        assert f(np.array([9]), [0, 1]).tolist() == [0, 0]
    assert compulsory_misses([]) == 0
    assert lru_stack_distances([]).size == 0


def test_reference_registry_has_the_bounds():
    assert {"opt", "fa-lru"} <= set(REFERENCE)
    ids = load_trace(GOLDEN).tables[0]
    assert reference_hits("opt", ids, [2]).tolist() == [4]
    with pytest.raises(InvalidInputError, match="unknown reference policy"):
        reference_hits("nope", ids, [2])
    with pytest.raises(InvalidInputError, match="cache_sizes"):
        opt_hits(ids, [-1])
    with pytest.raises(InvalidInputError, match="1-D"):
        lru_hits(np.ones((2, 2), int), [1])


# --- against the models --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_opt_and_lru_match_the_models_on_random_traces(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, int(rng.integers(1, 25)), int(rng.integers(1, 150))).tolist()
    sizes = list(range(0, 16))
    assert opt_hits(np.array(ids), sizes).tolist() == [belady_model(ids, c) for c in sizes]
    assert lru_stack_distances(np.array(ids)).tolist() == lru_model_distances(ids)
    assert lru_hits(np.array(ids), sizes).tolist() == [lru_model_hits(ids, c) for c in sizes]


@pytest.mark.parametrize("seed", range(10))
def test_opt_as_python_equals_compiled(monkeypatch, seed):
    """Where numba is missing, OPT's loop runs as written over ``array`` buffers: same hits."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 300, 5000)
    sizes = [1, 2, 17, 100, 299]
    expected = opt_hits(ids, sizes).tolist()
    flags, want = np.zeros((5, ids.size), np.bool_), np.zeros((5, ids.size), np.bool_)
    opt_hits(ids, sizes, hit_flags=want)
    monkeypatch.setattr(compiled, "COMPILED", False)
    monkeypatch.setattr(bounds, "_best_fit", getattr(bounds._best_fit, "py_func", bounds._best_fit))
    monkeypatch.setattr(bounds, "_STEP", 777)  # chunks continue one run of the union-find
    assert opt_hits(ids, sizes, hit_flags=flags).tolist() == expected
    assert expected == [belady_model(ids.tolist(), c) for c in sizes]
    assert (flags == want).all()  # the decisions come back out of each chunk's buffer


@pytest.mark.parametrize("seed", range(16))
def test_opt_hit_flags_are_an_optimal_schedule(seed):
    """OPT's hit flags (which requests hit) are a schedule that a cache of the size can keep,
    and hit as often as a literal Belady; fully associative LRU's are those of its stack."""
    rng = np.random.default_rng(100 + seed)
    ids = rng.integers(0, int(rng.integers(2, 30)), int(rng.integers(1, 160))).tolist()
    sizes = [0, 1, 2, 3, 5, 8, 40]
    flags = np.ones((len(sizes), len(ids)), np.bool_)  # set to whatever they held
    hits = opt_hits(np.array(ids), sizes, hit_flags=flags)
    assert hits.tolist() == flags.sum(1).tolist() == [belady_model(ids, c) for c in sizes]
    repeats = [x in ids[:i] for i, x in enumerate(ids)]
    for c, hit in zip(sizes, flags.tolist()):
        assert schedule_fits(ids, hit, c), c
        # the check itself: hitting every repeat fits exactly where Belady hits them all
        assert schedule_fits(ids, repeats, c) == (belady_model(ids, c) == sum(repeats)), c
    dist = lru_model_distances(ids)
    assert lru_hits(np.array(ids), sizes, hit_flags=flags).tolist() == flags.sum(1).tolist()
    assert flags.tolist() == [[0 <= d < c for d in dist] for c in sizes]


def test_hit_flags_of_the_wrong_shape_are_refused():
    ids = np.arange(6) % 3
    for f in (opt_hits, lru_hits):
        for bad in (np.zeros(6, np.bool_), np.zeros((2, 5), np.bool_), np.zeros((2, 6), int)):
            with pytest.raises(InvalidInputError, match="hit_flags"):
                f(ids, [1, 2], hit_flags=bad)
        assert reference_hits("opt", ids, [1, 2], hit_flags=np.zeros((2, 6), np.bool_)).size == 2


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_stack_distances_across_chunks(monkeypatch, chunk):
    # the dominance count works in chunks; tiny chunks exercise the cross-chunk term
    monkeypatch.setattr(fully_assoc, "_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    ids = rng.zipf(1.3, 3000) % 200
    assert lru_stack_distances(ids).tolist() == lru_model_distances(ids.tolist())


def test_previous_and_next_use_on_a_wide_id_range():
    # ids spanning almost all of int64 take the stable-argsort path
    ids = np.array([2**62, -(2**62), 5, 2**62, 5, -(2**62), 7])
    assert previous_use(ids).tolist() == [-1, -1, -1, 0, 2, 1, -1]
    assert next_use(ids).tolist() == [3, 5, 4, 7, 7, 7, 7]
    assert lru_stack_distances(ids).tolist() == lru_model_distances(ids.tolist())
    assert opt_hits(ids, [2]).tolist() == [belady_model(ids.tolist(), 2)]


def test_uint64_ids_are_accepted():
    ids = np.array([2**64 - 1, 3, 2**64 - 1], dtype=np.uint64)
    assert lru_hits(ids, [2]).tolist() == [1]
    assert opt_hits(ids, [2]).tolist() == [1]


# --- properties ----------------------------------------------------------------------------

traces = st.lists(st.integers(0, 12), min_size=0, max_size=120)
sizes = st.lists(st.integers(0, 15), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(traces, sizes)
def test_opt_is_never_beaten_and_never_below_the_floor(ids, cache_sizes):
    ids = np.array(ids, np.int64)
    opt = opt_hits(ids, cache_sizes, show=False)
    floor = compulsory_misses(ids)
    assert (ids.size - opt >= floor).all()
    for name, f in REFERENCE.items():
        hits = f(ids, cache_sizes)
        assert (hits <= opt).all(), name
        assert (ids.size - hits >= floor).all(), name


@settings(max_examples=100, deadline=None)
@given(traces)
def test_opt_and_lru_are_stack_algorithms(ids):
    ids = np.array(ids, np.int64)
    every = list(range(0, 15))
    for f in (opt_hits, lru_hits):
        h = f(ids, every)
        assert (np.diff(h) >= 0).all()  # more rows never hit less
        distinct = compulsory_misses(ids)
        assert f(ids, [max(distinct, 1)]).tolist() == [ids.size - distinct]
