"""TieredEmbeddingBagCollection against one TieredEmbeddingBag per table, and against
torch.nn.EmbeddingBag with torch.optim.SGD, on the CPU backend."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore as ts
from tierstore.errors import InvalidInputError, NotATableError, TableMismatchError

OPTIMIZERS = [ts.SGD(lr=0.1), ts.Adagrad(lr=0.05), ts.RowWiseAdagrad(lr=0.05)]


# ---------------------------------------------------------------------------- helpers
def make_batch(gen, tables, batch_size, max_len=4, weighted=False):
    """Per feature (configured order): (ids (n_f,), lengths (B,), weights (n_f,) or None)."""
    out = {}
    for t in tables:
        for f in t.feature_names:
            lengths = torch.randint(0, max_len + 1, (batch_size,), generator=gen)
            if batch_size:
                lengths[0] = 0  # always one empty bag
            n = int(lengths.sum())
            rows = t.num_embeddings
            # skewed ids with repeats: a few hot rows and a tail
            hot = torch.randint(0, min(rows, 3), (n,), generator=gen)
            cold = torch.randint(0, rows, (n,), generator=gen)
            ids = torch.where(torch.rand(n, generator=gen) < 0.5, hot, cold)
            w = torch.rand(n, generator=gen) + 0.5 if weighted else None
            out[f] = (ids, lengths, w)
    return out


def as_keyword(batch, order):
    """The batch as keys/values/lengths/weights, features in ``order`` (feature-major)."""
    values = torch.cat([batch[f][0] for f in order])
    lengths = torch.cat([batch[f][1] for f in order])
    weighted = batch[order[0]][2] is not None
    weights = torch.cat([batch[f][2] for f in order]) if weighted else None
    return dict(keys=list(order), values=values, lengths=lengths, weights=weights)


def reference_modules(tables, optimizer, cache_rows=None, weighted=False):
    """One TieredEmbeddingBag per table, with the table's seed and init scale (in mode "sum"
    for a weighted mean table: see reference_forward)."""
    refs = {}
    for t in tables:
        n = t.num_embeddings
        refs[t.name] = ts.TieredEmbeddingBag(
            num_embeddings=n,
            embedding_dim=t.embedding_dim,
            mode="sum" if weighted else t.pooling,
            cache=ts.CacheConfig(rows=cache_rows or n, ways=4),
            optimizer=t.optimizer or optimizer,
            device="cpu",
            seed=t.seed,
            init_scale=t.init_scale,
        )
    return refs


def reference_forward(refs, tables, batch):
    """Each feature's (B, D) from its table's own module: one call per table, its features'
    bags concatenated (so that the optimizer sees each row's gradient summed once)."""
    outs = {}
    for t in tables:
        ids = torch.cat([batch[f][0] for f in t.feature_names])
        lengths = torch.cat([batch[f][1] for f in t.feature_names])
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        weighted = batch[t.feature_names[0]][2] is not None
        psw = torch.cat([batch[f][2] for f in t.feature_names]) if weighted else None
        if t.pooling == "mean" and psw is not None:
            # documented: a weighted mean bag is the sum of its weighted ids over its length
            per_id = torch.repeat_interleave(1.0 / lengths.clamp(min=1).float(), lengths)
            y = refs[t.name](ids, offsets, psw * per_id)
        else:
            y = refs[t.name](ids, offsets, psw)
        b = batch[t.feature_names[0]][1].numel()
        for j, f in enumerate(t.feature_names):
            outs[f] = y[j * b : (j + 1) * b]
    return outs


def all_rows(col, t):
    return col.read_rows(t.name, torch.arange(t.num_embeddings), with_state=True)


def snapshot(col):
    """Everything a refused call must leave alone: every table's rows and state, and every
    group's cache state and counters."""
    out = [all_rows(col, t) for t in col.tables]
    for g in col.groups:
        l1 = g.store.l1
        out += [l1.tags.clone(), l1.stamps.clone(), l1.locks.clone(), l1.dirty.clone()]
        out += [l1.counters.clone(), torch.tensor(l1.step)]
    out.append(torch.tensor(list(col.stats().requested.values())))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------- equality
@st.composite
def collections(draw):
    n_tables = draw(st.integers(1, 4))
    tables = []
    for i in range(n_tables):
        n_feat = draw(st.integers(1, 2))
        tables.append(
            ts.TableConfig(
                name=f"t{i}",
                embedding_dim=draw(st.sampled_from([4, 8, 12])),
                num_embeddings=draw(st.integers(1, 40)),
                feature_names=[f"t{i}f{j}" for j in range(n_feat)],
                pooling=draw(st.sampled_from(["sum", "mean"])),
                seed=draw(st.integers(0, 5)),
                # some tables bring their own optimizer (their own group)
                optimizer=draw(st.sampled_from([None, None, ts.SGD(lr=0.3)])),
            )
        )
    return tables


@settings(max_examples=30, deadline=None)
@given(
    tables=collections(),
    opt=st.sampled_from(OPTIMIZERS),
    cache_frac=st.floats(0.0, 1.0),
    batch_size=st.integers(0, 5),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_one_module_per_table(tables, opt, cache_frac, batch_size, weighted, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(t.num_embeddings for t in tables)
    groups = len({(t.embedding_dim, t.optimizer or opt) for t in tables})
    cache_rows = max(groups, int(cache_frac * total))
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=cache_rows, ways=4), optimizer=opt, device="cpu"
    )
    refs = reference_modules(tables, opt, weighted=weighted)
    for t in tables:  # the same initial rows: each table's from its own seed
        assert torch.equal(
            all_rows(col, t), refs[t.name].read_rows(torch.arange(t.num_embeddings), True)
        )
    features = [f for t in tables for f in t.feature_names]
    for _ in range(3):
        batch = make_batch(gen, tables, batch_size, weighted=weighted)
        order = [features[i] for i in torch.randperm(len(features), generator=gen)]
        kw = as_keyword(batch, order)
        if weighted:
            kw["weights"].requires_grad_(True)
        kt = col(**kw)
        assert kt.keys() == features
        assert kt.values().shape == (
            batch_size,
            sum(col._feature_table[f].embedding_dim for f in features),
        )
        ref_batch = {f: (i, ln, None if w is None else w.detach().clone().requires_grad_(True))
                     for f, (i, ln, w) in batch.items()}  # fmt: skip
        want = reference_forward(refs, tables, ref_batch)
        got = kt.to_dict()
        grads = {f: torch.randn(want[f].shape, generator=gen) for f in features}
        for f in features:
            torch.testing.assert_close(got[f], want[f], rtol=1e-6, atol=1e-6)
        torch.autograd.backward([got[f] for f in features], [grads[f] for f in features])
        torch.autograd.backward([want[f] for f in features], [grads[f] for f in features])
        if weighted:  # the per-sample weights' gradients, feature by feature
            start = 0
            for f in order:
                n = batch[f][0].numel()
                torch.testing.assert_close(
                    kw["weights"].grad[start : start + n],
                    ref_batch[f][2].grad,
                    rtol=1e-5,
                    atol=1e-5,
                )
                start += n
    for t in tables:  # the trained rows and their optimizer state
        want_rows = refs[t.name].read_rows(torch.arange(t.num_embeddings), with_state=True)
        torch.testing.assert_close(all_rows(col, t), want_rows, rtol=1e-5, atol=1e-6)
    stats = col.stats()
    assert sum(stats.requested.values()) == stats.overall.requested
    assert stats.overall.hits + stats.overall.misses == stats.overall.unique


@pytest.mark.parametrize("features_per_table", [1, 2])
def test_uniform_group_is_bitwise_equal(features_per_table):
    """Tables that pool alike and share one group train bitwise as one module each: with one
    feature a table, the group's bags are sample-major (its output needs no transposing copy),
    with two, feature-major."""
    gen = torch.Generator().manual_seed(0)
    tables = [
        ts.TableConfig(
            name=f"t{i}",
            embedding_dim=8,
            num_embeddings=30 + i,
            feature_names=[f"a{i}", f"b{i}"][:features_per_table],
        )  # fmt: skip
        for i in range(3)
    ]
    opt = ts.RowWiseAdagrad(lr=0.1)
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=5, ways=2), optimizer=opt, device="cpu"
    )
    assert len(col.groups) == 1
    assert col.groups[0].sample_major == (features_per_table == 1)
    refs = reference_modules(tables, opt, cache_rows=3)
    features = [f for t in tables for f in t.feature_names]
    for _ in range(4):
        batch = make_batch(gen, tables, 6, max_len=5)
        kt = col(**as_keyword(batch, features))
        want = reference_forward(refs, tables, batch)
        grad = {f: torch.randn(6, 8, generator=gen) for f in features}
        for f in features:
            assert torch.equal(kt[f], want[f])
        kt.values().backward(torch.cat([grad[f] for f in features], 1))
        torch.autograd.backward([want[f] for f in features], [grad[f] for f in features])
    for t in tables:
        assert torch.equal(
            all_rows(col, t), refs[t.name].read_rows(torch.arange(t.num_embeddings), True)
        )


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_matches_nn_embedding_bag_and_torch_sgd(pooling):
    gen = torch.Generator().manual_seed(1)
    tables = [
        ts.TableConfig(name="big", embedding_dim=16, num_embeddings=200, pooling=pooling),
        ts.TableConfig(
            name="small", embedding_dim=16, num_embeddings=7, feature_names=["s1", "s2"]
        ),
        ts.TableConfig(name="wide", embedding_dim=32, num_embeddings=50, pooling=pooling),
    ]
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=24, ways=4), optimizer=ts.SGD(lr=0.2), device="cpu"
    )
    refs = {
        t.name: torch.nn.EmbeddingBag.from_pretrained(
            col.read_rows(t.name, torch.arange(t.num_embeddings)),
            mode=t.pooling,
            freeze=False,
            sparse=True,
        )
        for t in tables
    }
    sgd = torch.optim.SGD([p for m in refs.values() for p in m.parameters()], lr=0.2)
    features = col.feature_keys
    for _ in range(5):
        batch = make_batch(gen, tables, 8, max_len=6)
        kt = col(**as_keyword(batch, features))
        sgd.zero_grad()
        want = reference_forward(refs, tables, batch)
        grad = torch.randn(kt.values().shape, generator=gen)
        torch.testing.assert_close(kt.values(), torch.cat([want[f] for f in features], 1))
        kt.values().backward(grad)
        torch.cat([want[f] for f in features], 1).backward(grad)
        sgd.step()
    for t in tables:
        torch.testing.assert_close(
            col.read_rows(t.name, torch.arange(t.num_embeddings)), refs[t.name].weight.detach(),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip


# ---------------------------------------------------------------------------- input forms
class FakeKJT:
    """What the collection reads of torchrec's KeyedJaggedTensor."""

    def __init__(self, keys, values, lengths, weights=None):
        self._k, self._v, self._l, self._w = keys, values, lengths, weights

    def keys(self):
        return self._k

    def values(self):
        return self._v

    def lengths(self):
        return self._l

    def weights_or_none(self):
        return self._w


def small_collection(item_dim=4, **kw):
    """Two tables, in two groups (or with ``item_dim=8``, one)."""
    tables = [
        ts.TableConfig(name="user", embedding_dim=8, num_embeddings=20),
        ts.TableConfig(
            name="item",
            embedding_dim=item_dim,
            num_embeddings=10,
            feature_names=["item", "last"],
            pooling="mean",
        ),
    ]
    return ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=8, ways=2), device="cpu", **kw
    )


