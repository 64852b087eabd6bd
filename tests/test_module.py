"""TieredEmbeddingBag against torch.nn.EmbeddingBag and torch.optim, on every backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore as ts

N, D = 300, 16
CACHES = [1, 7, 32, 150, N]  # one row, one small set, one full set, half, the whole table


def random_batch(gen, n_bags=12, max_len=9, num=N, zipf=True):
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    lengths[0] = 0  # always one empty bag
    n = int(lengths.sum())
    if zipf:  # skewed ids with repeats, like real traffic
        w = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 1.05
        idx = torch.multinomial(w, n, replacement=True, generator=gen)
    else:
        idx = torch.randint(0, num, (n,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    return idx, offsets


def table(device, cache_rows=32, policy="lru", optimizer=None, mode="sum", ways=8, **kw):
    return ts.TieredEmbeddingBag(
        N,
        D,
        mode=mode,
        cache=ts.CacheConfig(rows=cache_rows, ways=ways, policy=policy),
        optimizer=optimizer,
        device=device,
        seed=3,
        **kw,
    )


def snapshot(emb, num: int = N):
    """Everything a bad call must leave alone: the first ``num`` rows and their state, cache
    state and counters."""
    s = emb.store
    return [
        emb.read_rows(torch.arange(num), with_state=True).cpu(),
        s.l1.tags.cpu().clone(),
        s.l1.stamps.cpu().clone(),
        s.l1.locks.cpu().clone(),
        s.l1.dirty.cpu().clone(),
        s.l1.counters.cpu().clone(),
        torch.tensor(s.l1.step),
    ]


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("cache_rows", CACHES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_matches_embedding_bag(device, cache_rows, policy, mode):
    gen = torch.Generator().manual_seed(cache_rows * 31 + len(policy) + len(mode))
    emb = table(device, cache_rows, policy, mode=mode)
    ref = torch.nn.EmbeddingBag.from_pretrained(emb.read_rows(torch.arange(N)).cpu(), mode=mode)
    for step in range(6):
        idx, offs = random_batch(gen, zipf=step % 2 == 0)
        psw = torch.rand(idx.shape, generator=gen) if mode == "sum" and step % 3 == 0 else None
        idx_t = idx.to(torch.int32) if step % 2 else idx
        got = emb(idx_t.to(device), offs.to(device), psw)
        want = ref(idx, offs, per_sample_weights=psw)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


def test_forward_2d_input_and_include_last_offset(device):
    gen = torch.Generator().manual_seed(5)
    emb = table(device, 16, include_last_offset=True)
    ref = torch.nn.EmbeddingBag.from_pretrained(
        emb.read_rows(torch.arange(N)).cpu(), mode="sum", include_last_offset=True
    )
    idx, offs = random_batch(gen)
    offs_last = torch.cat([offs, torch.tensor([idx.numel()])])
    torch.testing.assert_close(emb(idx, offs_last).cpu(), ref(idx, offs_last), rtol=1e-6, atol=1e-7)
    emb2 = table(device, 16, mode="mean")
    ref2 = torch.nn.EmbeddingBag.from_pretrained(emb2.read_rows(torch.arange(N)).cpu(), mode="mean")
    x = torch.randint(0, N, (10, 4), generator=gen)
    torch.testing.assert_close(emb2(x).cpu(), ref2(x), rtol=1e-6, atol=1e-7)


def test_from_pretrained_and_write_rows(device):
    w = torch.randn(N, D)
    emb = ts.TieredEmbeddingBag.from_pretrained(w, cache=ts.CacheConfig(20, 4), device=device)
    assert torch.equal(emb.read_rows(torch.arange(N)).cpu(), w)
    ids = torch.tensor([5, 299, 0])
    emb(torch.tensor([5, 0, 1]), torch.tensor([0]))  # bring some rows into L1
    new = torch.randn(3, D)
    emb.write_rows(ids, new)
    assert torch.equal(emb.read_rows(ids).cpu(), new)
    emb.flush()
    assert torch.equal(emb.read_rows(ids).cpu(), new)


def test_prefetch_gives_the_same_result(device):
    gen = torch.Generator().manual_seed(11)
    a, b = table(device, 16, optimizer=ts.SGD(0.1)), table(device, 16, optimizer=ts.SGD(0.1))
    batches = [random_batch(gen) for _ in range(5)]
    for idx, offs in batches:
        b.prefetch(idx, offs)
    for idx, offs in batches:
        g = torch.randn(offs.numel(), D, generator=gen)
        a(idx, offs).backward(g.to(device))
        b(idx, offs).backward(g.to(device))
    assert torch.equal(a.read_rows(torch.arange(N)), b.read_rows(torch.arange(N)))
    assert int(b.store.l1.locks.sum()) == 0
    c = table(device, 16)
    c.prefetch(*batches[0])
    with pytest.raises(ts.InvalidInputError, match="prefetched"):
        c(*batches[1])


# ---------------------------------------------------------------------------- training
def train(emb_or_ref, batches, grads, opt=None, device="cpu"):
    for (idx, offs, psw), g in zip(batches, grads):
        if opt is None:
            y = emb_or_ref(idx.to(device), offs.to(device), None if psw is None else psw.to(device))
            y.backward(g.to(device))
        else:
            opt.zero_grad()
            emb_or_ref(idx, offs, per_sample_weights=psw).backward(g)
            opt.step()


def make_run(seed, steps=20, mode="sum"):
    gen = torch.Generator().manual_seed(seed)
    batches, grads = [], []
    for s in range(steps):
        idx, offs = random_batch(gen, zipf=s % 2 == 0)
        psw = torch.rand(idx.shape, generator=gen) if mode == "sum" and s % 2 else None
        batches.append((idx, offs, psw))
        grads.append(torch.randn(offs.numel(), D, generator=gen))
    return batches, grads


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (ts.SGD(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        (ts.Adagrad(lr=0.05), lambda p: torch.optim.Adagrad(p, lr=0.05)),
    ],
    ids=["sgd", "adagrad"],
)
def test_training_matches_torch_optim(device, mode, ours, theirs):
    batches, grads = make_run(21, mode=mode)
    emb = table(device, 24, "lru", optimizer=ours, mode=mode)
    w0 = emb.read_rows(torch.arange(N)).cpu()
    ref = torch.nn.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode, sparse=True)
    train(emb, batches, grads, device=device)
    train(ref, batches, grads, opt=theirs(ref.parameters()))
    torch.testing.assert_close(
        emb.read_rows(torch.arange(N)).cpu(), ref.weight.detach(), rtol=1e-5, atol=1e-6
    )
    assert not torch.equal(w0, ref.weight.detach())


def test_rowwise_adagrad_matches_its_formula(device):
    lr, eps = 0.05, 1e-10
    batches, grads = make_run(4)
    emb = table(device, 24, optimizer=ts.RowWiseAdagrad(lr=lr, eps=eps))
    w = emb.read_rows(torch.arange(N)).cpu().clone()
    state = torch.zeros(N)
    for (idx, offs, psw), g in zip(batches, grads):
        wr = w.clone().requires_grad_(True)
        torch.nn.functional.embedding_bag(
            idx, wr, offs, mode="sum", per_sample_weights=psw
        ).backward(g)
        rows = torch.unique(idx)
        gr = wr.grad[rows]
        state[rows] += (gr * gr).mean(1)
        w[rows] -= lr * gr / (state[rows].sqrt() + eps).unsqueeze(1)
    emb_y = emb
    train(emb_y, batches, grads, device=device)
    got = emb.read_rows(torch.arange(N), with_state=True).cpu()
    torch.testing.assert_close(got[:, :D], w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, D], state, rtol=1e-5, atol=1e-7)


def test_per_sample_weight_gradient_matches_torch(device):
    gen = torch.Generator().manual_seed(9)
    emb = table(device, 8, optimizer=None)
    ref = torch.nn.EmbeddingBag.from_pretrained(emb.read_rows(torch.arange(N)).cpu(), mode="sum")
    idx, offs = random_batch(gen)
    psw = torch.rand(idx.shape, generator=gen)
    g = torch.randn(offs.numel(), D, generator=gen)
    p1 = psw.clone().to(device).requires_grad_(True)
    emb(idx, offs, p1).backward(g.to(device))
    p2 = psw.clone().requires_grad_(True)
    ref(idx, offs, per_sample_weights=p2).backward(g)
    torch.testing.assert_close(p1.grad.cpu(), p2.grad, rtol=1e-5, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(
    configs=st.lists(
        st.tuples(
            st.integers(1, N + 40),
            st.sampled_from([1, 2, 4, 8, 32]),
            st.sampled_from(["lru", "lfu"]),
        ),
        min_size=2,
        max_size=3,
    ),
    opt=st.sampled_from(["sgd", "adagrad", "rowwise"]),
    seed=st.integers(0, 1000),
)
def test_transparency_bitwise_whatever_the_cache(configs, opt, seed):
    """docs/DESIGN.md's one rule: the trained rows do not depend on the cache (CPU backend)."""
    batches, grads = make_run(seed, steps=12)
    make_opt = {
        "sgd": lambda: ts.SGD(0.1),
        "adagrad": lambda: ts.Adagrad(0.1),
        "rowwise": lambda: ts.RowWiseAdagrad(0.1),
    }[opt]
    results = []
    for rows, ways, policy in configs:
        emb = table("cpu", rows, policy, optimizer=make_opt(), ways=ways)
        outs = []
        for (idx, offs, psw), g in zip(batches, grads):
            y = emb(idx, offs, psw)
            outs.append(y.detach().clone())
            y.backward(g)
        results.append((emb.read_rows(torch.arange(N), with_state=True), outs))
        assert int(emb.store.l1.locks.sum()) == 0
    for rows, outs in results[1:]:
        assert torch.equal(rows, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(outs, results[0][1]))


