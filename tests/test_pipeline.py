"""The prefetch pipeline (tierstore/pipeline.py): a prefetched loop trains and reads bitwise as
the plain loop, at any depth and cache size, releases every lock, and refuses a forward that is
not the oldest prefetched batch's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore as ts

N, D = 300, 8


def zipf_batches(seed: int, steps: int, bags: int = 10, max_len: int = 7, num: int = N):
    """Fresh skewed batches ``(indices, offsets)`` with repeats and empty bags."""
    gen = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 1.05
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, max_len + 1, (bags,), generator=gen)
        idx = torch.multinomial(w, int(lengths.sum()), replacement=True, generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        out.append((idx, offsets))
    return out


def make(device, cache_rows, policy="lru", optimizer=None, ways=4, **kw):
    return ts.TieredEmbeddingBag(
        N, D, mode="sum", cache=ts.CacheConfig(rows=cache_rows, ways=ways, policy=policy),
        optimizer=optimizer or ts.RowWiseAdagrad(lr=0.1), device=device, seed=5, **kw,
    )  # fmt: skip


def to(batch, device):
    return tuple(t.to(device) for t in batch)


def train(emb, batches, device, depth=None):
    """Outputs of a training loop, plain (depth None) or prefetched ``depth`` ahead."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(len(b[1]), D, generator=gen).to(device) for b in batches]
    batches = [to(b, device) for b in batches]
    loop = batches if depth is None else ts.prefetching(batches, emb, depth=depth)
    outs = []
    for k, (idx, offs) in enumerate(loop):
        y = emb(idx, offs)
        y.backward(grads[k])
        outs.append(y.detach().cpu())
    return outs


def no_locks(emb) -> bool:
    """No batch holds a row: L1 unlocked; an SSD tier's L2 holds only its pins of L1's rows."""
    return emb.store.held_locks() == 0


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("cache_rows", [1, 8, 64, N])
def test_prefetched_training_equals_the_plain_loop(device, depth, cache_rows):
    batches = zipf_batches(depth * 7 + cache_rows, 12)
    ref = make(device, cache_rows)
    want = train(ref, batches, device)
    emb = make(device, cache_rows)
    got = train(emb, batches, device, depth)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    rows = torch.arange(N, device=device)
    assert torch.equal(ref.read_rows(rows, True), emb.read_rows(rows, True))
    assert no_locks(emb)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    depth=st.integers(0, 3),
    cache_rows=st.integers(1, 40),
    ways=st.sampled_from([1, 2, 4, 8]),
    policy=st.sampled_from(["lru", "lfu"]),
    opt=st.sampled_from(["sgd", "adagrad", "rowwise"]),
)
def test_prefetching_is_transparent_on_cpu(seed, depth, cache_rows, ways, policy, opt):
    optimizer = {"sgd": ts.SGD(0.2), "adagrad": ts.Adagrad(0.1), "rowwise": ts.RowWiseAdagrad(0.1)}
    batches = zipf_batches(seed, 8)
    ref = make("cpu", cache_rows, policy, optimizer[opt], ways)
    emb = make("cpu", cache_rows, policy, optimizer[opt], ways)
    for a, b in zip(train(ref, batches, "cpu"), train(emb, batches, "cpu", depth)):
        assert torch.equal(a, b)
    rows = torch.arange(N)
    assert torch.equal(ref.read_rows(rows, True), emb.read_rows(rows, True))
    assert no_locks(emb)


def test_prefetching_with_an_ssd_tier_is_transparent(tmp_path):
    batches = zipf_batches(11, 10)
    ref = make("cpu", 4)
    emb = make("cpu", 4, ssd=ts.SSDConfig(tmp_path / "t", host_rows=96))
    for a, b in zip(train(ref, batches, "cpu"), train(emb, batches, "cpu", 2)):
        assert torch.equal(a, b)
    rows = torch.arange(N)
    assert torch.equal(ref.read_rows(rows, True), emb.read_rows(rows, True))
    assert no_locks(emb)
    emb.close()


def test_an_update_is_seen_by_the_next_prefetched_forward(device):
    # every batch reads row 7; a 1-row cache makes it a fill, a hit or a conflict miss in turn
    batches = [(torch.tensor([7, k % 5, 7]), torch.tensor([0, 2])) for k in range(6)]
    ref, emb = make(device, 1, ways=1), make(device, 1, ways=1)
    for a, b in zip(train(ref, batches, device), train(emb, batches, device, 2)):
        assert torch.equal(a, b)
    assert torch.equal(ref.read_rows(torch.tensor([7])), emb.read_rows(torch.tensor([7])))


def with_tier(device, tier, tmp_path, name):
    """A 16-row-L1 table all in L2 (``tier`` None) or over an SSD tier."""
    if tier is None:
        return make(device, 16)
    return make(device, 16, ssd=ts.SSDConfig(tmp_path / name, host_rows=160))