def test_input_forms_agree():
    col = small_collection(optimizer=None)
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(gen, col.tables, 4)
    order = ["last", "user", "item"]
    kw = as_keyword(batch, order)
    want = col(**kw).values()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), kw["lengths"].cumsum(0)])
    by_offsets = col(keys=order, values=kw["values"], offsets=offsets).values()
    by_kjt = col(FakeKJT(order, kw["values"].int(), kw["lengths"].int())).values()
    as_dict = {}
    for f in order:
        ids, lengths, _ = batch[f]
        as_dict[f] = (ids, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]))
    by_dict = col(as_dict).values()
    for got in (by_offsets, by_kjt, by_dict):
        assert torch.equal(got, want)
    weighted = make_batch(gen, col.tables, 4, weighted=True)  # weights: keyword, KJT and dict
    kw = as_keyword(weighted, order)
    want = col(**kw).values()
    assert torch.equal(
        col(FakeKJT(order, kw["values"], kw["lengths"], kw["weights"])).values(), want
    )
    as_dict = {}
    for f in order:
        ids, lengths, w = weighted[f]
        as_dict[f] = (
            ids,
            torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]),
            w,
        )
    assert torch.equal(col(as_dict).values(), want)
    two_d = {f: torch.randint(0, 10, (4, 3), generator=gen) for f in order}
    kt = col(two_d)
    for f in order:
        t = col._feature_table[f]
        ref = torch.nn.EmbeddingBag.from_pretrained(
            col.read_rows(t.name, torch.arange(t.num_embeddings)), mode=t.pooling
        )
        torch.testing.assert_close(kt[f], ref(two_d[f]))


