"""``GraphedStep``: a training step captured as a CUDA graph trains exactly as the eager step
(same outputs, rows, optimizer state, cache state and counters, bit for bit), and a bad batch
raises before its replay with nothing changed. Fresh random Zipf traces each run; the seed is
in every failure message."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_collection import FakeKJT

import tierstore as ts
from tierstore import graphs
from tierstore.errors import InvalidInputError

ROWS, BAGS, LENGTH = 4000, 64, 8


def _pair(policy: str, mode: str, cache_rows: int, dim: int = 24):
    """Two identical tables: one trained eagerly (the reference), one through GraphedStep."""
    kw = dict(mode=mode, cache=ts.CacheConfig(rows=cache_rows, ways=8, policy=policy),
              device="cuda", seed=3, optimizer=ts.RowWiseAdagrad(lr=0.05))  # fmt: skip
    return ts.TieredEmbeddingBag(ROWS, dim, **kw), ts.TieredEmbeddingBag(ROWS, dim, **kw)


def _fresh(policy: str):
    """A fresh seed, its generator, and a pair of small sum-mode tables (200 cached rows)."""
    seed = random.randrange(1 << 32)
    return (seed, np.random.default_rng(seed), *_pair(policy, "sum", 200))


def _zipf(rng: np.random.Generator, n: int) -> torch.Tensor:
    ids = rng.permutation(ROWS)[(rng.zipf(1.1, n) - 1) % ROWS]
    return torch.from_numpy(ids).cuda()


def _assert_same(eager, graphed, seed):
    a, b = eager.store.l1, graphed.store.l1
    state = ("tags", "stamps", "dirty", "locks", "counters", "next_step")
    for name in state:
        assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differ (seed {seed})"
    if a.sketch is not None:
        assert torch.equal(a.sketch.counters, b.sketch.counters), f"sketch (seed {seed})"
    assert a.step == b.step
    ids = torch.arange(ROWS, device="cuda")
    rows_a, rows_b = eager.read_rows(ids, with_state=True), graphed.read_rows(ids, with_state=True)
    assert torch.equal(rows_a, rows_b), f"rows differ (seed {seed})"
    assert eager.stats() == graphed.stats()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("cache_rows", [96, ROWS])  # conflict misses and evictions; all fit
def test_graphed_training_equals_eager(policy, mode, cache_rows):
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    eager, graphed = _pair(policy, mode, cache_rows)

    def train(x, g):
        out = graphed(x)
        out.backward(g)
        return out

    step = ts.GraphedStep(train)
    for k in range(8):  # a warm-up call, the capture, then replays
        x = _zipf(rng, BAGS * LENGTH).view(BAGS, LENGTH)
        g = torch.from_numpy(rng.standard_normal((BAGS, 24), dtype=np.float32)).cuda()
        want = eager(x)
        want.backward(g)
        got = step(x, g)
        assert torch.equal(got, want), f"output of step {k} differs (seed {seed})"
    assert step.graph is not None
    c = eager.stats()
    if cache_rows < ROWS:
        assert c.conflict_misses > 0 and c.evictions > 0 and c.writebacks > 0, c
    _assert_same(eager, graphed, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("cache_rows", [96, ROWS])
def test_graphed_inference_equals_eager(policy, cache_rows):
    """An inference forward (no backward: the histogram unique step, no locks) captured and
    replayed gives the eager outputs and leaves the same state, between training steps."""
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    eager, graphed = _pair(policy, "sum", cache_rows)
    infer = ts.GraphedStep(torch.no_grad()(graphed.forward))
    for k in range(8):
        x = _zipf(rng, BAGS * LENGTH).view(BAGS, LENGTH)
        with torch.no_grad():
            want = eager(x)
        assert torch.equal(infer(x), want), f"output of call {k} differs (seed {seed})"
        if k % 3 == 2:  # a training step on both, eagerly
            g = torch.from_numpy(rng.standard_normal((BAGS, 24), dtype=np.float32)).cuda()
            eager(x).backward(g)
            graphed(x).backward(g)
    assert infer.graph is not None
    _assert_same(eager, graphed, seed)


class _TwoTowers(torch.nn.Module):
    """Two tables (LRU and LFU, different sizes) pooled into a dense layer: a DLRM-like step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.users = ts.TieredEmbeddingBag(ROWS, 24, cache=ts.CacheConfig(rows=300, ways=8),
                                           device="cuda",
                                           optimizer=ts.RowWiseAdagrad(lr=0.05))  # fmt: skip
        self.items = ts.TieredEmbeddingBag(ROWS // 2, 16, mode="mean",
                                           cache=ts.CacheConfig(rows=150, policy="lfu"),
                                           device="cuda", seed=9,
                                           optimizer=ts.Adagrad(lr=0.1))  # fmt: skip
        self.top = torch.nn.Linear(24 + 16, 1).cuda()

    def forward(self, users, items):
        return self.top(torch.cat([self.users(users), self.items(items)], 1)).squeeze(1)


