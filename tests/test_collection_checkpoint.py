"""Checkpoints of a TieredEmbeddingBagCollection: per-table keys with the tables' own row ids.

The reference is an uninterrupted run of the same batches: a collection saved after k steps,
loaded into a collection of other cache sizes, table order (so other group row ids) or tiers,
and trained on must give the same outputs and end bitwise equal (weights and optimizer state
of every row) to the collection that never stopped.
"""

from __future__ import annotations

import copy
import io
import pathlib
import pickle
import tempfile
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tierstore as ts
from tierstore import checkpoint
from tierstore.errors import InvalidInputError, NotPicklableError, TableMismatchError

OPTIMIZERS = [ts.SGD(lr=0.1), ts.Adagrad(lr=0.05), ts.RowWiseAdagrad(lr=0.05)]


def dense_tables(reverse=False):
    tables = [
        ts.TableConfig(name="user", embedding_dim=8, num_embeddings=60),
        ts.TableConfig(name="item", embedding_dim=8, num_embeddings=40,
                       feature_names=["item", "last_item"]),
        ts.TableConfig(name="country", embedding_dim=4, num_embeddings=60, pooling="mean"),
    ]  # fmt: skip
    return tables[::-1] if reverse else tables


def random_batches(seed, tables, steps, batch_size=4, big=None):
    """KeyedJaggedTensor-layout batches (feature-major), each with a random output gradient;
    ``big`` (ids) feeds the ``num_embeddings=None`` tables."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        keys, values, lengths = [], [], []
        for t in tables:
            for f in t.feature_names:
                lens = torch.randint(0, 4, (batch_size,), generator=gen)
                n = int(lens.sum())
                if t.num_embeddings is None:
                    ids = big[torch.randint(0, big.numel(), (n,), generator=gen)]
                else:  # a few hot rows and a tail, so that rows repeat across steps
                    hot = torch.randint(0, 3, (n,), generator=gen)
                    cold = torch.randint(0, t.num_embeddings, (n,), generator=gen)
                    ids = torch.where(torch.rand(n, generator=gen) < 0.5, hot, cold)
                keys.append(f)
                values.append(ids)
                lengths.append(lens)
        grads = {f: torch.randn(batch_size, t.embedding_dim, generator=gen)
                 for t in tables for f in t.feature_names}  # fmt: skip
        out.append((keys, torch.cat(values), torch.cat(lengths), grads))
    return out


def train(col, run):
    """Steps ``run``; returns each step's outputs by feature (detached)."""
    outs = []
    for keys, values, lengths, grads in run:
        kt = col(keys=keys, values=values, lengths=lengths)
        d = kt.to_dict()
        sum((d[f] * g).sum() for f, g in grads.items()).backward()
        outs.append({f: v.detach().clone() for f, v in d.items()})
    return outs


def rows_of(col, ids_of):
    """Every table's rows with their state, at ``ids_of[name]`` (default: all its rows)."""
    return {
        t.name: col.read_rows(t.name, ids_of.get(t.name, None)
                              if t.num_embeddings is None else torch.arange(t.num_embeddings),
                              with_state=True)
        for t in col.tables
    }  # fmt: skip


def assert_rows_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_outputs_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for f in x:
            assert torch.equal(x[f], y[f]), f