def test_real_keyed_jagged_tensor():
    kjt_module = pytest.importorskip("torchrec.sparse.jagged_tensor")
    col = small_collection(optimizer=None)
    gen = torch.Generator().manual_seed(9)
    kw = as_keyword(make_batch(gen, col.tables, 3, weighted=True), ["item", "user", "last"])
    kjt = kjt_module.KeyedJaggedTensor(
        keys=kw["keys"], values=kw["values"], lengths=kw["lengths"], weights=kw["weights"]
    )
    assert torch.equal(col(kjt).values(), col(**kw).values())


def test_keyed_tensor_views_are_differentiable():
    v = torch.randn(3, 12, requires_grad=True)
    kt = ts.KeyedTensor(["a", "b"], [4, 8], v)
    assert kt.offset_per_key() == [0, 4, 12] and kt.length_per_key() == [4, 8]
    kt.to_dict()["b"].sum().backward()
    assert torch.equal(v.grad, torch.cat([torch.zeros(3, 4), torch.ones(3, 8)], 1))
    with pytest.raises(KeyError):
        kt["c"]


def test_empty_batch_and_all_empty_bags():
    col = small_collection()
    kt = col(
        keys=["user", "item", "last"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(0, dtype=torch.int64),
    )
    assert kt.values().shape == (0, 16)
    kt = col(
        keys=["user", "item", "last"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(6, dtype=torch.int64),
    )
    assert torch.equal(kt.values(), torch.zeros(2, 16))
    kt.values().sum().backward()


def test_prefetch_then_forward():
    col, ref = small_collection(), small_collection()
    gen = torch.Generator().manual_seed(4)
    batches = [as_keyword(make_batch(gen, col.tables, 5), col.feature_keys) for _ in range(3)]
    for b in batches:
        col.prefetch(**b)
    for b in batches:
        got, want = col(**b), ref(**b)
        assert torch.equal(got.values(), want.values())
        got.values().sum().backward()
        want.values().sum().backward()
    for t in col.tables:
        assert torch.equal(all_rows(col, t), all_rows(ref, t))
    col.prefetch(**batches[0])
    with pytest.raises(InvalidInputError, match="prefetched"):
        col(**batches[1])


def test_read_and_write_rows():
    col = small_collection()
    vals = torch.randn(3, 4)
    col.write_rows("item", torch.tensor([9, 0, 4]), vals)
    assert torch.equal(col.read_rows("item", torch.tensor([9, 0, 4])), vals)
    user_before = col.read_rows("user", torch.arange(20))
    col.write_rows("item", torch.tensor([1]), torch.ones(1, 4))
    assert torch.equal(col.read_rows("user", torch.arange(20)), user_before)  # tables apart
    with pytest.raises(InvalidInputError, match="'item'.*\\[0, 10\\)"):
        col.read_rows("item", torch.tensor([10]))
    with pytest.raises(InvalidInputError, match="no table named 'nope'"):
        col.read_rows("nope", torch.tensor([0]))
    with pytest.raises(InvalidInputError, match="shape"):
        col.write_rows("user", torch.tensor([0]), torch.ones(1, 4))


def test_initial_rows_follow_the_table_seed():
    t = ts.TableConfig(name="x", embedding_dim=8, num_embeddings=50, seed=7, init_scale=0.3)
    col = ts.TieredEmbeddingBagCollection(
        [ts.TableConfig(name="w", embedding_dim=8, num_embeddings=13), t],
        cache=ts.CacheConfig(rows=4),
        device="cpu",
    )
    emb = ts.TieredEmbeddingBag(
        num_embeddings=50, embedding_dim=8, mode="sum", seed=7, init_scale=0.3, device="cpu"
    )
    assert torch.equal(col.read_rows("x", torch.arange(50)), emb.read_rows(torch.arange(50)))
    # default seeds differ between tables (they come from the names)
    a = ts.TableConfig(name="a", embedding_dim=8, num_embeddings=5)
    b = ts.TableConfig(name="b", embedding_dim=8, num_embeddings=5)
    col2 = ts.TieredEmbeddingBagCollection([a, b], cache=ts.CacheConfig(rows=2), device="cpu")
    assert not torch.equal(
        col2.read_rows("a", torch.arange(5)), col2.read_rows("b", torch.arange(5))
    )


def test_cache_rows_split_in_proportion():
    tables = [
        ts.TableConfig(name="a", embedding_dim=4, num_embeddings=300),
        ts.TableConfig(name="b", embedding_dim=8, num_embeddings=100),
        ts.TableConfig(name="c", embedding_dim=4, num_embeddings=600),
    ]
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=100, ways=1), device="cpu"
    )
    caps = {g.name: g.store.l1.capacity for g in col.groups}
    assert caps == {"dim4-sgd": 90, "dim8-sgd": 10}
    shares = ts.collection.split_rows(10, [1, 1, 1])
    assert sum(shares) == 10 and sorted(shares) == [3, 3, 4]
    assert ts.collection.split_rows(3, [1000, 1, 1]) == [1, 1, 1]  # every group gets a row


