"""``CompiledCache`` (``cache_compiled.py``) against the torch step it twins (``cache.py``): a
``SetAssociativeCache`` and a ``CompiledCache`` made alike, stepped through the same random
batches, must return the same ``Lookup`` and hold the same state after every step, bit for bit;
and ``cpu.new_cache`` picks the compiled cache exactly where it applies."""

from __future__ import annotations

import ast
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from tierstore import cache as cache_module  # noqa: E402
from tierstore import cache_compiled, cpu  # noqa: E402
from tierstore.cache import Lookup, SetAssociativeCache  # noqa: E402
from tierstore.cache_compiled import CompiledCache  # noqa: E402
from tierstore.errors import CapacityError, FallbackWarning  # noqa: E402
from tierstore.hashing import set_index  # noqa: E402
from tierstore.policy import LFU, LRU, FrequencySketch  # noqa: E402

LOOKUP_FIELDS = ("ids", "slots", "fill_index", "fill_slots", "victim_ids", "victim_dirty", "hit")
STATE = ("tags", "stamps", "dirty", "locks", "counters")
TWINS = (SetAssociativeCache, CompiledCache)  # the torch specification, the compiled twin


@contextmanager
def torch_step():
    """Every ``CompiledCache`` steps and releases with the torch code while inside."""
    saved = cache_module.COMPILED_STEP
    cache_module.COMPILED_STEP = False
    try:
        yield
    finally:
        cache_module.COMPILED_STEP = saved


def make_twins(rows, ways, policy, id_bound=None, sample=None, width=64):
    """Two caches made alike: the torch specification and the compiled twin. ``sample``: LFU
    gets a small sketch that halves after that many additions."""
    twins = [cls(rows, ways, policy, id_bound=id_bound) for cls in TWINS]
    if sample is not None and policy == "lfu":
        for cache in twins:
            cache.sketch = FrequencySketch(width, sample)
    return twins


def assert_same_lookup(want: Lookup, got: Lookup):
    for name in LOOKUP_FIELDS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name


def assert_same_cache_state(want: SetAssociativeCache, got: SetAssociativeCache):
    """The state but the sketch (which a cache scored ahead holds one batch further on)."""
    for name in STATE:
        assert torch.equal(getattr(want, name), getattr(got, name)), name
    assert want.step == got.step
    if want._slot_of is not None:
        assert torch.equal(want._slot_of, got._slot_of), "_slot_of"


def assert_same_state(want: SetAssociativeCache, got: SetAssociativeCache):
    assert_same_cache_state(want, got)
    if want.sketch is not None:
        assert torch.equal(want.sketch.counters, got.sketch.counters), "sketch counters"
        assert torch.equal(want.sketch.additions, got.sketch.additions), "sketch additions"


def step_twins(twins, ids: np.ndarray) -> tuple[Lookup, Lookup]:
    """One step of both caches with the unique ``ids`` and their counts; checks the compiled
    path really ran."""
    reference, compiled = twins
    uniq, counts = torch.unique(torch.as_tensor(ids, dtype=torch.int64), return_counts=True)
    want = reference.lookup(uniq, counts)
    assert compiled.supports(uniq, counts)
    got = compiled.lookup(uniq, counts)
    return want, got


def run_twins(twins, batches, rng, in_flight=1, keep_every=0):
    """Steps both through ``batches``, marking random slots dirty (the empty, conflict and
    locked ones included), holding up to ``in_flight`` batches locked and never releasing every
    ``keep_every``-th one (0: all are released), so that locks make conflict misses; compares
    the lookups and the whole state after each step and each release."""
    reference, compiled = twins
    pending = deque()
    for k, ids in enumerate(batches):
        want, got = step_twins(twins, ids)
        assert_same_lookup(want, got)
        assert_same_state(reference, compiled)
        dirty = torch.from_numpy(rng.integers(-1, reference.capacity, rng.integers(0, 8)))
        reference.mark_dirty(dirty)
        compiled.mark_dirty(dirty)
        if keep_every and k % keep_every == keep_every - 1:
            continue
        pending.append((want.slots, got.slots))
        while len(pending) > in_flight:
            want_slots, got_slots = pending.popleft()
            reference.release(want_slots)
            compiled.release(got_slots)
            assert_same_state(reference, compiled)
    return reference, compiled