def test_transparency_on_device(device):
    """The same rule on each backend, with a tiny and a whole-table cache."""
    batches, grads = make_run(2, steps=10)
    out = []
    for rows, policy in [(1, "lru"), (13, "lfu"), (N, "lru")]:
        emb = table(device, rows, policy, optimizer=ts.RowWiseAdagrad(0.1))
        train(emb, batches, grads, device=device)
        out.append(emb.read_rows(torch.arange(N), with_state=True))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_stats_count_requests_hits_and_misses(device):
    emb = table(device, N, optimizer=None)
    emb(torch.tensor([1, 2, 2, 3]), torch.tensor([0, 2]))
    emb(torch.tensor([3, 4]), torch.tensor([0]))
    s = emb.stats()
    assert (s.requested, s.unique, s.hits, s.misses, s.conflict_misses) == (6, 5, 1, 4, 0)
    assert s.bytes_l2_to_l1 == 4 * D * 4
    emb.reset_stats()
    assert emb.stats().requested == 0


# ---------------------------------------------------------------------------- init and capacity
def test_initial_rows_are_deterministic_in_seed_and_id(device):
    a = ts.TieredEmbeddingBag(1000, 8, cache=ts.CacheConfig(rows=10), seed=5, device=device)
    b = ts.TieredEmbeddingBag(1000, 8, cache=ts.CacheConfig(rows=500), seed=5, device="cpu")
    c = ts.TieredEmbeddingBag(1000, 8, cache=ts.CacheConfig(rows=10), seed=6, device="cpu")
    ids = torch.tensor([0, 17, 999])
    assert torch.equal(a.read_rows(ids).cpu(), b.read_rows(ids))
    assert not torch.equal(b.read_rows(ids), c.read_rows(ids))
    assert b.read_rows(torch.arange(1000)).abs().max() <= 1 / 8**0.5


