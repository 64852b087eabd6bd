"""``cuda_rows.victim_order``, the order in which ``move_rows`` writes dirty victims back: their
L2 addresses ascending (a kernel's writes over PCIe run 2.3x faster so), against a brute-force
ordering, on the CPU (torch's stable sort) and on CUDA (the radix sort of kernels/sort.cu); and
the CUDA cache's ``WritebackWatch``, by which the moves skip that sort while no victim is dirty."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import tierstore as ts
from tierstore import stats as st
from tierstore.cuda_cache import WritebackWatch
from tierstore.cuda_rows import victim_order


def fake_step(n: int, fills: int, l2_rows: int, seed: int, device: str):
    """A store and a cache step's fill buffers of ``n`` entries, the first ``fills`` used: each
    fill's slot (distinct), each slot's L2 home (distinct rows of ``l2_rows``), random dirty
    bits, and garbage past ``fills`` as a sync-free step leaves it."""
    g = torch.Generator().manual_seed(seed)
    capacity = n + 3
    l1_home = torch.randperm(l2_rows, generator=g)[:capacity]
    slots = torch.randperm(capacity, generator=g)[:n]
    slots[fills:] = torch.randint(-(1 << 40), 1 << 40, (n - fills,), generator=g)
    dirty = torch.randint(0, 2, (n,), generator=g).bool()
    store = SimpleNamespace(
        device=torch.device(device),
        l1=SimpleNamespace(home=l1_home.to(device)),
        host=SimpleNamespace(data=torch.empty(l2_rows, 0)),
    )
    found = SimpleNamespace(
        fill_slots_buffer=slots.to(device),
        victim_dirty_buffer=dirty.to(device),
        n_fill=torch.tensor([fills], dtype=torch.int32, device=device),
    )
    return store, found, l1_home, slots, dirty


def expected_order(fills: int, l1_home, slots, dirty) -> list[int]:
    """The used fills with a dirty victim by their victim's home, then the used fills with a
    clean victim in position order (the entries past ``fills`` are unused)."""
    written = [f for f in range(fills) if dirty[f]]
    written.sort(key=lambda f: int(l1_home[slots[f]]))
    first = set(written)
    return written + [f for f in range(fills) if f not in first]


@settings(max_examples=60, deadline=None)
@given(
    n=hs.integers(1, 300),
    share=hs.floats(0, 1),
    l2_rows=hs.sampled_from([400, 1000, 1 << 20]),
    seed=hs.integers(0, 2**31 - 1),
)
def test_dirty_victims_go_back_in_address_order(n, share, l2_rows, seed):
    fills = int(share * n)
    store, found, l1_home, slots, dirty = fake_step(n, fills, l2_rows, seed, "cpu")
    got = victim_order(store, found)
    assert got.dtype == torch.int32 and got.numel() == n
    assert got[:fills].tolist() == expected_order(fills, l1_home, slots, dirty)


@pytest.mark.gpu
def test_the_device_radix_sort_gives_the_same_order():
    for seed, (n, fills) in enumerate(
        [(1, 1), (300, 200), (5000, 4999), (70_000, 30_000), (70_000, 4097), (9000, 0)]
    ):
        store, found, l1_home, slots, dirty = fake_step(n, fills, 1 << 20, seed, "cuda")
        got = victim_order(store, found).cpu()
        assert got[:fills].tolist() == expected_order(fills, l1_home, slots, dirty)


@pytest.mark.gpu
@pytest.mark.parametrize("sort", [True, False])
def test_writebacks_in_either_order_train_the_same_rows(monkeypatch, sort):
    """The row moves write dirty victims back sorted by L2 address or, where the cache's watch
    saw no writeback lately, in fill order: either way the trained rows (with their state) are
    the CPU backend's."""
    monkeypatch.setattr(WritebackWatch, "lately", lambda self: sort)
    num, dim, seed = 600, 16, random.randrange(1 << 30)
    kw = dict(mode="sum", cache=ts.CacheConfig(rows=40, ways=4),
              optimizer=ts.RowWiseAdagrad(lr=0.1))  # fmt: skip
    cpu_emb = ts.TieredEmbeddingBag(num, dim, device="cpu", **kw)
    gpu_emb = ts.TieredEmbeddingBag(num, dim, device="cuda", **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(8):
        x = torch.randint(0, num, (32, 4), generator=gen)
        g = torch.randn(32, dim, generator=gen)
        cpu_emb(x).backward(g)
        gpu_emb(x.cuda()).backward(g.cuda())
    assert gpu_emb.stats().writebacks > 0, seed  # the moves did write rows back
    ids = torch.arange(num)
    got = gpu_emb.read_rows(ids.cuda(), with_state=True).cpu()
    want = cpu_emb.read_rows(ids, with_state=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


@pytest.mark.gpu
def test_the_watch_reads_the_writeback_counter_without_waiting():
    """WritebackWatch.lately: True until its first reading lands, then whether the counter
    moved between its last two readings (each reading queued by the call before)."""
    counters = torch.zeros(st.N_COUNTERS, dtype=torch.int64, device="cuda")
    watch = WritebackWatch(counters)
    assert watch.lately()  # nothing read yet: sort
    torch.cuda.synchronize()
    assert not watch.lately()  # read 0
    counters[st.WRITEBACKS] += 3
    torch.cuda.synchronize()
    assert not watch.lately()  # the reading queued before the writebacks: still 0
    torch.cuda.synchronize()
    assert watch.lately()  # 0 -> 3
    torch.cuda.synchronize()
    assert not watch.lately()  # 3 -> 3