@pytest.mark.gpu
def test_graphed_model_with_two_tables_and_a_dense_optimizer():
    """The whole step of a small model: two tables, a dense layer with torch's SGD, a loss."""
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    eager, graphed = _TwoTowers(), _TwoTowers()
    opts = [torch.optim.SGD(m.top.parameters(), lr=0.05) for m in (eager, graphed)]

    def train(model, opt, users, items, labels):
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(users, items), labels)
        loss.backward()
        opt.step()
        return loss

    step = ts.GraphedStep(lambda u, i, y: train(graphed, opts[1], u, i, y))
    for k in range(6):
        users = _zipf(rng, BAGS * LENGTH).view(BAGS, LENGTH)
        items = _zipf(rng, BAGS * 4).view(BAGS, 4) % (ROWS // 2)
        labels = torch.from_numpy(rng.standard_normal(BAGS, dtype=np.float32)).cuda()
        want = train(eager, opts[0], users, items, labels)
        got = step(users, items, labels)
        assert torch.equal(got, want), f"loss of step {k} differs (seed {seed})"
    assert step.graph is not None
    _assert_same(eager.users, graphed.users, seed)
    ids = torch.arange(ROWS // 2, device="cuda")
    a, b = (
        eager.items.read_rows(ids, with_state=True),
        graphed.items.read_rows(ids, with_state=True),
    )
    assert torch.equal(a, b), f"item rows differ (seed {seed})"
    assert eager.items.stats() == graphed.items.stats()
    for p, q in zip(eager.top.parameters(), graphed.top.parameters()):
        assert torch.equal(p, q), f"dense weights differ (seed {seed})"


@pytest.mark.gpu
def test_graphed_with_offsets_and_weights():
    """1-D indices with offsets (bag lengths change from batch to batch) and per-sample weights
    that take a gradient."""
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    eager, graphed = _pair("lru", "sum", 200)
    n = BAGS * LENGTH

    def batch():
        cuts = np.sort(rng.choice(np.arange(1, n), BAGS - 1, replace=False))
        offs = torch.from_numpy(np.concatenate([[0], cuts])).cuda()
        w = torch.from_numpy(rng.random(n, dtype=np.float32)).cuda()
        g = torch.from_numpy(rng.standard_normal((BAGS, 24), dtype=np.float32)).cuda()
        return _zipf(rng, n), offs, w, g

    def train(ids, offs, w, g):
        w = w.requires_grad_()
        out = graphed(ids, offs, per_sample_weights=w)
        (w_grad,) = torch.autograd.grad(out, w, g)
        return out, w_grad

    step = ts.GraphedStep(train)
    for k in range(6):
        ids, offs, w, g = batch()
        w_ref = w.clone().requires_grad_()
        want = eager(ids, offs, per_sample_weights=w_ref)
        (w_grad,) = torch.autograd.grad(want, w_ref, g)
        got, got_grad = step(ids, offs, w, g)
        assert torch.equal(got, want) and torch.equal(got_grad, w_grad), f"step {k}, seed {seed}"
    _assert_same(eager, graphed, seed)


@pytest.mark.gpu
def test_bad_batch_raises_before_the_replay_and_changes_nothing():
    seed, rng, eager, graphed = _fresh("lfu")
    n = BAGS * LENGTH
    offs = torch.arange(0, n, LENGTH, device="cuda")
    g = torch.ones(BAGS, 24, device="cuda")
    step = ts.GraphedStep(lambda ids, o: graphed(ids, o).backward(g))
    for _ in range(3):
        ids = _zipf(rng, n)
        eager(ids, offs).backward(g)
        step(ids, offs)
    assert step.tail is not None  # the head replays on each batch before its checks are read
    bad_id = _zipf(rng, n)
    bad_id[rng.integers(n)] = ROWS
    with pytest.raises(InvalidInputError, match="num_embeddings"):
        step(bad_id, offs)
    bad_offs = offs.clone()
    bad_offs[[5, 6]] = bad_offs[[6, 5]]
    with pytest.raises(InvalidInputError, match="non-decreasing"):
        step(_zipf(rng, n), bad_offs)
    with pytest.raises(InvalidInputError, match="captured step takes"):
        step(_zipf(rng, n + 1), offs)
    with pytest.raises(InvalidInputError, match="captured step takes"):
        step(_zipf(rng, n).int(), offs)
    _assert_same(eager, graphed, seed)
    ids = _zipf(rng, n)  # and the graph still trains as the eager step
    eager(ids, offs).backward(g)
    step(ids, offs)
    _assert_same(eager, graphed, seed)


@pytest.mark.gpu
def test_a_step_without_tables_is_one_graph():
    """Nothing to check: the step is captured whole and replayed at once."""
    x = torch.randn(64, device="cuda")
    step = ts.GraphedStep(lambda t: (t * 2).cumsum(0))
    for _ in range(3):
        x = torch.randn(64, device="cuda")
        assert torch.equal(step(x), (x * 2).cumsum(0))
    assert step.graph is not None and step.tail is None


@pytest.mark.gpu
def test_steps_that_cannot_be_checked_are_refused():
    seed, rng, eager, graphed = _fresh("lru")
    x = _zipf(rng, BAGS * LENGTH).view(BAGS, LENGTH)
    g = torch.ones(BAGS, 24, device="cuda")
    # indices computed inside the step: the batch GraphedStep could check is not what the table reads
    derived = ts.GraphedStep(lambda x: graphed(x.flip(0).contiguous()).backward(g))
    derived(x)
    eager(x.flip(0).contiguous()).backward(g)
    with pytest.raises(InvalidInputError, match="one of the step's inputs"):
        derived(x)
    # a training forward whose backward is not in the step would keep its rows locked
    no_backward = ts.GraphedStep(lambda x: graphed(x))
    no_backward(x).backward(g)
    eager(x).backward(g)
    with pytest.raises(InvalidInputError, match="backward did not run"):
        no_backward(x)
    with pytest.raises(InvalidInputError, match="must be a CUDA tensor"):
        derived(x.cpu())
    # capturing the table with torch.cuda.graph directly: nothing would check the batches
    with pytest.raises(InvalidInputError, match="GraphedStep"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            graphed(x)
    _assert_same(eager, graphed, seed)  # the refused captures changed nothing


@pytest.mark.parametrize("gpu", [pytest.param(False), pytest.param(True, marks=pytest.mark.gpu)])
def test_tables_that_cannot_run_from_a_graph_are_refused(monkeypatch, gpu):
    """A table on the CPU, or one whose step reads the device (an SSD tier): refused by name
    before the capture records anything. (The capture is simulated: GraphedStep's record.)"""
    device = "cuda" if gpu else "cpu"
    emb = ts.TieredEmbeddingBag(100, 8, cache=ts.CacheConfig(rows=16), device=device)
    if gpu:  # a policy without kernels: its step reads counts back to the host
        monkeypatch.setattr(emb.store.l1, "sync_free", False)
    monkeypatch.setattr(graphs._capturing, "forwards", [], raising=False)
    with pytest.raises(InvalidInputError, match="cannot be captured"):
        emb(torch.tensor([[1, 2]], device=device))
    assert graphs._capturing.forwards == []


def test_what_a_capture_reads_of_a_table_on_the_cpu():
    """What ``graphs.py`` reads of a table (its store's step and reasons, its prefetched
    count): the store's step is L1's count of lookups, set through to L1, and the CPU backend's
    step is never capturable."""
    seed = random.randrange(1 << 32)
    gen = torch.Generator().manual_seed(seed)
    emb = ts.TieredEmbeddingBag(100, 4, device="cpu", cache=ts.CacheConfig(rows=16))
    batches = [torch.randint(0, 100, (3, 5), generator=gen) for _ in range(3)]
    for k, ids in enumerate(batches):
        emb.prefetch(ids)
        assert emb.prefetched == k + 1 and emb.store.step <= k + 1, seed
    for k, ids in enumerate(batches):
        emb(ids).sum().backward()
        assert emb.prefetched == 2 - k, seed
    assert emb.store.step == 3, seed  # one lookup per batch
    emb.store.step += 5
    assert emb.store.l1.step == 8, seed
    assert "not available" in emb.store.graph_unsupported(emb.optimizer)
    emb.store.load_hyper(emb.optimizer)  # nothing to load for torch ops


# ---------------------------------------------------------------------------- collections
def _collections(features_per_table: int, cache_rows: int, device: str = "cuda"):
    """Two identical one-group collections (three tables of dim 8, RowWiseAdagrad): one trained
    eagerly (the reference), one through GraphedStep; and their feature keys."""
    tables = [
        ts.TableConfig(name=f"t{i}", embedding_dim=8, num_embeddings=ROWS // (i + 1), seed=i,
                       feature_names=[f"t{i}f{j}" for j in range(features_per_table)])
        for i in range(3)
    ]  # fmt: skip
    kw = dict(cache=ts.CacheConfig(rows=cache_rows, ways=8), device=device,
              optimizer=ts.RowWiseAdagrad(lr=0.05))  # fmt: skip
    pair = (
        ts.TieredEmbeddingBagCollection(tables, **kw),
        ts.TieredEmbeddingBagCollection(tables, **kw),
    )
    return (*pair, [f for t in tables for f in t.feature_names])


def _keyed_batch(rng: np.random.Generator, keys: list[str], bags: int):
    """``(values, lengths)``: each feature's bags of 0 to 4 Zipf ids of its table."""
    lengths = torch.from_numpy(rng.integers(0, 5, len(keys) * bags)).cuda()
    per_key = lengths.view(len(keys), bags).sum(1).tolist()
    limits = [ROWS // (int(k[1]) + 1) for k in keys]  # the table of "t{i}f{j}"
    values = [torch.from_numpy(rng.zipf(1.1, c) % lim) for c, lim in zip(per_key, limits)]
    return torch.cat(values).cuda(), lengths


@pytest.mark.gpu
@pytest.mark.parametrize("features_per_table", [1, 2])  # sample-major bags, feature-major
@pytest.mark.parametrize("cache_rows", [64, ROWS * 2])  # conflict misses and evictions; all fit
def test_graphed_collection_equals_eager(features_per_table, cache_rows):
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    eager, graphed, keys = _collections(features_per_table, cache_rows)
    width = 8 * len(keys)

    def train(values, lengths, g):
        out = graphed(keys=keys, values=values, lengths=lengths).values()
        out.backward(g)
        return out

    step = ts.GraphedStep(train)
    values, lengths = _keyed_batch(rng, keys, BAGS)
    n = values.numel()
    for k in range(8):  # a warm-up call, the capture, then replays (batches of n ids)
        lengths = lengths[torch.from_numpy(rng.permutation(lengths.numel())).cuda()]
        limits = torch.tensor([ROWS // (int(key[1]) + 1) for key in keys], device="cuda")
        feature = torch.repeat_interleave(torch.arange(len(keys), device="cuda"),
                                          lengths.view(len(keys), BAGS).sum(1), output_size=n)  # fmt: skip
        values = torch.from_numpy(rng.zipf(1.1, n)).cuda() % limits[feature]
        g = torch.from_numpy(rng.standard_normal((BAGS, width), dtype=np.float32)).cuda()
        want = eager(keys=keys, values=values, lengths=lengths).values()
        want.backward(g)
        got = step(values, lengths, g)
        assert torch.equal(got, want), f"output of step {k} differs (seed {seed})"
    assert step.graph is not None and step.tail is not None
    bad = values.clone()
    bad[rng.integers(n)] = ROWS  # past every table
    with pytest.raises(InvalidInputError, match="table"):
        step(bad, lengths, g)
    for t in eager.tables:
        ids = torch.arange(t.num_embeddings, device="cuda")
        want = eager.read_rows(t.name, ids, with_state=True)
        assert torch.equal(graphed.read_rows(t.name, ids, with_state=True), want), (t.name, seed)
    assert eager.stats() == graphed.stats(), seed


@pytest.mark.gpu
def test_a_collection_batch_tensor_held_outside_the_inputs_is_refused_by_name():
    """``lengths`` kept by the step (not an input): each replay could not check the batch the
    collection reads, so the capture is refused naming it, and the tables are as before."""
    rng = np.random.default_rng(random.randrange(1 << 32))
    eager, graphed, keys = _collections(1, 64)
    values, lengths = _keyed_batch(rng, keys, BAGS)
    g = torch.ones(BAGS, 8 * len(keys), device="cuda")
    step = ts.GraphedStep(
        lambda v: graphed(keys=keys, values=v, lengths=lengths).values().backward(g)
    )
    step(values)  # the warm-up call: an eager step
    eager(keys=keys, values=values, lengths=lengths).values().backward(g)
    with pytest.raises(InvalidInputError, match="TieredEmbeddingBagCollection's lengths must be"):
        step(values)
    for t in eager.tables:
        ids = torch.arange(t.num_embeddings, device="cuda")
        want = eager.read_rows(t.name, ids, with_state=True)
        assert torch.equal(graphed.read_rows(t.name, ids, with_state=True), want), t.name


@pytest.mark.parametrize("gpu", [pytest.param(False), pytest.param(True, marks=pytest.mark.gpu)])
def test_collections_that_cannot_run_from_a_graph_are_refused(monkeypatch, gpu):
    """A collection on the CPU, one whose tables form several groups (each group's share of a
    batch is sized on the host), or one given a KeyedJaggedTensor (it caches what it derives):
    refused by name before the capture records anything."""
    device = "cuda" if gpu else "cpu"
    one_group = _collections(1, 64, device)[0]
    tables = [ts.TableConfig(name="a", embedding_dim=8, num_embeddings=10),
              ts.TableConfig(name="b", embedding_dim=16, num_embeddings=10)]  # fmt: skip
    two_groups = ts.TieredEmbeddingBagCollection(tables, device=device)
    monkeypatch.setattr(graphs._capturing, "forwards", [], raising=False)
    batch = dict(
        values=torch.tensor([1, 2], device=device),
        lengths=torch.ones(2, dtype=torch.int64, device=device),
    )
    with pytest.raises(InvalidInputError, match="2 groups"):
        two_groups(keys=["a", "b"], **batch)
    kjt = FakeKJT(["t0f0", "t1f0", "t2f0"], torch.tensor([1, 2, 3], device=device),
                  torch.ones(3, dtype=torch.int64, device=device))  # fmt: skip
    with pytest.raises(InvalidInputError, match="KeyedJaggedTensor caches"):
        one_group(kjt)
    if not gpu:
        with pytest.raises(
            InvalidInputError,
            match="TieredEmbeddingBagCollection cannot be captured: it lives on cpu",
        ):
            one_group(
                keys=["t0f0", "t1f0", "t2f0"],
                values=torch.tensor([1, 2, 3]),
                lengths=torch.ones(3, dtype=torch.int64),
            )
    assert graphs._capturing.forwards == []