def test_a_table_too_large_for_host_memory_fails_at_construction():
    with pytest.raises(ts.CapacityError, match=r"SSD tier \(ssd=ts.SSDConfig"):
        ts.TieredEmbeddingBag(10**12, 128, cache=ts.CacheConfig(rows=1000), device="cpu")


# ---------------------------------------------------------------------------- bad input
BAD_CALLS = [
    ("out of range", lambda: (torch.tensor([0, N]), torch.tensor([0]), None), "num_embeddings"),
    ("negative", lambda: (torch.tensor([0, -1]), torch.tensor([0]), None), r"\[0, 300\)"),
    # 2-D input: its offsets are made, not checked, but its ids are
    ("2-d out of range", lambda: (torch.tensor([[0, 1], [N, 2]]), None, None), "num_embeddings"),
    ("2-d negative", lambda: (torch.tensor([[0, -1], [1, 2]]), None, None), r"\[0, 300\)"),
    ("float ids", lambda: (torch.tensor([0.0, 1.0]), torch.tensor([0]), None), "int32 or int64"),
    (
        "decreasing offsets",
        lambda: (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]), None),
        "non-decreasing",
    ),
    (
        "offset past the end",
        lambda: (torch.tensor([1, 2, 3]), torch.tensor([0, 4]), None),
        "exceed",
    ),
    (
        "first offset not 0",
        lambda: (torch.tensor([1, 2, 3]), torch.tensor([1, 2]), None),
        r"offsets\[0\]",
    ),
    (
        "float offsets",
        lambda: (torch.tensor([1, 2]), torch.tensor([0.0]), None),
        "offsets must be int",
    ),
    ("psw shape", lambda: (torch.tensor([1, 2]), torch.tensor([0]), torch.ones(3)), "shape"),
    (
        "psw dtype",
        lambda: (torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2, dtype=torch.float64)),
        "float32",
    ),
    ("missing offsets", lambda: (torch.tensor([1, 2]), None, None), "offsets are required"),
    ("3-d input", lambda: (torch.zeros(2, 2, 2, dtype=torch.int64), None, None), "dims"),
]