def zipf_batches(rng, n_batches, size, universe, alpha=1.1):
    """Skewed batches over ``[0, universe)`` (repeats within a batch: counts above 1)."""
    return [(rng.zipf(alpha, size) - 1) % universe for _ in range(n_batches)]


def uniform_batches(rng, n_batches, size, universe):
    """Batches drawn uniformly from ``[0, universe)``."""
    return [rng.integers(0, universe, size) for _ in range(n_batches)]


def hashed_batches(rng, n_batches, size, universe):
    """Skewed batches of ids spread over the whole int64 range (negative ones included, never
    ``EMPTY``): for caches without an id bound."""
    spread = rng.integers(-(1 << 63) + 1, (1 << 63) - 1, universe, dtype=np.int64)
    return [spread[b] for b in zipf_batches(rng, n_batches, size, universe)]


SHAPES = [  # (rows, ways): one row, one set, odd and full associativity, many sets of one way
    (1, 1),
    (1, 32),
    (7, 7),
    (40, 7),
    (64, 64),
    (300, 64),
    (256, 32),
    (2000, 1),
]


@settings(max_examples=200, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    policy=st.sampled_from(["lru", "lfu"]),
    indexed=st.booleans(),
    kind=st.sampled_from(["zipf", "uniform"]),
    size=st.integers(1, 200),
    in_flight=st.integers(0, 3),
    keep_every=st.sampled_from([0, 0, 3, 7]),
    sample=st.sampled_from([None, 5, 60]),
    seed=st.integers(0, 2**32 - 1),
)
def test_compiled_step_equals_torch_step(
    shape, policy, indexed, kind, size, in_flight, keep_every, sample, seed
):
    rng = np.random.default_rng(seed)
    universe = int(rng.integers(2, 4 * shape[0] + 50))
    make = zipf_batches if kind == "zipf" else uniform_batches
    batches = make(rng, 12, size, universe)
    twins = make_twins(*shape, policy, id_bound=universe if indexed else None, sample=sample)
    run_twins(twins, batches, rng, in_flight, keep_every)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("ways", [1, 7, 32, 64])
def test_long_zipf_trace_with_conflicts_and_evictions(policy, ways):
    """A longer skewed trace with batches held in flight: conflicts, evictions and write-backs
    all happen, and the counters agree."""
    rng = np.random.default_rng(ways)
    batches = zipf_batches(rng, 30, 500, 3000, alpha=1.05)
    twins = make_twins(8 * ways, ways, policy, id_bound=3000, sample=400, width=256)
    reference, _ = run_twins(twins, batches, rng, in_flight=2, keep_every=5)
    c = reference.counters.tolist()
    assert c[4] > 0 and c[5] > 0 and c[6] > 0  # conflicts, evictions, write-backs


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_ids_over_the_whole_int64_range(policy):
    """No id bound: sets come from the hash of any int64 id, negative ones included."""
    rng = np.random.default_rng(3)
    twins = make_twins(96, 32, policy, sample=100)
    run_twins(twins, hashed_batches(rng, 20, 300, 1000), rng, in_flight=1, keep_every=4)


@pytest.mark.parametrize("indexed", [False, True])
def test_batches_crowding_a_few_sets(indexed):
    """Many misses per set among many sets: which misses get the ways, and which way each
    gets, depends on the order of the misses within a set."""
    rng = np.random.default_rng(5)
    universe = 100_000
    twins = make_twins(8000, 4, "lfu", id_bound=universe if indexed else None, sample=50)
    sets = set_index(torch.arange(universe), twins[0].sets).numpy()
    crowded = [np.flatnonzero(sets == s) for s in rng.choice(twins[0].sets, 6, replace=False)]
    batches = [np.concatenate([rng.choice(ids, 9) for ids in crowded]) for _ in range(12)]
    run_twins(twins, batches, rng, in_flight=1, keep_every=4)