# ---------------------------------------------------------------------------- bad input
BAD_BATCHES = [
    (dict(keys=["user", "item", "last", "extra"]), "'extra' is not a feature"),
    (dict(keys=["user", "item"]), "lacks feature 'last' \\(table 'item'\\)"),
    (dict(keys=["user", "item", "item"]), "'item' appears twice"),
    (dict(lengths=torch.tensor([1, 1, 1, 1, 1, 0])), "sum to 5 ids but values holds 6"),
    (dict(lengths=torch.tensor([1, 1, 1, 1, 2])), "not a multiple of the 3 features"),
    (
        dict(lengths=torch.tensor([1, 1, 3, -1, 1, 1])),
        "feature 'item' \\(table 'item'\\): lengths must be >= 0",
    ),
    (
        dict(values=torch.tensor([1, 2, 3, 4, 10, 6])),
        "feature 'last' \\(table 'item'\\): ids must be in \\[0, 10\\), found 10",
    ),
    (dict(values=torch.tensor([1, -2, 3, 4, 5, 6])), "feature 'user' \\(table 'user'\\).*found -2"),
    (dict(values=torch.tensor([1.0, 2, 3, 4, 5, 6])), "values must be int32 or int64"),
    (dict(weights=torch.ones(5)), "weights must have one entry per id"),
    (dict(weights=torch.ones(6, dtype=torch.float64)), "weights must be float32"),
]