@pytest.mark.parametrize("what, make, message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_and_leaves_the_table_unchanged(device, what, make, message):
    emb = table(device, 16, optimizer=ts.Adagrad(0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # some history: cached, dirty and trained rows
        idx, offs = random_batch(gen)
        emb(idx, offs).sum().backward()
    before = snapshot(emb)
    idx, offs, psw = make()
    with pytest.raises(ts.InvalidInputError, match=message):
        emb(idx, offs, psw)
    with pytest.raises(ts.InvalidInputError):  # a prefetch raises at once or at its forward
        if psw is None:
            emb.prefetch(idx, offs)
        emb(idx, offs, psw)
    for a, b in zip(before, snapshot(emb)):
        assert torch.equal(a, b), what


def test_psw_with_mean_and_bad_rows_raise(device):
    emb = table(device, 16, mode="mean")
    before = snapshot(emb)
    with pytest.raises(ts.InvalidInputError, match="mode='sum'"):
        emb(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))
    with pytest.raises(ts.InvalidInputError, match="shape"):
        emb.write_rows(torch.tensor([1, 2]), torch.ones(2, D + 1))
    with pytest.raises(ts.InvalidInputError, match="unique"):
        emb.write_rows(torch.tensor([1, 1]), torch.ones(2, D))
    with pytest.raises(ts.InvalidInputError, match="num_embeddings"):
        emb.read_rows(torch.tensor([N]))
    for a, b in zip(before, snapshot(emb)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "median"}, "mode"),
        ({"dtype": torch.float16}, "dtype"),
        ({"cache": 16}, "cache must be a ts.CacheConfig"),
        ({"ssd": "table"}, "ssd must be a ts.SSDConfig"),
        ({"seed": 1.5}, "seed"),
        ({"init_scale": 0.0}, "init_scale"),
    ],
)
def test_bad_construction_arguments(kwargs, message):
    """(The configs' own checks: tests/test_config.py.)"""
    args = {"cache": ts.CacheConfig(rows=16), "device": "cpu", **kwargs}
    with pytest.raises(ts.InvalidInputError, match=message):
        ts.TieredEmbeddingBag(N, D, **args)


@pytest.mark.parametrize("depth", [1, 2])
def test_pipelined_prefetch_is_transparent(device, depth):
    """prefetch(t + depth) before forward(t), with a cache so small that rows of one batch are
    conflict misses while they are filled in for the next: training ends in the same rows."""
    batches, grads = make_run(17, steps=16)
    ref = table(device, N, optimizer=ts.Adagrad(0.1))
    train(ref, batches, grads, device=device)
    emb = table(device, 6, optimizer=ts.Adagrad(0.1), ways=2)
    for idx, offs, _ in batches[:depth]:
        emb.prefetch(idx.to(device), offs.to(device))
    for t, ((idx, offs, psw), g) in enumerate(zip(batches, grads)):
        if t + depth < len(batches):
            emb.prefetch(batches[t + depth][0].to(device), batches[t + depth][1].to(device))
        emb(idx.to(device), offs.to(device), None if psw is None else psw.to(device)).backward(
            g.to(device)
        )
    assert emb.stats().conflict_misses > 0
    assert torch.equal(
        emb.read_rows(torch.arange(N), with_state=True),
        ref.read_rows(torch.arange(N), with_state=True),
    )
    assert int(emb.store.l1.locks.sum()) == 0
