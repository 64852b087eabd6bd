"""A multi-table trace through one cache shared by its tables (``replay/shared.py``): the whole
cache's and each table's counts against brute-force models keyed by (table, id) (the engine's
cache model, a literal LRU, the S3-FIFO and W-TinyLFU list models; OPT's from its hit flags),
golden counts on a checked-in three-table trace, the one-table case against the single-table
replay, the per-table caches against separate replays, and the CLI."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from cache_model import ModelCache, bucket, mix64
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_models import MODELS

from tierstore import cache as cache_module
from tierstore.cli import main
from tierstore.errors import InternalError
from tierstore.replay import engine, shared
from tierstore.replay.bounds import opt_hits
from tierstore.replay.engine import EngineResult, replay_engine
from tierstore.replay.invariants import check_attribution
from tierstore.replay.keys import KEY_SHIFT, key_tables, table_keys
from tierstore.replay.shared import replay_shared, split_sizes
from tierstore.replay.sweep import replay_table
from tierstore.trace.base import Trace
from tierstore.trace.formats import load_trace

DATA = Path(__file__).parent / "data"
SHARED = DATA / "shared_trace.csv"  # 900 requests to tables item, user, ad, in request order
COUNTS = ("requested", "unique", "hits", "misses")


def model_replay(tables, ids, rows, ways, policy, batch):
    """The brute-force model stepped with (table, id) keys (Python ints, the key written out
    by hand): its counters, and each table's lookups and hits."""
    ways = min(ways, rows)
    sets = math.ceil(rows / ways)
    capacity = sets * ways
    width, sample = 1 << max(10, (2 * capacity - 1).bit_length()), 10 * max(capacity, 64)
    model = ModelCache(sets, ways, policy, width, sample)
    n_tables = int(max(tables, default=0)) + 1
    unique, hits = Counter(), Counter()
    keys = [(int(t) << 47) | int(i) if n_tables > 1 else int(i) for t, i in zip(tables, ids)]
    for a in range(0, len(keys), batch):
        step = keys[a : a + batch]
        for key in set(step):
            unique[key >> 47] += 1
            hits[key >> 47] += key in model.tags[bucket(mix64(key), sets)]
        model.release(model.access(step))
    return model.c, unique, hits


def whole_and_tables(rows, policy_prefix):
    """The shared cache's whole row and its per-table rows for one policy (first size)."""
    mine = [r for r in rows if r["policy"].startswith(policy_prefix) and r["cache"] == "shared"]
    return mine[0], {r["table"]: r for r in mine if "request_share" in r}


@pytest.fixture(params=["compiled", "torch"])
def cache_step(request, monkeypatch):
    """The CPU replay's compiled step on two threads (a batch scored ahead), or the torch
    specification: the per-table hits come from either's hit flags."""
    if request.param == "torch":
        monkeypatch.setattr(cache_module, "COMPILED_STEP", False)
    monkeypatch.setattr(engine, "_cores", lambda: 2)
    return request.param


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    n_tables=st.integers(1, 4),
    policy=st.sampled_from(["lru", "lfu"]),
    batch=st.sampled_from([1, 3, 16]),
    rows=st.integers(1, 24),
    ways=st.sampled_from([1, 2, 4, 32]),
)
def test_shared_cache_matches_the_model_table_by_table(data, n_tables, policy, batch, rows, ways):
    n = data.draw(st.integers(0, 300))
    tables = np.array(data.draw(st.lists(st.integers(0, n_tables - 1), min_size=n, max_size=n)))
    ids = np.array(data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)))
    names = [f"t{k}" for k in range(n_tables)]
    trace = Trace.from_requests(tables.astype(np.int64), ids.astype(np.int64), names)
    got = replay_shared(trace, [rows], [policy], ways=ways, batch=batch)
    whole, per_table = whole_and_tables(got, policy)
    c, unique, hits = model_replay(tables, ids, rows, ways, policy, batch)
    assert (whole["requested"], whole["unique"], whole["hits"], whole["misses"]) == (
        c["requests"], c["unique"], c["hits"], c["misses"],
    )  # fmt: skip
    for k, name in enumerate(names):
        row = per_table[name]
        assert row["requested"] == int((tables == k).sum())
        assert (row["unique"], row["hits"]) == (unique[k], hits[k])
        assert row["misses"] == unique[k] - hits[k]
    assert sum(r["hits"] for r in per_table.values()) == whole["hits"]