@pytest.mark.parametrize("one_group", [False, True])  # checks read at once / before a change
@pytest.mark.parametrize("change,message", BAD_BATCHES)
def test_bad_batch_changes_nothing(change, message, one_group):
    col = small_collection(item_dim=8 if one_group else 4)
    assert len(col.groups) == (1 if one_group else 2)
    gen = torch.Generator().manual_seed(5)
    good = dict(
        keys=["user", "item", "last"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 1, 2, 0, 1, 1]),
    )
    col(**as_keyword(make_batch(gen, col.tables, 3), col.feature_keys)).values().sum().backward()
    before = snapshot(col)
    with pytest.raises(InvalidInputError, match=message):
        col(**{**good, **change})
    with pytest.raises(InvalidInputError, match=message):
        col.prefetch(**{**good, **change})
    assert_same(before, snapshot(col))
    col(**good).values().sum().backward()  # and it still works


@pytest.mark.parametrize("one_group", [False, True])
def test_bad_dict_batches(one_group):
    col = small_collection(item_dim=8 if one_group else 4)
    before = snapshot(col)
    z = torch.tensor([0])
    cases = [
        (
            {"user": (torch.tensor([1, 2]), torch.tensor([0, 1])), "item": (z, z), "last": (z, z)},
            "feature 'item' has a batch size of 1 but feature 'user' has 2",
        ),
        (
            {"user": (torch.tensor([1, 2]), torch.tensor([1])), "item": (z, z), "last": (z, z)},
            "feature 'user': offsets\\[0\\] must be 0",
        ),
        (
            {
                "user": (torch.tensor([1, 2]), torch.tensor([0, 3])),
                "item": (z, torch.tensor([0, 0])),
                "last": (z, torch.tensor([0, 0])),
            },
            "'user'.*non-decreasing",
        ),
        ({"user": (z, z), "item": (z, z)}, "lacks feature 'last'"),
    ]
    for batch, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            col(batch)
        with pytest.raises(InvalidInputError, match=message):
            col.prefetch(batch)
    assert_same(before, snapshot(col))