def through_a_file(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def build(tables, optimizer, **kw):
    kw.setdefault("cache", ts.CacheConfig(rows=24, ways=4))
    return ts.TieredEmbeddingBagCollection(tables=tables, optimizer=optimizer, device="cpu", **kw)


# ---------------------------------------------------------------------------- resuming
TARGETS = {
    "other cache": lambda tmp: dict(cache=ts.CacheConfig(rows=7, ways=2, policy="lfu")),
    "whole in L1, tables reordered": lambda tmp: dict(
        cache=ts.CacheConfig(rows=200, ways=4), reverse=True
    ),
    "ssd tier": lambda tmp: dict(
        cache=ts.CacheConfig(rows=6, ways=2), ssd=ts.SSDConfig(tmp / "target", host_rows=80)
    ),
}
SOURCES = {
    "in memory": lambda tmp: dict(),
    "ssd tier": lambda tmp: dict(
        cache=ts.CacheConfig(rows=6, ways=1), ssd=ts.SSDConfig(tmp / "source", host_rows=64)
    ),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("target", TARGETS)
def test_save_load_continues_training_bitwise(optimizer, source, target, tmp_path):
    tables = dense_tables()
    first, second = random_batches(1, tables, 3), random_batches(2, tables, 3)
    whole = build(tables, optimizer)
    want_outs = train(whole, first + second)
    want = rows_of(whole, {})

    col = build(tables, optimizer, **SOURCES[source](tmp_path))
    assert_outputs_equal(train(col, first), want_outs[:3])
    state = through_a_file(col.state_dict())
    assert sorted(state) == sorted(
        f"tables.{t.name}.{k}"
        for t in tables
        for k in ("weight", "_extra_state")
        + (("optimizer_state",) if optimizer.name != "sgd" else ())
    )
    assert state["tables.item.weight"].shape == (40, 8)  # the table's own rows, not its group's
    opts = TARGETS[target](tmp_path)
    reverse = opts.pop("reverse", False)
    other = build(dense_tables(reverse), optimizer, **opts)
    assert str(other.load_state_dict(state)) == "<All keys matched successfully>"
    assert_outputs_equal(train(other, second), want_outs[3:])
    assert_rows_equal(rows_of(other, {}), want)


@st.composite
def layouts(draw):
    """Random tables, and a source and a target cache size (rows, ways) for them."""
    tables = [
        ts.TableConfig(
            name=f"t{i}",
            embedding_dim=draw(st.sampled_from([4, 8])),
            num_embeddings=draw(st.integers(3, 40)),
            feature_names=[f"t{i}f{j}" for j in range(draw(st.integers(1, 2)))],
            pooling=draw(st.sampled_from(["sum", "mean"])),
        )
        for i in range(draw(st.integers(1, 4)))
    ]
    caches = [(draw(st.integers(4, 160)), draw(st.sampled_from([1, 2, 4, 8]))) for _ in "ab"]
    return tables, caches, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=15, deadline=None)
@given(
    layout=layouts(),
    optimizer=st.sampled_from(OPTIMIZERS),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_any_tables_and_caches_resume_bitwise(layout, optimizer, steps, seed):
    tables, ((rows_a, ways_a), (rows_b, ways_b)), reverse, ssd = layout
    first, second = random_batches(seed, tables, steps), random_batches(seed + 1, tables, 2)
    whole = build(tables, optimizer)
    want_outs = train(whole, first + second)[steps:]
    col = build(tables, optimizer, cache=ts.CacheConfig(rows=rows_a, ways=ways_a))
    train(col, first)
    with tempfile.TemporaryDirectory() as tmp:
        tiers = {}
        if ssd:  # L2 big enough for any batch (L2 must hold L1's rows plus a batch's)
            total = sum(t.num_embeddings for t in tables)
            tiers = dict(
                ssd=ts.SSDConfig(pathlib.Path(tmp) / "b", host_rows=rows_b + 2 * total + 8)
            )
        other = build(tables[::-1] if reverse else tables, optimizer,
                      cache=ts.CacheConfig(rows=rows_b, ways=ways_b), **tiers)  # fmt: skip
        other.load_state_dict(through_a_file(col.state_dict()))
        assert_outputs_equal(train(other, second), want_outs)
        assert_rows_equal(rows_of(other, {}), rows_of(whole, {}))
        if ssd:
            other.close()


def test_a_tables_state_loads_into_a_single_module_and_back():
    tables, opt = dense_tables(), ts.RowWiseAdagrad(lr=0.05)
    col = build(tables, opt)
    train(col, random_batches(3, tables, 3))
    state = col.state_dict()
    item = tables[1]
    single = ts.TieredEmbeddingBag(num_embeddings=40, embedding_dim=8, mode="sum",
                                   cache=ts.CacheConfig(rows=8, ways=2), optimizer=opt, device="cpu", seed=item.seed,
                                   init_scale=item.init_scale)  # fmt: skip
    prefix = "tables.item."
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    single.load_state_dict(mine)
    assert torch.equal(
        single.read_rows(torch.arange(40), True), col.read_rows("item", torch.arange(40), True)
    )
    # and back: the single module's (changed) rows into the collection, other tables kept
    single.write_rows(torch.tensor([5]), torch.full((1, 8), 3.0))
    other = rows_of(col, {})
    col.load_state_dict(single.state_dict(prefix=prefix), strict=False)
    assert torch.equal(col.read_rows("item", torch.tensor([5])), torch.full((1, 8), 3.0))
    after = rows_of(col, {})
    for name in ("user", "country"):
        assert torch.equal(after[name], other[name])


# ---------------------------------------------------------------------------- sparse tables
def sparse_tables():
    return [
        ts.TableConfig(name="ids", embedding_dim=8, num_embeddings=None, feature_names=["uid"]),
        ts.TableConfig(name="cat", embedding_dim=8, num_embeddings=30),
        ts.TableConfig(name="wide", embedding_dim=16, num_embeddings=20),
    ]


BIG = torch.tensor([0, 5, 2**40, 2**47 - 1, 123456789, 77])


def test_sparse_table_round_trip_through_ssd_tiers(tmp_path):
    tables, opt = sparse_tables(), ts.RowWiseAdagrad(lr=0.1)
    first = random_batches(4, tables, 3, big=BIG[:4])
    second = random_batches(5, tables, 3, big=BIG)
    whole = build(
        tables, opt, cache=ts.CacheConfig(rows=64, ways=4), ssd=ts.SSDConfig(tmp_path / "whole")
    )
    want_outs = train(whole, first + second)[3:]
    probe = {"ids": torch.cat([BIG, torch.tensor([9, 2**46])])}  # untouched rows too
    want = rows_of(whole, probe)

    col = build(
        tables,
        opt,
        cache=ts.CacheConfig(rows=6, ways=2),
        ssd=ts.SSDConfig(tmp_path / "a", host_rows=64),
    )
    train(col, first)
    state = through_a_file(col.state_dict())
    ids = state["tables.ids.ids"]
    assert torch.equal(ids, torch.unique(ids)) and set(ids.tolist()) <= set(BIG[:4].tolist())
    assert state["tables.ids.weight"].shape == (ids.numel(), 8)
    assert "tables.cat.ids" not in state  # a bounded table is dense unless asked
    other = build(
        tables,
        opt,
        cache=ts.CacheConfig(rows=9, ways=3),
        ssd=ts.SSDConfig(tmp_path / "b", host_rows=90),
    )
    other.load_state_dict(state)
    assert_outputs_equal(train(other, second), want_outs)
    assert_rows_equal(rows_of(other, probe), want)


def test_sparse_form_on_request_loads_into_a_collection_in_memory(tmp_path):
    tables, opt = dense_tables(), ts.Adagrad(lr=0.05)
    run = random_batches(6, tables, 3)
    col = build(
        tables,
        opt,
        cache=ts.CacheConfig(rows=6, ways=2),
        ssd=ts.SSDConfig(tmp_path / "ssd", host_rows=80),
    )
    train(col, run)
    with checkpoint.sparse_state_dict():
        state = col.state_dict()
    for t in tables:
        ids = state[f"tables.{t.name}.ids"]
        assert 0 < ids.numel() < t.num_embeddings  # only the written rows
    mem = build(tables, opt, cache=ts.CacheConfig(rows=10, ways=4))
    train(mem, random_batches(7, tables, 2))  # rows the checkpoint lacks go back to their init
    mem.load_state_dict(state)
    assert_rows_equal(rows_of(mem, {}), rows_of(col, {}))


def test_incremental_checkpoints_of_a_collection_restore_exactly(tmp_path):
    tables, opt = sparse_tables(), ts.RowWiseAdagrad(lr=0.1)
    probe = {"ids": BIG}
    col = build(
        tables,
        opt,
        cache=ts.CacheConfig(rows=6, ways=2),
        ssd=ts.SSDConfig(tmp_path / "a", host_rows=64),
    )
    train(col, random_batches(8, tables, 2, big=BIG))
    full = col.state_dict()
    col.mark_checkpoint()
    train(col, random_batches(9, tables, 2, big=BIG))
    inc = col.incremental_state_dict()
    assert inc["tables.cat.ids"].numel() < 30  # only the rows changed
    other = build(
        tables, opt, cache=ts.CacheConfig(rows=8, ways=4), ssd=ts.SSDConfig(tmp_path / "b")
    )
    other.load_state_dict(full)
    other.load_state_dict(inc, strict=False)
    assert_rows_equal(rows_of(other, probe), rows_of(col, probe))


def test_spilled_state_loads_from_mmap(tmp_path):
    tables, opt = sparse_tables(), ts.SGD(lr=0.1)
    col = build(tables, opt, cache=ts.CacheConfig(rows=6, ways=4), ssd=ts.SSDConfig(tmp_path / "a"))
    train(col, random_batches(10, tables, 2, big=BIG))
    with checkpoint.spill_state_dict(tmp_path / "spill"):
        torch.save(col.state_dict(), tmp_path / "ckpt.pt")
    other = build(
        tables, opt, cache=ts.CacheConfig(rows=7, ways=4), ssd=ts.SSDConfig(tmp_path / "b")
    )
    other.load_state_dict(torch.load(tmp_path / "ckpt.pt", mmap=True))
    assert_rows_equal(rows_of(other, {"ids": BIG}), rows_of(col, {"ids": BIG}))


# ---------------------------------------------------------------------------- refusals
def snapshot(col):
    return rows_of(col, {})


@pytest.fixture
def trained():
    tables, opt = dense_tables(), ts.RowWiseAdagrad(lr=0.05)
    src = build(tables, opt)
    train(src, random_batches(11, tables, 2))
    dst = build(tables, opt, cache=ts.CacheConfig(rows=9, ways=4))
    train(dst, random_batches(12, tables, 2))
    return src.state_dict(), dst


def test_strict_loading_reports_missing_and_unexpected_keys_and_loads_nothing(trained):
    state, dst = trained
    before = snapshot(dst)
    missing = {k: v for k, v in state.items() if not k.startswith("tables.country.")}
    with pytest.raises(RuntimeError, match=r"Missing key.*tables\.country\.weight"):
        dst.load_state_dict(missing)
    assert_rows_equal(snapshot(dst), before)
    extra = {**state, "tables.nope.weight": torch.zeros(3, 8)}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*tables\.nope\.weight"):
        dst.load_state_dict(extra)
    assert_rows_equal(snapshot(dst), before)
    result = dst.load_state_dict(missing, strict=False)  # the others load
    assert "tables.country.weight" in result.missing_keys
    after = snapshot(dst)
    assert torch.equal(after["country"], before["country"])
    assert not torch.equal(after["user"], before["user"])
    assert torch.equal(after["user"][:, :8], state["tables.user.weight"])


def mismatches():
    def dim(s):
        s["tables.country.weight"] = s["tables.country.weight"].repeat(1, 2)

    def rows(s):
        s["tables.country.weight"] = s["tables.country.weight"][:-1]
        s["tables.country.optimizer_state"] = s["tables.country.optimizer_state"][:-1]

    def optimizer(s):
        s["tables.country._extra_state"] = {
            **s["tables.country._extra_state"],
            "optimizer": "adagrad",
        }

    def width(s):
        s["tables.country.optimizer_state"] = s["tables.country.optimizer_state"].repeat(1, 4)

    def ids(s):
        s["tables.country.ids"] = torch.tensor([3, 1] + list(range(4, 62)))

    return [
        (dim, TableMismatchError, r"tables\.country\.weight.*embedding_dim 8, this table's 4"),
        (rows, TableMismatchError, r"tables\.country\.weight.*59 rows.*num_embeddings=60"),
        (optimizer, TableMismatchError, r"tables\.country\.optimizer_state.*'adagrad'"),
        (width, TableMismatchError, r"tables\.country\.optimizer_state.*4 state floats"),
        (ids, InvalidInputError, r"tables\.country\.ids must be ascending"),
    ]


@pytest.mark.parametrize(
    "change,error,message", mismatches(), ids=lambda x: getattr(x, "__name__", "")
)
def test_mismatched_checkpoints_raise_and_change_nothing(trained, change, error, message):
    state, dst = trained
    before = snapshot(dst)
    bad = dict(state)
    change(bad)
    with pytest.raises(error, match=message):
        dst.load_state_dict(bad)
    assert_rows_equal(snapshot(dst), before)  # "user" and "item" come first: not loaded either


def test_a_checkpoint_of_another_optimizer_kind_is_refused():
    tables = dense_tables()
    src = build(tables, ts.SGD(lr=0.1))
    dst = build(tables, ts.RowWiseAdagrad(lr=0.1))
    before = snapshot(dst)
    with pytest.raises(TableMismatchError, match="optimizer is 'sgd'"):
        dst.load_state_dict(src.state_dict(), strict=False)
    assert_rows_equal(snapshot(dst), before)


def test_load_with_prefetched_batches_pending_is_refused(trained):
    state, dst = trained
    keys, values, lengths, _ = random_batches(13, dst.tables, 1)[0]
    dst.prefetch(keys=keys, values=values, lengths=lengths)
    before = snapshot(dst)
    with pytest.raises(InvalidInputError, match="prefetched"):
        dst.load_state_dict(state)
    assert_rows_equal(snapshot(dst), before)


def test_pickle_and_deepcopy_raise_naming_state_dict():
    col = build(dense_tables(), ts.SGD(lr=0.1))
    for attempt in (lambda: pickle.dumps(col), lambda: copy.deepcopy(col)):
        with pytest.raises(NotPicklableError, match="state_dict"):
            attempt()


def test_distributed_checkpoint_of_a_model_holding_a_collection(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    tables, opt = sparse_tables(), ts.RowWiseAdagrad(lr=0.1)

    def model(name, cache_rows):
        col = build(
            tables,
            opt,
            cache=ts.CacheConfig(rows=cache_rows, ways=4),
            ssd=ts.SSDConfig(tmp_path / name, host_rows=64),
        )
        return nn.ModuleDict({"emb": col, "top": nn.Linear(8, 2)})

    a, b = model("a", 6), model("b", 11)
    train(a["emb"], random_batches(14, tables, 3, big=BIG))
    train(b["emb"], random_batches(15, tables, 2, big=BIG[2:]))
    with warnings.catch_warnings():  # single process: DCP warns that no process group exists
        warnings.simplefilter("ignore")
        dcp.save(a.state_dict(), checkpoint_id=tmp_path / "dcp")
        checkpoint.dcp_load(b, tmp_path / "dcp")
    assert torch.equal(b["top"].weight, a["top"].weight)
    probe = {"ids": BIG}
    assert_rows_equal(rows_of(b["emb"], probe), rows_of(a["emb"], probe))
