"""The modern reference policies (S3-FIFO, W-TinyLFU) against hand-worked counts and against
plain-list models written from the same description (``replay_models.py``), one request at a
time, request by request (their hit flags); their hash map against a dict; their loops as
Python (where numba is missing) against the compiled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_models import MODELS, model_hits, plain_slots, s3fifo_model

from tierstore import compiled
from tierstore.errors import InvalidInputError
from tierstore.replay import REFERENCE
from tierstore.replay.policies import (
    POLICIES,
    S3FIFO,
    WTinyLFU,
    base,
    keymap,
    make_policy,
    policy_hits,
    s3fifo,
    wtinylfu,
)
from tierstore.replay.policies.wtinylfu import sketch_slots
from tierstore.trace.formats import load_trace

GOLDEN = Path(__file__).parent / "data" / "golden_trace.txt"  # 1 2 3 1 4 2 1 3 2 5 1 2


def test_registry():
    assert set(POLICIES) == {"s3fifo", "wtinylfu"}
    assert POLICIES["s3fifo"] is S3FIFO and POLICIES["wtinylfu"] is WTinyLFU
    assert {"s3fifo", "wtinylfu"} <= set(REFERENCE)
    with pytest.raises(InvalidInputError, match="unknown policy"):
        make_policy("clock", 4)
    with pytest.raises(InvalidInputError, match="capacity"):
        make_policy("s3fifo", -1)


def test_s3fifo_golden_worked_by_hand():
    ids = load_trace(GOLDEN).tables[0]
    # C=2: every request misses (the 1-row small queue filters everything);
    # C=3: hits at t=3 (small), 6, 8, 10, 11 (main, after 2 and 3 came back from the ghost)
    assert policy_hits("s3fifo", ids, [1, 2, 3, 5]).tolist() == [0, 0, 5, 7]


def test_sketch_slots_match_the_plain_hash():
    keys = np.array([0, 1, -1, 2**40 + 3, -(2**63)], np.int64)
    got = sketch_slots(keys, 64)
    for k, key in enumerate(keys.tolist()):
        assert got[:, k].tolist() == plain_slots(key, 64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_trace_matches_the_model(name):
    ids = load_trace(GOLDEN).tables[0]
    sizes = [0, 1, 2, 3, 4, 5, 6]
    want = [model_hits(name, ids.tolist(), c) for c in sizes]
    assert policy_hits(name, ids, sizes).tolist() == want


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", range(12))
def test_matches_the_model_on_random_traces(monkeypatch, name, seed):
    """Request by request: the hit flags equal the model's (across the driver's chunks, made
    tiny for some seeds), and the hits are their count."""
    if seed % 3 == 0:
        monkeypatch.setattr(base, "CHUNK", 97)
    rng = np.random.default_rng(seed)
    universe = int(rng.integers(2, 300))
    if seed % 2:  # uniform over a few ids: ghosts come back often
        ids = rng.integers(0, universe // 8 + 2, 2500)
    else:
        ids = (rng.zipf(1.2, 2500) % universe).astype(np.int64)
    sizes = [1, 2, 3, 7, 20, 64, 150]  # small sizes age the sketch many times (10 x capacity)
    flags = np.zeros((len(sizes), ids.size), np.bool_)
    hits = policy_hits(name, ids, sizes, hit_flags=flags)
    want = [MODELS[name](ids.tolist(), c) for c in sizes]
    assert flags.tolist() == want
    assert hits.tolist() == [sum(w) for w in want]


def _as_python(monkeypatch) -> None:
    """Runs the policies' loops as written, over ``array`` buffers (no numba)."""
    monkeypatch.setattr(compiled, "COMPILED", False)
    for module in (keymap, s3fifo, wtinylfu):
        for name, fn in list(vars(module).items()):
            if hasattr(fn, "py_func"):
                monkeypatch.setattr(module, name, fn.py_func)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_as_python_equals_compiled(monkeypatch, name):
    rng = np.random.default_rng(7)
    ids = np.concatenate([rng.integers(-5, 40, 1500), rng.zipf(1.1, 1500) % 200])
    sizes = [1, 4, 17, 60]
    expected, flags = policy_hits(name, ids, sizes).tolist(), np.zeros((4, ids.size), np.bool_)
    _as_python(monkeypatch)
    monkeypatch.setattr(base, "CHUNK", 1000)  # flags copied out of the loop's buffer per chunk
    assert policy_hits(name, ids, sizes, hit_flags=flags).tolist() == expected
    assert flags.tolist() == [MODELS[name](ids.tolist(), c) for c in sizes]