def test_bad_configs():
    with pytest.raises(
        InvalidInputError, match="table 'x': embedding_dim must be a positive multiple of 4"
    ):
        ts.TableConfig(name="x", embedding_dim=6, num_embeddings=10)
    with pytest.raises(InvalidInputError, match="pooling"):
        ts.TableConfig(name="x", embedding_dim=8, num_embeddings=10, pooling="max")
    a = ts.TableConfig(name="a", embedding_dim=8, num_embeddings=10)
    with pytest.raises(InvalidInputError, match="two tables are named 'a'"):
        ts.TieredEmbeddingBagCollection([a, a], device="cpu")
    b = ts.TableConfig(name="b", embedding_dim=8, num_embeddings=10, feature_names=["a"])
    with pytest.raises(
        InvalidInputError, match="feature 'a' of table 'b' is also a feature of table 'a'"
    ):
        ts.TieredEmbeddingBagCollection([a, b], device="cpu")
    u = ts.TableConfig(name="u", embedding_dim=8, num_embeddings=None)
    with pytest.raises(InvalidInputError, match="table 'u': num_embeddings=None"):
        ts.TieredEmbeddingBagCollection([u], cache=ts.CacheConfig(rows=4), device="cpu")


# ---------------------------------------------------------------------------- SSD tier
def ssd_tables():
    return [
        ts.TableConfig(name="ids", embedding_dim=8, num_embeddings=None, feature_names=["uid"]),
        ts.TableConfig(name="cat", embedding_dim=8, num_embeddings=30),
        ts.TableConfig(name="wide", embedding_dim=16, num_embeddings=40, pooling="mean"),
    ]


def test_ssd_collection_trains_flushes_and_reopens(tmp_path):
    path = tmp_path / "col"
    opt = ts.RowWiseAdagrad(lr=0.1)
    tables = ssd_tables()
    col = ts.TieredEmbeddingBagCollection(
        tables,
        cache=ts.CacheConfig(rows=8, ways=2),
        ssd=ts.SSDConfig(path, host_rows=64),
        optimizer=opt,
        device="cpu",
    )
    ref = ts.TieredEmbeddingBag(num_embeddings=None, embedding_dim=8, mode="sum",
                                cache=ts.CacheConfig(rows=4), ssd=ts.SSDConfig(tmp_path / "ref"),
                                optimizer=opt, device="cpu", seed=tables[0].seed,
                                init_scale=tables[0].init_scale)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    big = torch.tensor([0, 5, 2**40, 2**47 - 1, 123456789])
    for _ in range(4):
        uid = big[torch.randint(0, 5, (6,), generator=gen)]
        kt = col(keys=["uid", "cat", "wide"], values=torch.cat([uid, torch.randint(0, 30, (3,), generator=gen), torch.randint(0, 40, (3,), generator=gen)]),
                 lengths=torch.tensor([2, 2, 2, 1, 1, 1, 1, 1, 1]))  # fmt: skip
        want = ref(uid, torch.tensor([0, 2, 4]))
        assert torch.equal(kt["uid"], want)
        kt.values().sum().backward()
        want.sum().backward()
    assert torch.equal(col.read_rows("ids", big, True), ref.read_rows(big, True))
    saved = {
        t.name: col.read_rows(
            t.name, big if t.num_embeddings is None else torch.arange(t.num_embeddings), True
        )
        for t in tables
    }
    col.flush()
    col.close()
    ref.close()
    assert sorted(p.name for p in path.iterdir()) == [
        "collection.json",
        "dim16-rowwise_adagrad",
        "dim8-rowwise_adagrad",
    ]
    again = ts.TieredEmbeddingBagCollection.open(
        ts.SSDConfig(path, host_rows=64), cache=ts.CacheConfig(rows=8), device="cpu"
    )
    for t in tables:
        ids = big if t.num_embeddings is None else torch.arange(t.num_embeddings)
        assert torch.equal(again.read_rows(t.name, ids, True), saved[t.name])
    with pytest.raises(InvalidInputError, match="table 'ids'.*\\[0, 140737488355328\\)"):
        again.read_rows("ids", torch.tensor([2**47]))
    again.close()