@pytest.mark.parametrize(
    "low, high", [(0, 1 << 50), (-(1 << 40), 1 << 40), (1 << 57, 1 << 62), (-(1 << 62), 1 << 62)]
)
def test_scores_far_apart(low, high):
    """Scores set by hand (no policy makes them) far apart, negative or past what the packed
    keys hold: those take the pairwise comparison; the victims are the same."""
    rng = np.random.default_rng(high.bit_length())
    twins = make_twins(64, 8, "lru", id_bound=400)
    stamps = torch.from_numpy(rng.integers(low, high, (8, 8)))
    for cache in twins:
        cache.tags.copy_(torch.arange(64).view(8, 8) * 5)  # full, every way evictable
        cache._slot_of[cache.tags.view(-1)] = torch.arange(64, dtype=torch.int32)
        cache.stamps.copy_(stamps)
    run_twins(twins, uniform_batches(rng, 6, 60, 400), rng, in_flight=0)


def test_empty_batch_and_int32_counts():
    twins = make_twins(32, 4, "lfu", sample=10)
    empty = torch.zeros(0, dtype=torch.int64)
    assert_same_lookup(twins[0].lookup(empty, empty), twins[1].lookup(empty, empty))
    ids = torch.tensor([3, 9, 27, 81])
    counts = torch.tensor([4, 1, 2, 9], dtype=torch.int32)
    want = twins[0].lookup(ids, counts)
    assert twins[1].supports(ids, counts)
    assert_same_lookup(want, twins[1].lookup(ids, counts))
    assert_same_state(*twins)


def test_id_outside_the_bound_raises_before_any_change():
    cache = CompiledCache(16, 4, "lfu", id_bound=100)
    before = [t.clone() for t in (cache.tags, cache.locks, cache.sketch.counters)]
    for bad in ([5, 100], [-1, 5]):
        with pytest.raises(IndexError):
            cache.lookup(torch.tensor(bad), torch.ones(2, dtype=torch.int64))
    for a, b in zip(before, (cache.tags, cache.locks, cache.sketch.counters)):
        assert torch.equal(a, b)
    assert cache.step == 0


def test_release_of_a_slot_beyond_the_cache_raises_before_any_change():
    cache = CompiledCache(16, 4, "lru")
    found = cache.lookup(torch.tensor([1, 2]), torch.ones(2, dtype=torch.int64))
    locks = cache.locks.clone()
    with pytest.raises(IndexError):
        cache.release(torch.cat([found.slots, torch.tensor([16])]))
    assert torch.equal(cache.locks, locks)


def test_what_takes_the_torch_step(monkeypatch):
    """A custom policy, a strict lookup and ``COMPILED_STEP = False`` keep a ``CompiledCache`` on
    the torch step (and the switch on the torch release: a release needs no policy), and the
    specification never leaves them; LRU and LFU take the compiled ones."""

    def refuse(*args):
        raise AssertionError("a compiled loop ran")

    monkeypatch.setattr(cache_compiled, "_step", refuse)
    monkeypatch.setattr(cache_compiled, "_unlock", refuse)
    ids, counts = torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.int64)

    class Custom(LRU):
        name = "custom"

    CompiledCache(8, 4, Custom()).lookup(ids, counts)
    CompiledCache(8, 4, "lru").lookup(ids, counts, strict=True)
    cache = SetAssociativeCache(8, 4, "lfu")
    cache.release(cache.lookup(ids, counts).slots)
    with torch_step():
        cache = CompiledCache(8, 4, "lfu")
        cache.release(cache.lookup(ids, counts).slots)
    for policy in ("lru", "lfu"):
        with pytest.raises(AssertionError, match="compiled loop ran"):
            CompiledCache(8, 4, policy).lookup(ids, counts)
        with pytest.raises(AssertionError, match="compiled loop ran"):
            CompiledCache(8, 4, policy).release(torch.tensor([-1]))


