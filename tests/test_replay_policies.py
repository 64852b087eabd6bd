"""The modern reference policies (S3-FIFO, W-TinyLFU) against hand-worked counts and against
plain-list models written here from the same description, one request at a time; their hash
map against a dict; their loops as Python (where numba is missing) against the compiled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore import compiled
from tierstore.errors import InvalidInputError
from tierstore.replay import REFERENCE
from tierstore.replay.policies import (
    POLICIES,
    S3FIFO,
    WTinyLFU,
    keymap,
    make_policy,
    policy_hits,
    s3fifo,
    wtinylfu,
)
from tierstore.replay.policies.wtinylfu import sketch_slots
from tierstore.trace.formats import load_trace

GOLDEN = Path(__file__).parent / "data" / "golden_trace.txt"  # 1 2 3 1 4 2 1 3 2 5 1 2
M64 = (1 << 64) - 1


def s3fifo_model(ids: list[int], cap: int) -> int:
    """S3-FIFO with lists (index 0 = oldest)."""
    if cap == 0:
        return 0
    small_cap = max(1, round(cap * 0.1))
    ghost_cap = cap - small_cap
    small: list[int] = []
    main: list[int] = []
    ghost: list[int] = []
    freq: dict[int, int] = {}
    hits = 0
    for x in ids:
        if x in small or x in main:
            hits += 1
            freq[x] = min(freq[x] + 1, 3)
            continue
        while len(small) + len(main) >= cap:
            if len(small) >= small_cap or not main:
                t = small.pop(0)
                if freq[t] > 0:  # hit while in the small queue: promote
                    freq[t] = 0
                    main.append(t)
                else:
                    del freq[t]
                    if ghost_cap:
                        ghost.append(t)
                        if len(ghost) > ghost_cap:
                            ghost.pop(0)
            else:
                t = main.pop(0)
                if freq[t] > 0:
                    freq[t] -= 1
                    main.append(t)
                else:
                    del freq[t]
        if x in ghost:
            ghost.remove(x)
            main.append(x)
        else:
            small.append(x)
        freq[x] = 0
    return hits


def _mix64(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _slots(x: int, width: int) -> list[int]:
    u = x & M64
    words = [_mix64((u + s) & M64) for s in (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)]
    return [((words[j // 2] >> (32 * (j % 2))) & (width - 1)) + j * width for j in range(4)]


def wtinylfu_model(ids: list[int], cap: int) -> int:
    """W-TinyLFU with lists (index 0 = least recently used) and a list sketch."""
    if cap == 0:
        return 0
    wcap = min(cap, max(1, round(cap * 0.01)))
    mcap = cap - wcap
    pcap = int(mcap * 0.8)
    width = 1 << max(4, (cap - 1).bit_length())
    sketch = [0] * (4 * width)
    sample, added = 10 * cap, 0
    window: list[int] = []
    prob: list[int] = []
    prot: list[int] = []

    def estimate(y: int) -> int:
        return min(sketch[s] for s in _slots(y, width))

    hits = 0
    for x in ids:
        for s in _slots(x, width):
            sketch[s] = min(15, sketch[s] + 1)
        added += 1
        if added >= sample:
            sketch = [v >> 1 for v in sketch]
            added //= 2
        if x in window:
            window.remove(x)
            window.append(x)
            hits += 1
        elif x in prot:
            prot.remove(x)
            prot.append(x)
            hits += 1
        elif x in prob:
            prob.remove(x)
            prot.append(x)
            if len(prot) > pcap:
                prob.append(prot.pop(0))
            hits += 1
        else:
            window.append(x)
            if len(window) > wcap:
                cand = window.pop(0)
                if len(prob) + len(prot) < mcap:
                    prob.append(cand)
                elif mcap > 0:
                    seg = prob if prob else prot
                    if estimate(cand) > estimate(seg[0]):
                        seg.pop(0)
                        prob.append(cand)
    return hits


MODELS = {"s3fifo": s3fifo_model, "wtinylfu": wtinylfu_model}


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
        assert got[:, k].tolist() == _slots(key, 64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_trace_matches_the_model(name):
    ids = load_trace(GOLDEN).tables[0]
    sizes = [0, 1, 2, 3, 4, 5, 6]
    assert policy_hits(name, ids, sizes).tolist() == [MODELS[name](ids.tolist(), c) for c in sizes]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", range(12))
def test_matches_the_model_on_random_traces(name, seed):
    rng = np.random.default_rng(seed)
    universe = int(rng.integers(2, 300))
    if seed % 2:  # uniform over a few ids: ghosts come back often
        ids = rng.integers(0, universe // 8 + 2, 2500)
    else:
        ids = (rng.zipf(1.2, 2500) % universe).astype(np.int64)
    sizes = [1, 2, 3, 7, 20, 64, 150]  # small sizes age the sketch many times (10 x capacity)
    assert policy_hits(name, ids, sizes).tolist() == [MODELS[name](ids.tolist(), c) for c in sizes]


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
    expected = policy_hits(name, ids, sizes).tolist()
    _as_python(monkeypatch)
    assert policy_hits(name, ids, sizes).tolist() == expected
    assert expected == [MODELS[name](ids.tolist(), c) for c in sizes]


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
        assert S3FIFO(cap).run(ids, show=False) == s3fifo_model(ids.tolist(), cap)
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
    hits = 0
    for x in ids.tolist():
        hits += one.access(x)
        assert x in one and len(one) <= 9
    assert hits == make_policy(name, 9).run(ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=150))
def test_small_and_huge_caches(ids):
    a = np.array(ids, np.int64)
    distinct = np.unique(a).size if a.size else 0
    immediate = int(np.count_nonzero(a[1:] == a[:-1])) if a.size else 0
    for name in POLICIES:
        assert policy_hits(name, a, [0, 1, 21]).tolist() == [0, immediate, a.size - distinct]