@pytest.mark.parametrize("tier", [None, "ssd"])
def test_inference_loops_release_every_lock(device, tier, tmp_path):
    emb = with_tier(device, tier, tmp_path, "emb")
    batches = [to(b, device) for b in zipf_batches(3, 40)]
    ref = with_tier(device, tier, tmp_path, "ref")
    with torch.no_grad():
        want = [ref(*b) for b in batches]
        got = [emb(*b) for b in ts.prefetching(batches, emb, depth=2)]
        # prefetch then a forward that no backward follows (grad enabled, output dropped)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for idx, offs in batches[:5]:
        emb.prefetch(idx, offs)
        emb(idx, offs)
    assert no_locks(emb)


@pytest.mark.parametrize("tier", [None, "ssd"])
def test_unconsumed_batches_are_released(device, tier, tmp_path):
    emb = with_tier(device, tier, tmp_path, "emb")
    batches = [to(b, device) for b in zipf_batches(4, 6)]
    for idx, offs in batches[:3]:
        emb.prefetch(idx, offs)
    with pytest.raises(ts.InvalidInputError, match="oldest prefetched"):
        emb(*batches[4])
    emb.clear_prefetched()
    assert no_locks(emb)
    emb(*batches[4]).sum().backward()  # the queue is empty: a plain forward works
    for b in ts.prefetching(batches, emb, depth=3):  # a loop left early releases its look-ahead
        emb(*b).sum().backward()
        break
    assert no_locks(emb)
    emb.prefetch(*batches[0])
    emb.close()
    assert no_locks(emb)


def test_prefetching_checks_its_arguments():
    emb = make("cpu", 8)
    with pytest.raises(ts.InvalidInputError, match="depth"):
        list(ts.prefetching([], emb, depth=-1))
    with pytest.raises(ts.InvalidInputError, match="index tensor"):
        list(ts.prefetching(["x"], emb))
    with pytest.raises(ts.InvalidInputError, match="prefetch"):
        list(ts.prefetching([torch.tensor([[1]])], [torch.nn.Linear(1, 1)]))


@pytest.mark.gpu
def test_the_prefetched_loop_never_syncs_the_host():
    emb = make("cuda", 64)
    batches = [to(b, "cuda") for b in zipf_batches(9, 12)]
    grads = [torch.randn(len(b[1]), D, device="cuda") for b in batches]
    it = ts.prefetching(batches, emb, depth=1)
    for k, (idx, offs) in enumerate(it):
        if k == 3:  # warm: kernels compiled, pools sized
            torch.cuda.set_sync_debug_mode("error")
        try:
            emb(idx, offs).backward(grads[k])
        finally:
            if k == len(batches) - 1:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("default")
    assert no_locks(emb)


@pytest.mark.gpu
def test_l2_marks_every_row_it_was_written():
    """A fill computes a never-written row from its id (kernels/insert.cu move_rows): so L2's
    map of written rows must cover every row whose L2 value left its initial one."""
    emb = make("cuda", 24, optimizer=ts.SGD(0.3))
    batches = [to(b, "cuda") for b in zipf_batches(12, 30)]
    for idx, offs in ts.prefetching(batches, emb, depth=1):
        emb(idx, offs).sum().backward()
    host = emb.store.host
    initial = emb.store.init_rows(torch.arange(N, device="cuda")).cpu()
    changed = (host.data != initial).any(1)
    assert bool(changed.any())  # evictions wrote trained rows back
    assert not bool((changed & (host.written == 0)).any())
    ref = make("cpu", N, optimizer=ts.SGD(0.3))
    for idx, offs in batches:
        ref(idx.cpu(), offs.cpu()).sum().backward()
    rows = torch.arange(N)
    assert torch.allclose(emb.read_rows(rows.cuda()).cpu(), ref.read_rows(rows), atol=1e-6)


def test_l2_map_of_written_rows_covers_every_write_path(tmp_path):
    """Every way a row reaches L2 (evictions, write_rows, flush, a checkpoint load) marks it
    written: a row left unmarked must still hold its initial value, which the CUDA fills then
    compute instead of reading."""
    emb = make("cpu", 8, optimizer=ts.SGD(0.3))
    for idx, offs in zipf_batches(21, 12):
        emb(idx, offs).sum().backward()
    emb.write_rows(torch.tensor([N - 1, N - 2]), torch.randn(2, D))
    emb.flush()
    host = emb.store.host
    initial = emb.store.init_rows(torch.arange(N))
    unmarked = host.written == 0
    assert bool(unmarked.any()) and bool((~unmarked).any())
    assert torch.equal(host.data[unmarked], initial[unmarked])
    other = make("cpu", 8, optimizer=ts.SGD(0.3))
    other.load_state_dict(emb.state_dict())
    host = other.store.host
    assert torch.equal(host.data[host.written == 0], initial[host.written == 0])
    assert torch.equal(other.read_rows(torch.arange(N), True), emb.read_rows(torch.arange(N), True))