def test_ssd_directory_of_other_tables_is_refused(tmp_path):
    path = tmp_path / "col"
    tables = ssd_tables()
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path), device="cpu"
    )
    col.close()
    listing = sorted(p.name for p in path.rglob("*"))
    other = [tables[0], ts.TableConfig(name="cat", embedding_dim=8, num_embeddings=31), tables[2]]
    with pytest.raises(TableMismatchError, match="table 'cat' was made with num_embeddings=30"):
        ts.TieredEmbeddingBagCollection(
            other, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path), device="cpu"
        )
    with pytest.raises(TableMismatchError, match="holds other tables"):
        ts.TieredEmbeddingBagCollection(
            tables[:2], cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path), device="cpu"
        )
    new = ts.TableConfig(name="new", embedding_dim=8, num_embeddings=3)
    with pytest.raises(TableMismatchError, match="table 'new' is not one"):
        ts.TieredEmbeddingBagCollection(
            [*tables, new], cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path), device="cpu"
        )
    with pytest.raises(TableMismatchError, match="table 'ids' was made with optimizer 'sgd'"):
        ts.TieredEmbeddingBagCollection(
            tables,
            cache=ts.CacheConfig(rows=8),
            ssd=ts.SSDConfig(path),
            optimizer=ts.Adagrad(0.1),
            device="cpu",
        )
    assert sorted(p.name for p in path.rglob("*")) == listing  # nothing created
    # other hyper-parameters of the same optimizer: the same collection, trained on
    ts.TieredEmbeddingBagCollection(
        tables,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(path),
        optimizer=ts.SGD(lr=0.5),
        device="cpu",
    ).close()
    with pytest.raises(InvalidInputError, match=r"open\(\) takes the tables"):
        ts.TieredEmbeddingBagCollection.open(path, optimizer=ts.SGD(lr=0.5))
    single = tmp_path / "single"
    ts.TieredEmbeddingBag(
        num_embeddings=10,
        embedding_dim=8,
        mode="sum",
        cache=ts.CacheConfig(rows=2),
        ssd=ts.SSDConfig(single),
        device="cpu",
    ).close()
    with pytest.raises(NotATableError, match="holds a single table"):
        ts.TieredEmbeddingBagCollection(
            tables, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(single), device="cpu"
        )


def test_failed_creation_leaves_no_trace(tmp_path):
    # host_rows below cache_rows: a group's L2 share is below its L1 share, refused after the
    # collection's manifest was written
    tables = ssd_tables()
    with pytest.raises(InvalidInputError, match="host_rows"):
        ts.TieredEmbeddingBagCollection(
            tables,
            cache=ts.CacheConfig(rows=40, ways=1),
            ssd=ts.SSDConfig(tmp_path / "new", host_rows=20),
            device="cpu",
        )
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="host_rows"):
        ts.TieredEmbeddingBagCollection(
            tables,
            cache=ts.CacheConfig(rows=40, ways=1),
            ssd=ts.SSDConfig(tmp_path / "empty", host_rows=20),
            device="cpu",
        )
    assert list((tmp_path / "empty").iterdir()) == []