@pytest.mark.parametrize("seed", range(4))
def test_s3fifo_ghost_ring_compacts_and_keeps_order(monkeypatch, seed):
    """Ghosts that come back leave stale entries in the ghost ring; once they fill it, the ring
    is compacted in place. Traces where that happens (counted) still match the model."""
    _as_python(monkeypatch)
    compactions = [0]
    remember = s3fifo._remember

    def counting(key, table, gkeys, *rest):
        compactions[0] += rest[2] == len(gkeys)  # rest: serials, head, length, ...
        return remember(key, table, gkeys, *rest)

    monkeypatch.setattr(s3fifo, "_remember", counting)
    rng = np.random.default_rng(seed)
    for universe, cap in ((12, 5), (20, 10), (30, 10)):
        ids = rng.integers(0, universe, 3000)
        before = compactions[0]
        assert S3FIFO(cap).run(ids, show=False) == sum(s3fifo_model(ids.tolist(), cap))
        assert compactions[0] > before


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(-(2**63), 2**63 - 1)), max_size=300),
    st.integers(1, 40),
)
def test_keymap_equals_a_dict(ops, entries):
    """Puts and removals (keys of any int64, few distinct so that removals hit), then every
    key's lookup, against a dict; the map never holds more than ``entries`` keys here."""
    table = keymap.new_map(entries)
    want: dict[int, int] = {}
    for k, (insert, raw) in enumerate(ops):
        key = raw % 53 - 26 if k % 3 else raw  # mostly a few small keys, some huge
        s = keymap.find(table, key)
        assert (s >= 0) == (key in want)
        if insert and s < 0 and len(want) < entries:
            keymap.put(table, -1 - s, key, k)
            want[key] = k
        elif not insert and s >= 0:
            keymap.remove(table, s)
            del want[key]
        for other, value in want.items():
            s = keymap.find(table, other)
            assert s >= 0 and table[2 * s + 1] == value


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_access_agrees_with_run_and_respects_capacity(name):
    ids = np.random.default_rng(3).integers(0, 40, 800)
    one = make_policy(name, 9)
    hit = []
    for x in ids.tolist():
        hit.append(one.access(x))
        assert x in one and len(one) <= 9
    flags = np.zeros(ids.size, np.bool_)
    assert sum(hit) == make_policy(name, 9).run(ids, hit_flags=flags)
    assert flags.tolist() == hit
    assert not make_policy(name, 0).access(3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=150))
def test_small_and_huge_caches(ids):
    a = np.array(ids, np.int64)
    distinct = np.unique(a).size if a.size else 0
    immediate = int(np.count_nonzero(a[1:] == a[:-1])) if a.size else 0
    repeat = np.zeros(a.size, np.bool_)  # every request but an id's first
    if a.size:
        repeat[np.unique(a, return_index=True)[1]] = True
        repeat = ~repeat
    for name in POLICIES:
        flags = np.ones((3, a.size), np.bool_)  # set to whatever they held
        got = policy_hits(name, a, [0, 1, 21], hit_flags=flags)
        assert got.tolist() == [0, immediate, a.size - distinct]
        assert not flags[0].any() and (flags[2] == repeat).all()
        assert (flags[1] == np.r_[False, a[1:] == a[:-1]][: a.size]).all()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_hit_flags_of_the_wrong_shape_or_type_are_refused(name):
    ids = np.arange(10)
    for bad in (np.zeros((2, 10), np.bool_), np.zeros((1, 9), np.bool_), np.zeros((1, 10)), [0]):
        with pytest.raises(InvalidInputError, match="hit_flags"):
            policy_hits(name, ids, [3], hit_flags=bad)