def test_a_numba_that_cannot_compile_leaves_the_torch_step(monkeypatch):
    """If numba fails to compile the step (an untested numba or LLVM), the step falls back to
    torch with a warning, nothing changed twice, and every later step stays on torch."""
    from numba.core.errors import TypingError

    def cannot_compile(*args):
        raise TypingError("no such intrinsic")

    monkeypatch.setattr(cache_compiled, "_step", cannot_compile)
    monkeypatch.setattr(cache_compiled, "_compiles", [True])
    rng = np.random.default_rng(3)
    reference, fallen = make_twins(64, 8, "lfu", id_bound=1000)
    for i in range(4):
        uniq, counts = torch.unique(
            torch.from_numpy(rng.integers(0, 1000, 300)), return_counts=True
        )
        want = reference.lookup(uniq, counts)
        if i == 0:
            with pytest.warns(RuntimeWarning, match="cannot compile the cache step"):
                got = fallen.lookup(uniq, counts)
        else:
            assert not fallen.supports(uniq, counts)
            got = fallen.lookup(uniq, counts)
        assert_same_lookup(want, got)
        assert_same_state(reference, fallen)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    policy=st.sampled_from(["lru", "lfu"]),
    indexed=st.booleans(),
    size=st.integers(1, 200),
    sample=st.sampled_from([None, 5, 60]),
    seed=st.integers(0, 2**32 - 1),
)
def test_scored_ahead_equals_torch_step(shape, policy, indexed, size, sample, seed):
    """``score`` of batch k + 1 before ``place`` of batch k, as the CPU replay steps its
    batches on two threads: the same lookups and state as the torch step batch by batch (the
    sketch one batch ahead until the last), the sketch's halving included."""
    rng = np.random.default_rng(seed)
    universe = int(rng.integers(2, 4 * shape[0] + 50))
    batches = zipf_batches(rng, 12, size, universe)
    reference, ahead = make_twins(
        *shape, policy, id_bound=universe if indexed else None, sample=sample
    )
    uniques = [torch.unique(torch.from_numpy(b), return_counts=True) for b in batches]
    scored = [ahead.score(uniques[0][0].numpy(), uniques[0][1].numpy())]
    for k, (uniq, counts) in enumerate(uniques):
        if k + 1 < len(uniques):
            nxt = uniques[k + 1]
            scored.append(ahead.score(nxt[0].numpy(), nxt[1].numpy()))
        want = reference.lookup(uniq, counts)
        got = Lookup(uniq, *ahead.place(scored[k]))
        assert_same_lookup(want, got)
        assert_same_cache_state(reference, ahead)
        if k % 3:  # the others stay locked: conflict misses
            reference.release(want.slots)
            ahead.release(got.slots)
    assert_same_state(reference, ahead)


