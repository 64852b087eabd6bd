"""The table's options (``tierstore/config.py``): the configs' defaults and checks, the
deprecated flat keywords (same table, a warning that names the config), and the batch mode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore as ts
from tierstore.store import BatchMode

N, D = 300, 8


def _batches(seed: int, n: int = 4, rows: int = N):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, rows, (64,), generator=g), torch.arange(0, 64, 8)) for _ in range(n)]


def _train(emb, batches) -> None:
    for ids, offsets in batches:
        emb(ids, offsets).pow(2).sum().backward()


def _all_rows(emb, ids=None) -> torch.Tensor:
    ids = torch.arange(emb.num_embeddings) if ids is None else ids
    return emb.read_rows(ids, with_state=True)


# ------------------------------------------------------------------------------ defaults
def test_defaults_are_the_documented_ones(tmp_path):
    assert ts.CacheConfig() == ts.CacheConfig(rows=None, ways=32, policy="lru")
    ssd = ts.SSDConfig(tmp_path / "t")
    assert (ssd.host_rows, ssd.host_ways, ssd.block_rows, ssd.compression_level) == (
        None,
        32,
        None,
        None,
    )
    assert (ssd.map_size, ssd.io_threads, ssd.read_only) == (1 << 40, 4, False)
    assert ts.SSDConfig(str(tmp_path / "t")) == ssd  # the path is kept as a pathlib.Path

    emb = ts.TieredEmbeddingBag(N, D, device="cpu")  # L1: 20 % of the table, 32 ways, LRU
    assert emb.cache_config == ts.CacheConfig(rows=math.ceil(0.2 * N), ways=32, policy="lru")
    assert emb.ssd_config is None
    l1 = emb.store.l1
    assert (l1.ways, l1.policy.name) == (32, "lru")
    assert l1.capacity == math.ceil(math.ceil(0.2 * N) / 32) * 32


def test_a_new_ssd_table_takes_the_documented_block_format(tmp_path):
    from tierstore.ssd import SSDTier

    emb = ts.TieredEmbeddingBag(N, D, device="cpu", ssd=ts.SSDConfig(tmp_path / "t"))
    emb.close()
    meta = SSDTier.read_meta(tmp_path / "t")
    assert (meta["block_rows"], meta["compression_level"]) == (1, 3)
    assert emb.store.host.cache.ways == 32 and emb.store.host.cache.capacity == 1 << 16


# ------------------------------------------------------------------------------ refusals
BAD_CACHE = [
    ({"rows": 0}, "rows"),
    ({"rows": -5}, "rows"),
    ({"rows": 2.5}, "rows"),
    ({"rows": True}, "rows"),
    ({"rows": "100"}, "rows"),
    ({"ways": 0}, "ways"),
    ({"ways": 4.0}, "ways"),
    ({"policy": "fifo"}, "policy"),
    ({"policy": 3}, "policy"),
]
BAD_SSD = [
    ({"host_rows": 0}, "host_rows"),
    ({"host_rows": 1.5}, "host_rows"),
    ({"host_ways": 0}, "host_ways"),
    ({"block_rows": 3}, "block_rows"),
    ({"block_rows": 0}, "block_rows"),
    ({"block_rows": 1 << 17}, "block_rows"),
    ({"compression_level": 23}, "compression_level"),
    ({"compression_level": -8}, "compression_level"),
    ({"compression_level": 1.0}, "compression_level"),
    ({"map_size": 0}, "map_size"),
    ({"io_threads": 0}, "io_threads"),
    ({"read_only": "yes"}, "read_only"),
]


@pytest.mark.parametrize("kwargs, option", BAD_CACHE)
def test_a_bad_cache_option_is_refused_by_name(kwargs, option):
    with pytest.raises(ts.InvalidInputError, match=f"CacheConfig: {option}"):
        ts.CacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs, option", BAD_SSD)
def test_a_bad_ssd_option_is_refused_by_name(tmp_path, kwargs, option):
    with pytest.raises(ts.InvalidInputError, match=f"SSDConfig: {option}"):
        ts.SSDConfig(tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("path", [None, "", 5])
def test_an_ssd_config_needs_a_path(path):
    with pytest.raises(ts.InvalidInputError, match="SSDConfig: path"):
        ts.SSDConfig(path)


def test_ssd_options_after_the_path_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        ts.SSDConfig(tmp_path, 1024)


def test_numpy_integers_are_taken_as_ints():
    cache = ts.CacheConfig(rows=np.int64(40), ways=np.int32(8))
    ssd = ts.SSDConfig("t", host_rows=np.int64(1 << 20), block_rows=np.uint16(4))
    assert (cache.rows, cache.ways, ssd.host_rows, ssd.block_rows) == (40, 8, 1 << 20, 4)
    assert all(type(v) is int for v in (cache.rows, cache.ways, ssd.host_rows, ssd.block_rows))


def test_configs_are_frozen_values():
    cache = ts.CacheConfig(rows=10)
    with pytest.raises(AttributeError):
        cache.rows = 20
    assert cache == ts.CacheConfig(10) and hash(cache) == hash(ts.CacheConfig(10))


@given(
    rows=st.integers(1, 10_000), ways=st.integers(1, 128), policy=st.sampled_from(["lru", "lfu"])
)
@settings(max_examples=30, deadline=None)
def test_good_cache_options_are_kept_as_given(rows, ways, policy):
    cache = ts.CacheConfig(rows=rows, ways=ways, policy=policy)
    assert (cache.rows, cache.ways, cache.policy) == (rows, ways, policy)


@given(block=st.integers(0, 16), level=st.integers(-7, 22), host_rows=st.integers(1, 1 << 40))
@settings(max_examples=30, deadline=None)
def test_good_ssd_options_are_kept_as_given(block, level, host_rows):
    ssd = ts.SSDConfig("t", host_rows=host_rows, block_rows=1 << block, compression_level=level)
    assert (ssd.host_rows, ssd.block_rows, ssd.compression_level) == (host_rows, 1 << block, level)


def test_an_unbounded_table_needs_cache_rows_and_makes_no_directory_without(tmp_path):
    with pytest.raises(ts.InvalidInputError, match=r"CacheConfig\(rows="):
        ts.TieredEmbeddingBag(None, D, device="cpu", ssd=ts.SSDConfig(tmp_path / "t"))
    assert not (tmp_path / "t").exists()  # refused before the SSD tier is made
    with pytest.raises(ts.InvalidInputError, match="SSD tier"):
        ts.TieredEmbeddingBag(None, D, device="cpu", cache=ts.CacheConfig(rows=8))


def test_an_existing_tables_block_format_is_checked(tmp_path):
    ssd = ts.SSDConfig(tmp_path / "t", block_rows=4, compression_level=0)
    ts.TieredEmbeddingBag(N, D, device="cpu", ssd=ssd).close()
    again = ts.TieredEmbeddingBag.open(ts.SSDConfig(tmp_path / "t", block_rows=4))
    assert again.store.host.ssd.block_rows == 4
    again.close()
    with pytest.raises(ts.TableMismatchError, match="block_rows=4, not 8"):
        ts.TieredEmbeddingBag.open(ts.SSDConfig(tmp_path / "t", block_rows=8))


# ------------------------------------------------------------------------------ flat keywords
def _warned(fn, *names):
    """``fn()`` under a check that it warns once, DeprecationWarning, naming ``names``, the
    config to use, and this file as the place of the call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    message = str(deprecations[0].message)
    for name in names:
        assert name in message
    assert "Config(" in message
    return out, deprecations[0]