# ---------------------------------------------------------------------------- on the device
def test_mixed_collection_on_device(device):
    """Mixed dims, poolings and weights on the test's backend, against a module per table
    there (on CUDA: the kernels' single launch per group against their per-table launches)."""
    gen = torch.Generator().manual_seed(8)
    tables = [
        ts.TableConfig(name="a", embedding_dim=8, num_embeddings=60, feature_names=["a1", "a2"]),
        ts.TableConfig(name="b", embedding_dim=16, num_embeddings=30, pooling="mean"),
        ts.TableConfig(name="c", embedding_dim=8, num_embeddings=45, pooling="mean"),
    ]
    opt = ts.RowWiseAdagrad(lr=0.1)
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=12, ways=4), optimizer=opt, device=device
    )
    refs = {}
    for t in tables:
        refs[t.name] = ts.TieredEmbeddingBag(
            num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim, mode="sum",
            cache=ts.CacheConfig(rows=8, ways=4), optimizer=opt, device=device, seed=t.seed,
            init_scale=t.init_scale,
        )  # fmt: skip
    features = col.feature_keys
    for _ in range(4):
        batch = make_batch(gen, tables, 16, max_len=5, weighted=True)
        kw = as_keyword(batch, features[::-1])
        kt = col(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        dev_batch = {f: tuple(x.to(device) for x in v) for f, v in batch.items()}
        want = reference_forward(refs, tables, dev_batch)
        grad = {f: torch.randn(want[f].shape, generator=gen).to(device) for f in features}
        for f in features:
            torch.testing.assert_close(kt[f], want[f], rtol=1e-5, atol=1e-6)
        torch.autograd.backward([kt[f] for f in features], [grad[f] for f in features])
        torch.autograd.backward([want[f] for f in features], [grad[f] for f in features])
    for t in tables:
        ids = torch.arange(t.num_embeddings, device=device)
        torch.testing.assert_close(
            col.read_rows(t.name, ids, True),
            refs[t.name].read_rows(ids, True),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.gpu
def test_group_fills_compute_never_written_rows():
    """A group's CUDA fills compute a never-written row from its own table's seed, init scale
    and table-local id (store.RowSeeds, kernels/insert.cu) instead of reading it from L2: the
    rows a forward fills into L1 equal the CPU collection's bit for bit, and after training
    with evictions every L2 row that left its initial value is marked written."""
    gen = torch.Generator().manual_seed(21)
    sizes = [37, 50, 23]
    tables = [ts.TableConfig(name=f"t{k}", embedding_dim=8, num_embeddings=n, seed=5 * k + 2,
                             init_scale=0.1 * (k + 1)) for k, n in enumerate(sizes)]  # fmt: skip
    opt = ts.RowWiseAdagrad(lr=0.2)
    cols = {
        dev: ts.TieredEmbeddingBagCollection(
            tables, cache=ts.CacheConfig(rows=16, ways=4), optimizer=opt, device=dev
        )
        for dev in ("cuda", "cpu")
    }
    store = cols["cuda"].groups[0].store
    assert len(cols["cuda"].groups) == 1 and store.l2_written
    bags = max(sizes)  # every feature has as many bags; the others' are empty
    order = cols["cpu"].feature_keys
    for t in tables:  # every row of the table through L1 once (eval: nothing is written)
        n = t.num_embeddings
        one = {f: (torch.empty(0, dtype=torch.int64), torch.zeros(bags, dtype=torch.int64), None)
               for f in order}  # fmt: skip
        lengths = (torch.arange(bags) < n).long()  # bag k holds row k of the table
        one[t.feature_names[0]] = (torch.arange(n), lengths, None)
        with torch.no_grad():
            got = cols["cuda"](**as_keyword({f: (i.cuda(), m.cuda(), w) for f, (i, m, w)
                                             in one.items()}, order))  # fmt: skip
            want = cols["cpu"](**as_keyword(one, order))
        assert torch.equal(got.values().cpu(), want.values())
    assert not bool(store.host.written.any())
    for _ in range(6):
        batch = make_batch(gen, tables, 24, max_len=5)
        for dev, col in cols.items():
            kw = as_keyword({f: tuple(x.to(dev) for x in v[:2]) + (None,)
                             for f, v in batch.items()}, order)  # fmt: skip
            col(**kw).values().sum().backward()
    for t in tables:
        ids = torch.arange(t.num_embeddings)
        torch.testing.assert_close(cols["cuda"].read_rows(t.name, ids.cuda(), True).cpu(),
                                   cols["cpu"].read_rows(t.name, ids, True), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    initial = store.init_rows(torch.arange(store.num_rows, device="cuda")).cpu()
    changed = (store.host.data != initial).any(1)
    assert bool(changed.any())  # evictions wrote trained rows back
    assert not bool((changed & (store.host.written == 0)).any())


# ---------------------------------------------------------------------------- README
def test_readme_collection_example_runs(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Many tables", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})


def test_eval_never_changes_rows():
    tables = [ts.TableConfig(name="t", embedding_dim=4, num_embeddings=50)]
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=8), optimizer=ts.SGD(0.5), device="cpu"
    )
    batch = dict(keys=["t"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
    before = col.read_rows("t", torch.arange(50))
    col.eval()
    assert not col(**batch).values().requires_grad  # an inference step: nothing to update
    assert torch.equal(col.read_rows("t", torch.arange(50)), before)
    col.train()
    col(**batch).values().sum().backward()
    assert not torch.equal(col.read_rows("t", torch.arange(50)), before)