@settings(max_examples=80, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    policy=st.sampled_from(["lru", "lfu"]),
    indexed=st.booleans(),
    hashed=st.booleans(),
    size=st.integers(1, 200),
    strict=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_compiled_plan_equals_torch_plan(shape, policy, indexed, hashed, size, strict, seed):
    """``plan`` then ``commit``, as L2 over an SSD tier steps (``host_cache.py``): the compiled
    plan decides what the torch plan decides, and a strict one refuses the same batches with
    the same message and no change; the compiled commit leaves the torch commit's state and the
    compiled find finds what the torch find does; while batches stay locked in flight and rows
    go dirty."""
    rng = np.random.default_rng(seed)
    universe = int(rng.integers(2, 4 * shape[0] + 50))
    make = hashed_batches if hashed and not indexed else zipf_batches
    twins = make_twins(*shape, policy, id_bound=universe if indexed else None, sample=40)
    reference, compiled = twins
    held = deque()
    refused = 0
    for batch in make(rng, 12, size, universe):
        uniq, counts = torch.unique(torch.from_numpy(batch), return_counts=True)
        try:
            want = reference.plan(uniq, strict)
        except CapacityError as e:
            with pytest.raises(CapacityError) as got_error:
                compiled.plan(uniq, strict)
            assert str(got_error.value) == str(e)
            refused += 1
            continue
        with count_calls(cache_compiled, "plan_slots") as calls:
            got = compiled.plan(uniq, strict)
        assert calls == [1]
        assert_same_lookup(want, got)
        assert_same_state(reference, compiled)  # a plan changes nothing
        reference.commit(want, counts)
        with count_calls(cache_compiled, "_commit") as calls:
            compiled.commit(got, counts)
        assert calls == [1]
        assert_same_state(reference, compiled)  # the compiled commit did what the torch one did
        asked = torch.from_numpy(rng.integers(0, universe, rng.integers(0, 40)))  # any, repeats
        with count_calls(cache_compiled, "find_slots") as calls:
            found = compiled.find(asked)
        assert calls == [0 if indexed else 1]  # (the slot index is one gather either way)
        assert torch.equal(found, reference.find(asked))
        dirty = torch.from_numpy(rng.integers(-1, reference.capacity, rng.integers(0, 8)))
        reference.mark_dirty(dirty)
        compiled.mark_dirty(dirty)
        held.append((want.slots, got.slots))
        while len(held) > rng.integers(0, 3):
            want_slots, got_slots = held.popleft()
            reference.release(want_slots)
            compiled.release(got_slots)
    assert_same_state(reference, compiled)


@contextmanager
def count_calls(module, name):
    """Counts the calls of ``module.name`` while inside (a list holding the count)."""
    calls = [0]
    original = getattr(module, name)

    def counted(*args):
        calls[0] += 1
        return original(*args)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def test_scoring_an_id_outside_the_bound_raises_before_any_change():
    cache = CompiledCache(16, 4, "lfu", id_bound=100)
    counters = cache.sketch.counters.clone()
    with pytest.raises(IndexError):
        cache.score(np.array([5, 100]), np.ones(2, np.int64))
    assert torch.equal(cache.sketch.counters, counters)


@pytest.mark.parametrize("policy", ["lru", "lfu", LRU(), LFU()])
def test_new_cache_picks_the_compiled_cache_on_the_cpu(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        cache = cpu.new_cache(40, 4, policy, torch.device("cpu"), id_bound=300)
    assert type(cache) is CompiledCache
    assert (cache.capacity, cache.ways, cache._slot_of.numel()) == (40, 4, 300)
    ids = torch.tensor([3, 17, 299])
    assert cache.supports(ids, torch.ones(3, dtype=torch.int64))


def test_new_cache_keeps_a_policy_without_compiled_score_on_the_specification():
    class Custom(LRU):  # declares nothing (declarations are not inherited)
        name = "custom"

    with pytest.warns(FallbackWarning, match="'custom' declares no compiled_score"):
        cache = cpu.new_cache(16, 4, Custom(), "cpu")
    assert type(cache) is SetAssociativeCache


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_new_cache_without_numba_or_off_the_cpu_is_the_specification(monkeypatch, policy):
    """Off the CPU (here the meta device) the compiled loops cannot run; without numba they
    would run as Python: the torch step instead, and no warning (nothing was lost)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert type(cpu.new_cache(16, 4, policy, "meta")) is SetAssociativeCache
        monkeypatch.setattr(cpu, "COMPILED", False)
        assert type(cpu.new_cache(16, 4, policy, "cpu")) is SetAssociativeCache


def test_the_specification_does_not_import_its_twin():
    """``cache.py`` imports no module that imports it back: not ``cache_compiled``, at module
    level, inside a function or under ``TYPE_CHECKING`` alike."""
    source = Path(cache_compiled.__file__).with_name("cache.py").read_text()
    named = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            named.add(node.module or "")
            named.update(f"{node.module or ''}.{alias.name}" for alias in node.names)
    assert "policy" in named  # the imports were seen
    assert not any("cache_compiled" in name for name in named), named