@given(
    rows=st.integers(1, N),
    ways=st.integers(1, 40),
    policy=st.sampled_from(["lru", "lfu"]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=8, deadline=None)
def test_flat_cache_keywords_give_the_same_table_with_a_warning(rows, ways, policy, seed):
    batches = _batches(seed)
    old, w = _warned(
        lambda: ts.TieredEmbeddingBag(
            N, D, mode="sum", cache_rows=rows, ways=ways, policy=policy, device="cpu",
            optimizer=ts.Adagrad(lr=0.1), seed=seed,
        ),
        "cache_rows", "ways", "policy", "CacheConfig(rows=..., ways=..., policy=...)",
    )  # fmt: skip
    assert w.filename == __file__  # the warning points at the caller's line
    new = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache=ts.CacheConfig(rows=rows, ways=ways, policy=policy),
        device="cpu", optimizer=ts.Adagrad(lr=0.1), seed=seed,
    )  # fmt: skip
    assert old.cache_config == new.cache_config
    _train(old, batches)
    _train(new, batches)
    assert torch.equal(_all_rows(old), _all_rows(new))
    assert old.stats() == new.stats()


def test_flat_ssd_keywords_give_the_same_table_with_a_warning(tmp_path):
    batches = _batches(7)
    flat = dict(host_rows=256, host_ways=8, block_rows=4, compression_level=1, io_threads=2)
    old, _ = _warned(
        lambda: ts.TieredEmbeddingBag(
            N, D, mode="sum", cache_rows=32, path=tmp_path / "old", device="cpu", **flat
        ),
        "path", "host_rows", "block_rows", "ssd=ts.SSDConfig(path, ",
    )  # fmt: skip
    new = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache=ts.CacheConfig(rows=32), device="cpu",
        ssd=ts.SSDConfig(tmp_path / "new", **flat),
    )  # fmt: skip
    assert old.ssd_config == ts.SSDConfig(tmp_path / "old", **flat)
    assert new.ssd_config == ts.SSDConfig(tmp_path / "new", **flat)
    _train(old, batches)
    _train(new, batches)
    assert torch.equal(_all_rows(old), _all_rows(new))
    assert old.stats() == new.stats()
    old.close(flush=True)
    new.close(flush=True)

    # reopened read-only, by the flat keywords and by the config: the same rows
    flat_open, _ = _warned(
        lambda: ts.TieredEmbeddingBag.open(
            tmp_path / "old", cache_rows=16, host_rows=512, read_only=True
        ),
        "read_only", "open(ts.SSDConfig(path, ",
    )  # fmt: skip
    config_open = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "new", host_rows=512, read_only=True),
        cache=ts.CacheConfig(rows=16),
    )
    assert flat_open.ssd_config.read_only and config_open.ssd_config.read_only
    assert torch.equal(_all_rows(flat_open), _all_rows(config_open))
    with pytest.raises(ts.ReadOnlyTableError):
        config_open.flush()
    flat_open.close()
    config_open.close()


