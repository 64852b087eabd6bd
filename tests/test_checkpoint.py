"""Checkpoints: state_dict / load_state_dict through every tier, DCP, pickling, increments.

The reference is always an uninterrupted run of the same batches: a table saved after k steps,
loaded into a differently built table and trained on must end bitwise equal to it (weights and
optimizer state of every row), whatever the caches, policies and tiers of either side.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import tierstore as ts
from tierstore import checkpoint

N, D = 300, 8


def batches(seed, steps, num=N, hashed=False, bags=8, per_bag=6):
    """Random Zipf-ish batches ``(indices, offsets, grad)``; ``hashed`` spreads ids over int64."""
    gen = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 1.05
    out = []
    for _ in range(steps):
        idx = torch.multinomial(w, bags * per_bag, replacement=True, generator=gen)
        if hashed:
            idx = idx * -0x61C8864680B583EB + 12345
        offs = torch.arange(0, bags * per_bag, per_bag)
        out.append((idx, offs, torch.randn(bags, D, generator=gen)))
    return out


def train(emb, run):
    dev = emb.device
    for idx, offs, g in run:
        emb(idx.to(dev), offs.to(dev)).backward(g.to(dev))


def rows_of(emb, ids):
    return emb.read_rows(ids, with_state=True).cpu()


def table(kind, tmp_path, name, optimizer, device="cpu", num=N, seed=0, **kw):
    """A table of one of several layouts: the cache is transparent, so all train alike."""
    layouts = {  # (L1, L2's rows)
        "memory": (ts.CacheConfig(rows=num, policy="lru"), None),
        "memory-small": (ts.CacheConfig(rows=5, ways=4, policy="lfu"), None),
        "ssd": (ts.CacheConfig(rows=16, ways=4), 64),
        "ssd-tiny": (ts.CacheConfig(rows=1, ways=8, policy="lfu"), 48),
    }
    cache, host_rows = layouts[kind]
    ssd = ts.SSDConfig(tmp_path / name, host_rows=host_rows) if kind.startswith("ssd") else None
    return ts.TieredEmbeddingBag(
        num, D, cache=cache, ssd=ssd, optimizer=optimizer, device=device, seed=seed, **kw
    )


def saved(state):
    """``state`` through torch.save and torch.load (weights_only, torch's default)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


# ------------------------------------------------------------------------- the round trip


@pytest.mark.parametrize(
    "source, target, optimizer",
    [
        ("memory", "ssd", ts.SGD(0.3)),
        ("ssd", "memory-small", ts.Adagrad(0.2)),
        ("memory-small", "memory", ts.RowWiseAdagrad(0.2)),
        ("ssd", "ssd-tiny", ts.RowWiseAdagrad(0.2)),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_save_load_continues_training_bitwise(source, target, optimizer, tmp_path, device):
    seed = int(torch.randint(0, 1 << 30, ()))
    run = batches(seed, 10)
    ref = table("memory-small", tmp_path, "ref", optimizer, device)
    train(ref, run)
    a = table(source, tmp_path, "a", optimizer, device)
    train(a, run[:5])
    state = saved(a.state_dict())
    # another seed: every row must come from the checkpoint, none from the target's init
    b = table(target, tmp_path, "b", optimizer, device, seed=seed + 1)
    train(b, batches(seed + 2, 3))  # and rows trained before the load must not survive it
    assert str(b.load_state_dict(state)) == "<All keys matched successfully>"
    assert torch.equal(rows_of(b, torch.arange(N)), rows_of(a, torch.arange(N)))
    train(b, run[5:])
    assert torch.equal(rows_of(b, torch.arange(N)), rows_of(ref, torch.arange(N)))


def test_a_model_round_trips_through_a_file(tmp_path):
    def model(seed, path):
        m = nn.Sequential()
        ssd = dict(ssd=ts.SSDConfig(path, host_rows=40)) if path else {}
        m.add_module("emb", ts.TieredEmbeddingBag(
            N, D, cache=ts.CacheConfig(rows=7, ways=4), optimizer=ts.RowWiseAdagrad(0.1),
            device="cpu", seed=seed, **ssd,
        ))  # fmt: skip
        m.add_module("top", nn.Linear(D, 1))
        return m

    a, b = model(0, None), model(1, tmp_path / "b")
    train(a.emb, batches(3, 5))
    torch.save(a.state_dict(), tmp_path / "model.pt")
    got = b.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert not got.missing_keys and not got.unexpected_keys
    assert torch.equal(b.top.weight, a.top.weight)
    assert torch.equal(rows_of(b.emb, torch.arange(N)), rows_of(a.emb, torch.arange(N)))
    assert set(a.state_dict()) == {"emb.weight", "emb.optimizer_state", "emb._extra_state",
                                   "top.weight", "top.bias"}  # fmt: skip


def test_state_of_an_in_memory_table_is_its_rows_without_a_copy():
    emb = table("memory-small", None, "", ts.Adagrad(0.1))
    train(emb, batches(4, 4))
    state = emb.state_dict()
    want = rows_of(emb, torch.arange(N))
    assert torch.equal(torch.cat([state["weight"], state["optimizer_state"]], 1), want)
    assert state["weight"].data_ptr() == emb.store.host.data.data_ptr()  # a view of L2
    assert state["weight"].shape == (N, D) and state["optimizer_state"].shape == (N, D)


# ------------------------------------------------------------------------- sparse tables


def sparse_table(tmp_path, name, seed=0, cache_rows=8, ways=4, host_rows=64, block_rows=None, **kw):
    opts = dict(optimizer=ts.RowWiseAdagrad(0.2), seed=seed)
    cache = ts.CacheConfig(rows=cache_rows, ways=ways)
    ssd = ts.SSDConfig(tmp_path / name, host_rows=host_rows, block_rows=block_rows)
    return ts.TieredEmbeddingBag(None, D, cache=cache, ssd=ssd, **{**opts, **kw})


def test_sparse_table_saves_only_written_rows_and_continues_bitwise(tmp_path):
    run = batches(5, 12, hashed=True)
    ref = sparse_table(tmp_path, "ref", cache_rows=4096, host_rows=8192)
    train(ref, run)
    a = sparse_table(tmp_path, "a")
    train(a, run[:5])
    state = saved(a.state_dict())
    touched = torch.unique(torch.cat([r[0] for r in run[:5]]))
    assert torch.equal(state["ids"], touched)  # written: flushed, staged, dirty in L2 or L1
    assert state["weight"].shape == (touched.numel(), D)
    # a table that already wrote other rows: they must go back to their initial values
    b = sparse_table(tmp_path, "b", cache_rows=2, host_rows=64, ways=8)
    train(b, batches(6, 4, hashed=True))
    b.flush()
    train(b, batches(7, 2, hashed=True))
    b.load_state_dict(state)
    every = torch.unique(torch.cat([r[0] for r in run + batches(6, 4, True) + batches(7, 2, True)]))
    assert torch.equal(rows_of(b, every), rows_of(a, every))
    train(b, run[5:])
    assert torch.equal(rows_of(b, every), rows_of(ref, every))


def test_sparse_and_dense_forms_load_into_each_other(tmp_path):
    run = batches(8, 10)
    ref = table("memory", tmp_path, "", ts.Adagrad(0.1))
    train(ref, run)
    sparse = sparse_table(tmp_path, "s", optimizer=ts.Adagrad(0.1))
    train(sparse, run[:4])
    dense = table("memory-small", tmp_path, "", ts.Adagrad(0.1))
    dense.load_state_dict(saved(sparse.state_dict()))  # the rest of the rows reset to init
    back = sparse_table(tmp_path, "back", optimizer=ts.Adagrad(0.1))
    train(back, batches(9, 2, hashed=True))  # rows outside the dense table's ids: reset too
    back.load_state_dict(saved(dense.state_dict()))
    hashed = torch.unique(torch.cat([r[0] for r in batches(9, 2, hashed=True)]))
    assert torch.equal(rows_of(back, hashed), back.store.init_rows(hashed))
    train(dense, run[4:])
    train(back, run[4:])
    assert torch.equal(rows_of(dense, torch.arange(N)), rows_of(ref, torch.arange(N)))
    assert torch.equal(rows_of(back, torch.arange(N)), rows_of(ref, torch.arange(N)))


def test_an_ssd_table_with_num_embeddings_saves_sparse_on_request(tmp_path):
    run = batches(21, 8)
    a = table("ssd", tmp_path, "a", ts.Adagrad(0.1))
    train(a, run[:4])
    with ts.sparse_state_dict():
        state = saved(a.state_dict())
    touched = torch.unique(torch.cat([r[0] for r in run[:4]]))
    assert torch.equal(state["ids"], touched)
    assert state["_extra_state"]["form"] == "sparse"
    assert "ids" not in a.state_dict()  # outside the block: dense again
    b = table("memory-small", tmp_path, "", ts.Adagrad(0.1))  # same seed: the rest is init
    train(b, batches(22, 2))
    b.load_state_dict(state)
    assert torch.equal(rows_of(b, torch.arange(N)), rows_of(a, torch.arange(N)))
    train(a, run[4:])
    train(b, run[4:])
    assert torch.equal(rows_of(b, torch.arange(N)), rows_of(a, torch.arange(N)))


def test_stored_ids_with_blocks_of_several_rows(tmp_path):
    emb = sparse_table(tmp_path, "blk", block_rows=8)
    run = batches(10, 6, hashed=True)
    train(emb, run[:3])
    emb.flush()
    train(emb, run[3:])  # staged by evictions, dirty in L2 and L1
    want = torch.unique(torch.cat([r[0] for r in run]))
    assert torch.equal(checkpoint.stored_ids(emb.store), want)
    assert emb.store.host.ssd.stored_ids(staged=False).numel() < want.numel()


# ------------------------------------------------------------------------- strict loading, errors


def test_strict_loading_reports_missing_and_unexpected_keys():
    m = nn.Sequential()
    m.add_module("emb", table("memory-small", None, "", ts.RowWiseAdagrad(0.1)))
    state = m.state_dict()
    state["emb.bogus"] = torch.zeros(1)
    del state["emb.optimizer_state"]
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*emb\.optimizer_state.*emb\.bogus"):
        m.load_state_dict(state)
    got = m.load_state_dict(state, strict=False)
    assert got.missing_keys == ["emb.optimizer_state"] and got.unexpected_keys == ["emb.bogus"]
    del state["emb.weight"]
    got = m.load_state_dict(state, strict=False)
    assert sorted(got.missing_keys) == ["emb.optimizer_state", "emb.weight"]


def test_missing_optimizer_state_keeps_the_tables_own(tmp_path):
    a, b = (table("memory-small", None, "", ts.RowWiseAdagrad(0.1), seed=s) for s in (0, 1))
    train(a, batches(11, 3))
    train(b, batches(12, 3))
    own = rows_of(b, torch.arange(N))[:, D:]
    b.load_state_dict({"weight": a.state_dict()["weight"].clone()}, strict=False)
    got = rows_of(b, torch.arange(N))
    assert torch.equal(got[:, :D], rows_of(a, torch.arange(N))[:, :D])
    assert torch.equal(got[:, D:], own)


def bad_states(a_state):
    """(change, error, message) cases: each must fail with the target unchanged."""
    w, s = a_state["weight"], a_state["optimizer_state"]
    meta = a_state["_extra_state"]
    return [
        (dict(weight=w[:, :-1]), ts.TableMismatchError, "embedding_dim 7"),
        (dict(weight=w[:-1], optimizer_state=s[:-1]), ts.TableMismatchError, "num_embeddings"),
        (dict(optimizer_state=s.repeat(1, D)), ts.TableMismatchError, "optimizer"),
        (dict(_extra_state={**meta, "optimizer": "adagrad"}), ts.TableMismatchError, "adagrad"),
        (dict(_extra_state={"format": "x"}), ts.InvalidInputError, "not a tierstore"),
        (dict(weight=w.to(torch.int32)), ts.InvalidInputError, "floating"),
        (dict(optimizer_state=s[:-1]), ts.InvalidInputError, "shape"),
        (dict(ids=torch.arange(N - 1, -1, -1)), ts.InvalidInputError, "ascending"),
        (dict(ids=torch.arange(N) + 1), ts.TableMismatchError, "num_embeddings"),
        (dict(ids=torch.arange(N), _extra_state={**meta, "seed": 9}), ts.TableMismatchError,
         "seed=9"),
    ]  # fmt: skip


def test_mismatched_checkpoints_raise_and_change_nothing(tmp_path):
    a = table("memory", tmp_path, "", ts.RowWiseAdagrad(0.1))
    train(a, batches(13, 3))
    for kind in ("memory-small", "ssd"):
        b = table(kind, tmp_path, "b", ts.RowWiseAdagrad(0.1), seed=4)
        train(b, batches(14, 3))
        before = rows_of(b, torch.arange(N))
        for change, error, message in bad_states(a.state_dict()):
            state = {**a.state_dict(), **change}
            with pytest.raises(error, match=re.escape(message)):
                b.load_state_dict(state)
            assert torch.equal(rows_of(b, torch.arange(N)), before), change.keys()
        b.close()
    sgd = table("memory-small", None, "", ts.SGD(0.1))
    with pytest.raises(ts.TableMismatchError, match="rowwise_adagrad"):
        sgd.load_state_dict(a.state_dict())


def test_state_of_sgd_and_of_no_optimizer_load_into_each_other():
    a = table("memory-small", None, "", ts.SGD(0.1))
    train(a, batches(15, 3))
    frozen = table("memory", None, "", None, seed=3)
    assert "optimizer_state" not in a.state_dict()
    frozen.load_state_dict(a.state_dict())
    assert torch.equal(rows_of(frozen, torch.arange(N)), rows_of(a, torch.arange(N)))


# ------------------------------------------------------------------------- pickling, DCP


def test_pickle_and_deepcopy_raise_naming_state_dict(tmp_path):
    m = nn.Sequential(table("memory-small", tmp_path, "", ts.SGD(0.1)))
    for attempt in (lambda: pickle.dumps(m), lambda: copy.deepcopy(m),
                    lambda: torch.save(m, tmp_path / "m.pt")):  # fmt: skip
        with pytest.raises(ts.NotPicklableError, match="state_dict"):
            attempt()
    assert isinstance(ts.NotPicklableError("x"), TypeError)


@pytest.mark.parametrize("kind", ["memory-small", "ssd", "sparse"])
def test_distributed_checkpoint_saves_and_loads_a_model(kind, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")

    def model(name, seed):
        if kind == "sparse":
            emb = sparse_table(tmp_path, name, seed=0)
        else:
            emb = table(kind, tmp_path, name, ts.RowWiseAdagrad(0.1), seed=seed)
        return nn.ModuleDict({"emb": emb, "top": nn.Linear(D, 2)})

    hashed = kind == "sparse"
    run = batches(16, 8, hashed=hashed)
    ref, a, b = model("ref", 0), model("a", 0), model("b", 1)
    train(ref["emb"], run)
    train(a["emb"], run[:4])
    train(b["emb"], batches(17, 2, hashed=hashed))
    with warnings.catch_warnings():  # single process: DCP warns that no process group exists
        warnings.simplefilter("ignore")
        dcp.save(a.state_dict(), checkpoint_id=tmp_path / "dcp")
        checkpoint.dcp_load(b, tmp_path / "dcp")
    assert torch.equal(b["top"].weight, a["top"].weight)
    ids = torch.unique(torch.cat([r[0] for r in run + batches(17, 2, hashed=hashed)]))
    assert torch.equal(rows_of(b["emb"], ids), rows_of(a["emb"], ids))
    train(b["emb"], run[4:])
    assert torch.equal(rows_of(b["emb"], ids), rows_of(ref["emb"], ids))


def test_plain_dcp_load_works_for_a_dense_table(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    a = nn.ModuleDict({"emb": table("memory-small", tmp_path, "", ts.Adagrad(0.1))})
    b = nn.ModuleDict({"emb": table("ssd", tmp_path, "b", ts.Adagrad(0.1), seed=2)})
    train(a["emb"], batches(18, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(a.state_dict(), checkpoint_id=tmp_path / "dcp")
        state = b.state_dict()
        dcp.load(state, checkpoint_id=tmp_path / "dcp")
    b.load_state_dict(state)
    assert torch.equal(rows_of(b["emb"], torch.arange(N)), rows_of(a["emb"], torch.arange(N)))


# ------------------------------------------------------------------------- increments, spilling


def test_incremental_checkpoints_restore_exactly(tmp_path):
    run = batches(19, 15)
    ref = table("memory", tmp_path, "", ts.RowWiseAdagrad(0.2))
    train(ref, run)
    a = table("ssd-tiny", tmp_path, "a", ts.RowWiseAdagrad(0.2))
    model = nn.ModuleDict({"emb": a})
    with pytest.raises(ts.InvalidInputError, match="mark_checkpoint"):
        a.incremental_state_dict()
    train(a, run[:3])
    full = saved(model.state_dict())
    ts.mark_checkpoint(model)
    increments = []
    for lo, hi in ((3, 7), (7, 8), (8, 12)):
        train(a, run[lo : (lo + hi) // 2])
        a.flush()  # a flush between increments must not hide the rows it wrote
        train(a, run[(lo + hi) // 2 : hi])
        inc = saved(ts.incremental_state_dict(model))
        touched = torch.unique(torch.cat([r[0] for r in run[lo:hi]]))
        assert torch.equal(inc["emb.ids"], touched)  # exactly the rows changed, no others
        increments.append(inc)
    b = nn.ModuleDict({"emb": table("memory-small", tmp_path, "", ts.RowWiseAdagrad(0.2), seed=5)})
    b.load_state_dict(full)
    for inc in increments:
        b.load_state_dict(inc)
    assert torch.equal(rows_of(b["emb"], torch.arange(N)), rows_of(a, torch.arange(N)))
    train(b["emb"], run[12:])
    assert torch.equal(rows_of(b["emb"], torch.arange(N)), rows_of(ref, torch.arange(N)))


def test_incremental_checkpoint_needs_an_ssd_tier():
    emb = table("memory", None, "", ts.SGD(0.1))
    with pytest.raises(ts.InvalidInputError, match="SSD tier"):
        emb.mark_checkpoint()
    with pytest.raises(ts.InvalidInputError, match="holds no TieredEmbeddingBag"):
        ts.mark_checkpoint(nn.Linear(2, 2))


@pytest.mark.parametrize("sparse", [False, True])
def test_spilled_state_is_file_backed_and_loads_from_mmap(sparse, tmp_path):
    run = batches(20, 6, hashed=sparse)
    if sparse:
        a, b = sparse_table(tmp_path, "a"), sparse_table(tmp_path, "b", cache_rows=1)
    else:
        a = table("ssd", tmp_path, "a", ts.Adagrad(0.1))
        b = table("memory-small", tmp_path, "b", ts.Adagrad(0.1), seed=1)
    train(a, run)
    plain = a.state_dict()
    with ts.spill_state_dict(tmp_path / "spill"):
        spilled = a.state_dict()
    assert not any((tmp_path / "spill").iterdir())  # unlinked at once: freed with the tensors
    assert plain.keys() == spilled.keys()
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(spilled[key], value), key
            assert spilled[key].untyped_storage().filename is not None  # backed by a file
    torch.save(spilled, tmp_path / "ckpt.pt")
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", mmap=True))
    ids = torch.unique(torch.cat([r[0] for r in run]))
    assert torch.equal(rows_of(b, ids), rows_of(a, ids))


# ------------------------------------------------------------------------- the README


def test_readme_checkpoints_example_runs(tmp_path, monkeypatch):
    text = open("README.md").read()
    section = text.split("## Checkpoints", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