# The model's hits (whole cache, then item, user, ad) at 40 rows of 8 ways, which the engine
# gives too (the asserts before these literals).
GOLDEN = {
    ("lru", 1): (573, [178, 293, 102]),
    ("lru", 64): (184, [52, 89, 43]),
    ("lfu", 1): (632, [192, 324, 116]),
    ("lfu", 64): (200, [57, 97, 46]),
}


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_golden_counts_on_the_checked_in_trace(cache_step, policy, batch):
    """The model's counts, pinned: a change in the keys, the order or the engine shows."""
    trace = load_trace(SHARED, table_col="table")
    assert trace.names == ["item", "user", "ad"] and trace.requests == 900
    tables, ids = trace.interleaved()
    got = replay_shared(trace, [40], [policy], ways=8, batch=batch)
    whole, per_table = whole_and_tables(got, policy)
    c, unique, hits = model_replay(tables, ids, 40, 8, policy, batch)
    assert (whole["unique"], whole["hits"]) == (c["unique"], c["hits"])
    assert [per_table[n]["hits"] for n in trace.names] == [hits[k] for k in range(3)]
    assert [per_table[n]["unique"] for n in trace.names] == [unique[k] for k in range(3)]
    assert (whole["hits"], [per_table[n]["hits"] for n in trace.names]) == GOLDEN[policy, batch]


@pytest.mark.parametrize("batch", [1, 50])
def test_one_table_of_many_equals_the_single_table_replay(batch):
    """A multi-table trace of which one table has requests replays as that table alone; so does
    a one-table trace (its keys are its ids)."""
    ids = np.random.default_rng(1).zipf(1.2, 3000) % 500
    want = replay_table(ids, [30, 120], ["lru", "lfu", "fa-lru", "opt"], batch=batch)
    for trace in (Trace([ids]), Trace([ids, np.empty(0, np.int64)], ["a", "b"])):
        got = [r for r in replay_shared(trace, [30, 120], ["lru", "lfu", "fa-lru", "opt"],
                                        batch=batch) if "request_share" not in r]  # fmt: skip
        assert len(got) == len(want)
        for g, w in zip(got, want):
            for key in ("policy", "cache_rows", *COUNTS, "hit_ratio", "floor_hit_ratio"):
                assert g[key] == w[key], key


def literal_lru(keys: list, size: int) -> list[bool]:
    """A fully associative LRU of ``size`` rows, an OrderedDict: whether each request hit."""
    lru: OrderedDict = OrderedDict()
    hit = []
    for key in keys:
        hit.append(key in lru)
        lru[key] = None
        lru.move_to_end(key)
        if len(lru) > size:
            lru.popitem(last=False)
    return hit