def test_flat_keywords_of_from_pretrained_give_the_same_table():
    w = torch.randn(N, D)
    old, _ = _warned(
        lambda: ts.TieredEmbeddingBag.from_pretrained(
            w, freeze=False, cache_rows=20, policy="lfu", device="cpu"
        ),
        "cache_rows",
    )
    new = ts.TieredEmbeddingBag.from_pretrained(
        w, freeze=False, cache=ts.CacheConfig(rows=20, policy="lfu"), device="cpu"
    )
    assert torch.equal(old.weight, w) and torch.equal(new.weight, w)
    _train(old, _batches(3))
    _train(new, _batches(3))
    assert torch.equal(_all_rows(old), _all_rows(new))


def test_flat_keywords_at_their_old_defaults_without_a_path_are_harmless():
    emb, _ = _warned(
        lambda: ts.TieredEmbeddingBag(
            N, D, device="cpu", path=None, host_ways=32, io_threads=4, read_only=False
        ),
        "host_ways",
    )
    assert emb.ssd_config is None


def test_flat_keywords_are_refused_where_they_contradict():
    with pytest.warns(DeprecationWarning), pytest.raises(ts.InvalidInputError, match="not both"):
        ts.TieredEmbeddingBag(N, D, device="cpu", cache=ts.CacheConfig(), cache_rows=10)
    with pytest.warns(DeprecationWarning), pytest.raises(ts.InvalidInputError, match="SSD tier"):
        ts.TieredEmbeddingBag(N, D, device="cpu", host_rows=1024)
    with pytest.warns(DeprecationWarning), pytest.raises(ts.InvalidInputError, match="ways"):
        ts.TieredEmbeddingBag(N, D, device="cpu", ways=0)  # a flat value is checked as its field


def test_an_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="cache_size"):
        ts.TieredEmbeddingBag(N, D, device="cpu", cache_size=10)
    with pytest.raises(TypeError, match="seed"):
        ts.TieredEmbeddingBag.open(tmp_path, seed=1)  # a table's seed is its own
    with pytest.raises(TypeError, match="path"):
        ts.TieredEmbeddingBag.open(tmp_path, path=tmp_path)


def test_open_with_a_config_and_flat_ssd_keywords_is_refused(tmp_path):
    ts.TieredEmbeddingBag(N, D, device="cpu", ssd=ts.SSDConfig(tmp_path / "t")).close()
    with pytest.warns(DeprecationWarning), pytest.raises(ts.InvalidInputError, match="not both"):
        ts.TieredEmbeddingBag.open(ts.SSDConfig(tmp_path / "t"), host_rows=1 << 16)


# ------------------------------------------------------------------------------ the batch mode
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_an_eval_lookup_leaves_the_cache_as_a_train_lookup_and_release(policy):
    """EVAL (no backward follows) and TRAIN differ in what the batch holds until its release,
    never in the cache's state after it."""
    tables = [
        ts.TieredEmbeddingBag(
            N, D, device="cpu", cache=ts.CacheConfig(rows=40, ways=8, policy=policy)
        )
        for _ in range(2)
    ]
    for ids, _ in _batches(11, n=6):
        for emb, mode in zip(tables, (BatchMode.TRAIN, BatchMode.EVAL), strict=True):
            batch = emb.store.lookup(ids, None, mode)
            assert torch.equal(batch.ids, torch.unique(ids))
            emb.store.release(batch)
    a, b = (emb.store.l1 for emb in tables)
    assert torch.equal(a.tags, b.tags) and torch.equal(a.counters, b.counters)
    assert not bool(a.locks.any()) and not bool(b.locks.any())


def test_the_batch_mode_says_whether_a_backward_follows():
    assert BatchMode.TRAIN.backward and not BatchMode.EVAL.backward
    assert list(BatchMode) == [BatchMode.TRAIN, BatchMode.EVAL]


def test_a_collections_flat_keywords_give_the_same_collection_with_a_warning(tmp_path):
    """The collection's keywords of issue 27 (``cache_rows``, ``ways``, ``policy``,
    ``host_rows``, ``path``, ``ssd_options``) fold into the configs, with the warning."""
    tables = [
        ts.TableConfig(name="a", embedding_dim=8, num_embeddings=200),
        ts.TableConfig(name="b", embedding_dim=4, num_embeddings=90),
    ]
    opts = dict(optimizer=ts.Adagrad(lr=0.2), device="cpu")
    old, _ = _warned(
        lambda: ts.TieredEmbeddingBagCollection(
            tables, cache_rows=20, ways=4, policy="lfu", host_rows=120, path=tmp_path / "old",
            ssd_options={"block_rows": 4}, **opts,
        ),
        "cache_rows", "block_rows", "cache=ts.CacheConfig(",
    )  # fmt: skip
    new = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=20, ways=4, policy="lfu"),
        ssd=ts.SSDConfig(tmp_path / "new", host_rows=120, block_rows=4), **opts,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        lengths = torch.randint(0, 4, (2, 12), generator=gen)  # (feature, sample), empty bags too
        values = torch.cat([torch.randint(0, 200, (int(lengths[0].sum()),), generator=gen),
                            torch.randint(0, 90, (int(lengths[1].sum()),), generator=gen)])  # fmt: skip
        lengths = lengths.flatten()
        for col in (old, new):
            col(keys=["a", "b"], values=values, lengths=lengths).values().sum().backward()
    for name, n in (("a", 200), ("b", 90)):
        assert torch.equal(
            old.read_rows(name, torch.arange(n)), new.read_rows(name, torch.arange(n))
        )
    assert old.stats() == new.stats()
    old.close()
    new.close()