def reference_flags(policy: str, keys: list[int], size: int) -> list[bool]:
    """Whether each request hit under a reference policy: a model written apart from the
    policy's code, or for OPT (whose hit set is not unique) its own flags, checked in
    ``test_replay_bounds`` to be a schedule that fits and hits as often as Belady."""
    if policy == "fa-lru":
        return literal_lru(keys, size)
    if policy == "opt":
        flags = np.zeros((1, len(keys)), np.bool_)
        opt_hits(np.array(keys, np.int64), [size], hit_flags=flags)
        return flags[0].tolist()
    return MODELS[policy](keys, size)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_tables=st.integers(1, 5),
    skew=st.sampled_from([0.0, 1.0, 2.5]),
    policy=st.sampled_from(["opt", "fa-lru", "s3fifo", "wtinylfu", "lru", "lfu"]),
    batch=st.sampled_from([1, 16]),
    sizes=st.lists(st.integers(1, 80), min_size=1, max_size=3, unique=True),
)
def test_every_policy_attributes_each_tables_hits(seed, n_tables, skew, policy, batch, sizes):
    """Each table's lookups and hits are a brute-force model's, replayed with (table, id) keys
    written out here (the engine's policies: the cache model, ``batch`` ids a step; the
    reference ones: per request, whatever the batch); the tables add up to the cache."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 400))
    share = 1.0 / np.arange(1, n_tables + 1) ** skew  # table k gets a share ~ 1 / (k + 1)^skew
    tables = rng.choice(n_tables, n, p=share / share.sum())
    ids = rng.zipf(1.3, n) % rng.integers(5, 200, n_tables)[tables]
    names = [f"t{k}" for k in range(n_tables)]
    trace = Trace.from_requests(tables.astype(np.int64), ids.astype(np.int64), names)
    got = replay_shared(trace, sizes, [policy], ways=8, batch=batch)
    keys = [(t << 47) | i if n_tables > 1 else i for t, i in zip(tables.tolist(), ids.tolist())]
    requested = np.bincount(tables, minlength=n_tables).tolist()
    for size in sizes:
        mine = [r for r in got if r["policy"].split()[0] == policy and r["asked_rows"] == size]
        whole = [r for r in mine if r["table"] == "all"]
        per_table = {r["table"]: r for r in mine if "request_share" in r}
        assert len(whole) == 1 and list(per_table) == names
        if policy in ("lru", "lfu"):
            c, unique, hits = model_replay(tables, ids, size, 8, policy, batch)
            want_unique, want_hits = [[d[k] for k in range(n_tables)] for d in (unique, hits)]
            assert (whole[0]["unique"], whole[0]["hits"]) == (c["unique"], c["hits"])
        else:  # each request a lookup
            hit = np.array(reference_flags(policy, keys, size), np.bool_)
            want_unique = requested
            want_hits = np.bincount(tables[hit], minlength=n_tables).tolist()
            assert whole[0]["hits"] == int(hit.sum())
        assert [per_table[k]["hits"] for k in names] == want_hits
        assert [per_table[k]["unique"] for k in names] == want_unique
        assert [per_table[k]["requested"] for k in names] == requested
        for key in ("requested", "unique", "hits", "misses"):
            assert sum(r[key] for r in per_table.values()) == whole[0][key], key
        for k, name in enumerate(names):
            row = per_table[name]
            assert row["misses"] == row["unique"] - row["hits"]
            alone = ids[tables == k]
            if policy == "opt" and alone.size:  # no table hits more than OPT of it alone
                assert row["hits"] <= int(opt_hits(alone, [size])[0])


# The shared cache's hits under each reference policy at 10, 40 and 100 rows (whole cache, as
# replayed before the reference policies attributed: attribution changed none of them), then
# each table's (item, user, ad) at each size.
REFERENCE_GOLDEN = {
    "opt": ([514, 686, 707], [[159, 270, 85], [211, 347, 128], [220, 355, 132]]),
    "fa-lru": ([287, 593, 679], [[92, 147, 48], [184, 305, 104], [209, 345, 125]]),
    "s3fifo": ([441, 633, 686], [[142, 231, 68], [191, 323, 119], [211, 348, 127]]),
    "wtinylfu": ([423, 625, 683], [[129, 239, 55], [185, 326, 114], [210, 343, 130]]),
}


def test_reference_golden_counts_on_the_checked_in_trace(monkeypatch):
    """Pinned whole-cache and per-table hits of the reference policies; every replay is
    checked by check_attribution (counted here) before its rows are given."""
    checked = []
    check = shared.check_attribution
    monkeypatch.setattr(
        shared, "check_attribution", lambda r, *a: checked.append(r.policy) or check(r, *a)
    )
    trace = load_trace(SHARED, table_col="table")
    got = replay_shared(trace, [10, 40, 100], list(REFERENCE_GOLDEN), batch=1)
    assert checked == [p for p in REFERENCE_GOLDEN for _ in range(3)]
    for policy, (whole, per_table) in REFERENCE_GOLDEN.items():
        mine = [r for r in got if r["policy"] == policy]
        assert [r["hits"] for r in mine if r["table"] == "all"] == whole, policy
        tables = [[r["hits"] for r in mine if r["table"] == n and r["asked_rows"] == s]
                  for s in (10, 40, 100) for n in trace.names]  # fmt: skip
        assert [sum(tables[3 * k : 3 * k + 3], []) for k in range(3)] == per_table, policy


def test_fa_lru_per_table_against_a_literal_lru():
    rng = np.random.default_rng(5)
    tables, ids = rng.integers(0, 3, 2000), rng.integers(0, 60, 2000)
    trace = Trace.from_requests(tables, ids, ["a", "b", "c"])
    for size in (1, 17, 90):
        lru, hits = OrderedDict(), Counter()
        for t, i in zip(tables.tolist(), ids.tolist()):
            if (t, i) in lru:
                hits[t] += 1
                lru.move_to_end((t, i))
            else:
                lru[(t, i)] = None
                if len(lru) > size:
                    lru.popitem(last=False)
        whole, per_table = whole_and_tables(replay_shared(trace, [size], ["fa-lru"]), "fa-lru")
        assert [per_table[n]["hits"] for n in "abc"] == [hits[k] for k in range(3)]
        assert whole["hits"] == sum(hits.values())


def test_per_table_caches_are_separate_replays_of_split_sizes():
    """Each table's own cache, of its share of the size, is stepped with its requests of each
    batch of the shared replay (per request, at batch 1)."""
    rng = np.random.default_rng(2)
    tables = rng.choice(3, 6000, p=[0.2, 0.3, 0.5])
    ids = rng.zipf(1.1, 6000) % np.array([50, 400, 1000])[tables]
    trace = Trace.from_requests(tables, ids, ["s", "m", "l"])
    split = split_sizes(200, [np.unique(ids[tables == t]).size for t in range(3)])
    for batch in (1, 100):
        rows = replay_shared(trace, [200], ["lru", "opt"], batch=batch, per_table_cache=True)
        own = [r for r in rows if r["cache"] == "per-table"]
        for t, (name, size) in enumerate(zip(trace.names, split)):
            parts = [ids[a : a + batch][tables[a : a + batch] == t] for a in range(0, 6000, batch)]
            lru = replay_engine([p for p in parts if p.size], size, "lru", 32)
            opt = int(opt_hits(ids[tables == t], [size])[0])
            mine = {r["policy"][:3]: r for r in own if r["table"] == name}
            assert (mine["lru"]["cache_rows"], mine["lru"]["hits"]) == (lru.cache_rows, lru.hits)
            assert (mine["lru"]["unique"], mine["opt"]["hits"]) == (lru.unique, opt)
        for whole in (r for r in own if r["table"] == "all"):
            of = [r for r in own if r["table"] != "all" and r["policy"] == whole["policy"]]
            for key in ("cache_rows", *COUNTS):
                assert whole[key] == sum(r[key] for r in of), key


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10_000), st.lists(st.integers(0, 5000), min_size=1, max_size=30))
def test_split_sizes_add_up_in_proportion(size, weights):
    got = split_sizes(size, weights)
    nonzero = sum(w > 0 for w in weights)
    assert all(g == 0 for g, w in zip(got, weights) if w == 0)
    assert all(g >= 1 for g, w in zip(got, weights) if w > 0)
    if nonzero:
        assert size <= sum(got) <= size + nonzero
        total = sum(weights)
        for g, w in zip(got, weights):
            assert g <= max(1, math.ceil(size * w / total))


def test_keys_exact_and_hashed():
    tables = np.array([0, 1, 2, 1])
    ids = np.array([5, 5, 0, (1 << 47) - 1])
    keys, exact = table_keys(tables, ids, 3)
    assert exact and keys.tolist() == [5, (1 << 47) | 5, 2 << 47, (1 << 48) - 1]
    assert key_tables(keys, 3).tolist() == tables.tolist()
    wide = np.array([-1, 1 << 62, 7, 7], dtype=np.int64)
    keys, exact = table_keys(tables, wide, 3)
    assert not exact and (keys >= 0).all() and key_tables(keys, 3).tolist() == tables.tolist()
    assert keys[2] != keys[1] and np.unique(keys).size == 4
    many = np.arange(100_000, dtype=np.int64) * 7919 - (1 << 62)  # distinct ids of one table
    assert np.unique(table_keys(np.zeros_like(many), many, 2)[0]).size == many.size
    assert table_keys(tables, ids, 1)[0] is ids and KEY_SHIFT == 47


def test_attribution_check_names_a_mismatch():
    r = EngineResult("lru", 32, requests=10, unique=8, hits=3, misses=5)
    check_attribution(r, np.array([6, 4]), np.array([5, 3]), np.array([2, 1]))
    with pytest.raises(InternalError, match="hits sum to 4"):
        check_attribution(r, np.array([6, 4]), np.array([5, 3]), np.array([2, 2]))
    with pytest.raises(InternalError, match="more often than it looks up"):
        check_attribution(r, np.array([6, 4]), np.array([1, 7]), np.array([2, 1]))


def test_cli_replays_criteo_through_one_shared_cache(tmp_path, capsys):
    out = tmp_path / "r.csv"
    argv = ["replay", str(DATA / "criteo_sample.txt"), "--cache-rows", "20,60", "--batch", "1",
            "--policies", "lru,fa-lru,opt,s3fifo,wtinylfu", "--per-table-cache",
            "--csv", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "per table:" in text and "(table, id)" in text and "C26" in text
    per_table = text[text.index("per table:") :]
    for policy in ("s3fifo", "wtinylfu", "opt"):  # printed per table too
        assert sum(f" {policy} " in line for line in per_table.splitlines()) >= 2 * 26
    rows = list(csv.DictReader(open(out)))
    assert {r["cache"] for r in rows} == {"shared", "per-table"}
    trace = load_trace(DATA / "criteo_sample.txt")
    for policy in ("lru (32-way)", "fa-lru", "opt", "s3fifo", "wtinylfu"):  # all attribute
        for size in ("20", "60"):
            mine = [r for r in rows if (r["policy"], r["asked_rows"], r["cache"]) == (policy, size, "shared")]  # fmt: skip
            whole = [r for r in mine if r["table"] == "all"]
            tables = [r for r in mine if r["table"] != "all"]
            assert len(whole) == 1 and len(tables) == 26
            assert sum(int(r["hits"]) for r in tables) == int(whole[0]["hits"])
            assert [int(r["requested"]) for r in tables] == [t.size for t in trace.tables]


def test_cli_json_and_one_table_of_a_multi_table_trace(tmp_path, capsys):
    argv = ["replay", str(SHARED), "--table-col", "table", "--cache-rows", "10%",
            "--policies", "lru", "--batch", "32", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    whole = [r for r in data["rows"] if r["table"] == "all"]
    assert len(whole) == 1 and whole[0]["keys"] == "exact"
    assert whole[0]["asked_rows"] == math.floor(0.1 * (77 + 66 + 50))  # of all distinct keys
    shares = [r["request_share"] for r in data["rows"] if r["table"] != "all"]
    assert sum(shares) == pytest.approx(1.0)
    # --table: that table alone, in a cache of its own, as before
    assert main([*argv[:-1], "--table", "ad", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["rows"]
    assert [r["table"] for r in alone] == ["ad"] and "cache" not in alone[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    argv = ["replay", str(SHARED), "--table-col", "nope", "--policies", "lru"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err


@pytest.mark.parametrize("per_table_cache", [False, True])
def test_every_device_attributes_alike(device, per_table_cache):
    """On CUDA the engine's kernels step the shared cache: every row equals the CPU's."""
    trace = load_trace(SHARED, table_col="table")
    kw = dict(ways=8, batch=64, per_table_cache=per_table_cache)
    got = replay_shared(trace, [40, 100], ["lru", "lfu"], device=device, **kw)
    want = replay_shared(trace, [40, 100], ["lru", "lfu"], device="cpu", **kw)
    keys = ("table", "cache", "policy", "cache_rows", *COUNTS)
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
