"""The CUDA backend against the CPU backend, step for step, on fresh random traces.

Every test here needs a CUDA device and CuPy (the ``gpu`` marker). The cache state (tags,
stamps, dirty bits, locks, counters, sketch) must be identical after every step; pooled outputs
and trained rows equal within 1e-6 relative.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from dataclasses import dataclass

import cuda_checks
import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import cuda_bags, cuda_unique, hashing
from tierstore.cache import EMPTY, SetAssociativeCache
from tierstore.errors import FallbackWarning
from tierstore.hashing import tag_digest
from tierstore.policy import LRU, FrequencySketch

pytestmark = pytest.mark.gpu


def _cuda():
    from tierstore import cuda

    return cuda


def _trace(rng: np.random.Generator, dist: str, rows: int, n: int) -> torch.Tensor:
    """``n`` row ids in ``[0, rows)``: uniform, or Zipf(1.05) over a random permutation."""
    if dist == "uniform":
        ids = rng.integers(0, rows, n)
    else:
        ids = (rng.zipf(1.05, n) - 1) % rows
        ids = rng.permutation(rows)[ids] if rows <= 1 << 20 else ids
    return torch.from_numpy(ids.astype(np.int64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


# ----------------------------------------------------------------------------- hashing
def test_hashing_bit_identical():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(-(1 << 62), 1 << 62, (100_000,), generator=gen)
    ids[:4] = torch.tensor([0, 1, -1, (1 << 63) - 1])
    for sets in (1, 3, 1000, (1 << 31) - 1):
        mixed, set_of = cuda_checks.hash_ids(ids.cuda(), sets)
        assert torch.equal(mixed.cpu(), hashing.mix64(ids))
        assert torch.equal(set_of.cpu(), hashing.set_index(ids, sets))


@pytest.mark.parametrize(
    "dim,state,seed,scale", [(128, 1, 0, 0.088), (7, 7, 3, 1.0), (33, 0, -5, 0.5)]
)
def test_initial_rows_bit_identical(dim, state, seed, scale):
    ids = torch.randint(0, 1 << 40, (5000,))
    got = cuda_checks.initial_rows(ids.cuda(), dim, dim + state, seed, scale, 0.25).cpu()
    want = hashing.initial_weights(ids, dim, seed, scale)
    assert torch.equal(got[:, :dim], want)
    assert (got[:, dim:] == 0.25).all()


def test_sketch_kernels_match():
    cpu_sk = FrequencySketch(256, 500)
    gpu_sk = FrequencySketch(256, 500, "cuda")
    rng = np.random.default_rng(2)
    for _ in range(30):
        ids, counts = torch.unique(_trace(rng, "zipf", 5000, 300), return_counts=True)
        want = cpu_sk.add(ids, counts)
        cuda_checks.sketch_add(gpu_sk, ids.cuda(), counts.cuda())
        assert torch.equal(cuda_checks.sketch_estimate(gpu_sk, ids.cuda()).cpu(), want)
        aged = bool(cpu_sk.age_if_due())
        assert bool(cuda_checks.sketch_age_if_due(gpu_sk).item()) == aged
        assert torch.equal(gpu_sk.counters.cpu(), cpu_sk.counters)
        assert int(gpu_sk.additions) == int(cpu_sk.additions)


# ------------------------------------------------------------------------ the cache step
def _same_cache(g: SetAssociativeCache, c: SetAssociativeCache) -> None:
    assert torch.equal(g.tags.cpu(), c.tags)
    assert torch.equal(g.stamps.cpu(), c.stamps)
    assert torch.equal(g.dirty.cpu(), c.dirty)
    assert torch.equal(g.locks.cpu(), c.locks)
    assert torch.equal(g.counters.cpu(), c.counters)
    assert g.step == c.step
    if c.sketch is not None:
        assert torch.equal(g.sketch.counters.cpu(), c.sketch.counters)
        assert int(g.sketch.additions) == int(c.sketch.additions)
    # the probe's digests agree with the tags wherever a way holds a row
    held = c.tags != EMPTY
    assert torch.equal(g.digests.cpu()[:, : c.ways][held], tag_digest(c.tags[held]))


CACHES = [(1, 32), (5, 4), (64, 8), (100, 32), (1000, 32), (4096, 64), (20_000, 16)]


def _padded(ids: torch.Tensor, counts: torch.Tensor, rng) -> tuple:
    """A sync-free step's inputs: the batch in buffers with junk after it, U on the device."""
    junk = int(rng.integers(0, 2 * ids.numel() + 2))
    ids = torch.cat([ids, torch.from_numpy(rng.integers(-5, 10**9, junk))])
    counts = torch.cat([counts, torch.from_numpy(rng.integers(-3, 99, junk))])
    count = torch.tensor([ids.numel() - junk], dtype=torch.int32, device="cuda")
    return ids.cuda(), counts.cuda(), count


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("rows,ways", CACHES)
@pytest.mark.parametrize("sync_free", [False, True])
def test_cache_step_matches_cpu(policy, dist, rows, ways, sync_free):
    """Every step of the kernels' cache equals the CPU's, field for field; ``sync_free``: the
    unique count given as a device scalar, the ids in longer buffers (store.lookup's way)."""
    cuda = _cuda()
    seed = hash((policy, dist, rows, ways, sync_free)) % 1000
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    cpu_cache = SetAssociativeCache(rows, ways, policy, "cpu")
    gpu_cache = cuda.new_cache(rows, ways, policy, torch.device("cuda"))
    if policy == "lfu":  # a small sketch that halves often, so aging is exercised
        cpu_cache.sketch = FrequencySketch(128, 3 * rows + 50)
        gpu_cache.sketch = FrequencySketch(128, 3 * rows + 50, "cuda")
    table = max(4 * rows, 50)
    in_flight = prng.choice([0, 1, 2])
    pending = deque()
    for step in range(25):
        n = prng.choice([1, 7, 64, 500, 3 * rows])
        ids, counts = torch.unique(_trace(rng, dist, table, n), return_counts=True)
        want = cpu_cache.lookup(ids, counts)
        count = None
        if sync_free:
            ids_buffer, counts_buffer, count = _padded(ids, counts, rng)
            got = gpu_cache.lookup(ids_buffer, counts_buffer, count=count)
        else:
            got = gpu_cache.lookup(ids.cuda(), counts.cuda())
        t = got.trimmed()
        assert torch.equal(t.slots.cpu(), want.slots), f"step {step}"
        for field in ("ids", "fill_index", "fill_slots", "victim_ids", "victim_dirty", "hit"):
            assert torch.equal(getattr(t, field).cpu(), getattr(want, field)), (step, field)
        _same_cache(gpu_cache, cpu_cache)
        placed = want.slots[want.slots >= 0]
        dirty = placed[torch.randperm(placed.numel())[: placed.numel() // 2]]
        cpu_cache.mark_dirty(dirty)
        gpu_cache.mark_dirty(dirty.cuda())
        pending.append((want.slots, got.slots, count))
        while len(pending) > in_flight:
            cs, gs, gc = pending.popleft()
            cpu_cache.release(cs)
            gpu_cache.release(gs, gc)
        _same_cache(gpu_cache, cpu_cache)
        assert torch.equal(gpu_cache.find(ids.cuda()).cpu(), cpu_cache.find(ids))


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru_torch"])
@pytest.mark.parametrize("rows,ways", [(64, 8), (300, 32), (5000, 32)])
@pytest.mark.parametrize("sync_free", [False, True])
def test_cache_step_without_hold_matches_lookup_and_release(policy, rows, ways, sync_free):
    """A step that holds no locks (an inference forward's, ``hold=False``) ends in the state of
    the CPU's step followed at once by its release, and places the same rows, also with
    crowded sets (conflict misses) and other batches in flight, whose locks it must respect."""
    cuda = _cuda()
    seed = hash((policy, rows, ways, sync_free)) % 1000
    rng = np.random.default_rng(seed)
    make = {"lru_torch": _TorchOnlyLru}.get(policy, lambda: policy)
    cpu_cache = SetAssociativeCache(rows, ways, make(), "cpu")
    gpu_cache = cuda.new_cache(rows, ways, make(), torch.device("cuda"))
    in_flight = deque()
    for step in range(30):
        n = int(rng.choice([1, 7, 64, 3 * rows]))
        ids, counts = torch.unique(_trace(rng, "zipf", 4 * rows, n), return_counts=True)
        want = cpu_cache.lookup(ids, counts)
        if step % 3 == 0:  # a held batch (a prefetch), released two steps later
            got = gpu_cache.lookup(ids.cuda(), counts.cuda())
            assert getattr(got, "holds", True)
            in_flight.append((want.slots, got.slots))
        else:
            count = None
            if sync_free:
                ids_buffer, counts_buffer, count = _padded(ids, counts, rng)
                got = gpu_cache.lookup(ids_buffer, counts_buffer, count=count, hold=False)
            else:
                got = gpu_cache.lookup(ids.cuda(), counts.cuda(), hold=False)
            cpu_cache.release(want.slots)
            if getattr(got, "holds", True):  # a policy without kernels locks as usual
                gpu_cache.release(got.slots, count)
        t = got.trimmed() if hasattr(got, "trimmed") else got
        assert torch.equal(t.slots.cpu(), want.slots), step
        assert torch.equal(t.victim_ids.cpu(), want.victim_ids), step
        while len(in_flight) > 1 or (in_flight and step % 3 == 2):
            cs, gs = in_flight.popleft()
            cpu_cache.release(cs)
            gpu_cache.release(gs)
        _same_cache(gpu_cache, cpu_cache)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru_torch"])
def test_cache_step_with_colliding_digests(policy):
    """Rows of one set that share their digest: the probe must tell them apart by the tag (a
    digest match alone is not a hit). ``lru_torch`` has no kernels: its torch step must keep the
    digests too."""
    cuda = _cuda()
    rng = np.random.default_rng(11)
    candidates = torch.from_numpy(rng.choice(1 << 40, 200_000, replace=False))
    same = candidates[tag_digest(candidates) == 7][:96]  # one set: every row lands in it
    assert same.numel() == 96
    make = {"lru_torch": _TorchOnlyLru}.get(policy, lambda: policy)
    cpu_cache = SetAssociativeCache(32, 32, make(), "cpu")
    gpu_cache = cuda.new_cache(32, 32, make(), torch.device("cuda"))
    for _ in range(30):
        ids = torch.unique(same[torch.from_numpy(rng.integers(0, 96, 40))])
        counts = torch.from_numpy(rng.integers(1, 4, ids.numel()))
        want = cpu_cache.lookup(ids, counts)
        got = gpu_cache.lookup(ids.cuda(), counts.cuda())
        assert torch.equal(got.slots.cpu(), want.slots)
        assert torch.equal(gpu_cache.find(same.cuda()).cpu(), cpu_cache.find(same))
        _same_cache(gpu_cache, cpu_cache)
        cpu_cache.release(want.slots)
        gpu_cache.release(got.slots)


class _TorchOnlyLru(LRU):
    """LRU declaring no CUDA functor (a subclass inherits none): the CUDA cache steps it with
    torch ops."""

    name = "lru_torch"


def test_cache_step_large_batch():
    """A batch far larger than the cache's sets, every miss landing on few sets."""
    cuda = _cuda()
    rng = np.random.default_rng(5)
    for rows, ways in [(64, 32), (4096, 32)]:
        cpu_cache = SetAssociativeCache(rows, ways, "lru", "cpu")
        gpu_cache = cuda.new_cache(rows, ways, "lru", torch.device("cuda"))
        for _ in range(3):
            ids, counts = torch.unique(_trace(rng, "uniform", 1 << 20, 200_000), return_counts=True)
            want = cpu_cache.lookup(ids, counts)
            got = gpu_cache.lookup(ids.cuda(), counts.cuda())
            assert torch.equal(got.slots.cpu(), want.slots)
            _same_cache(gpu_cache, cpu_cache)
            cpu_cache.release(want.slots)
            gpu_cache.release(got.slots)


def test_the_cuda_cache_takes_its_kernels_from_the_policy():
    """A policy's declared functor picks the kernels; one that declares none is stepped by
    torch (not sync-free), and a warning says so; the registered ones warn nothing."""
    cuda = _cuda()
    with pytest.warns(FallbackWarning, match="'lru_torch' declares no cuda_functor"):
        cache = cuda.new_cache(64, 8, _TorchOnlyLru(), torch.device("cuda"))
    assert cache.functor is None and not cache.sync_free
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        for policy in ("lru", "lfu"):
            cache = cuda.new_cache(64, 8, policy, torch.device("cuda"))
            assert cache.functor is cache.policy.cuda_functor and cache.sync_free


@dataclass(frozen=True)
class _TorchOnlySgd(ts.SGD):
    """SGD declaring no CUDA functor (a subclass inherits none): its updates run as torch ops."""

    name = "sgd_torch"


def test_an_optimizer_without_a_functor_trains_as_torch_with_a_warning():
    """The CUDA backward of an optimizer with no functor is the CPU's torch update, run on the
    device: rows as the CPU table's, stats and cache alike, and a FallbackWarning."""
    num, dim = 300, 12
    cpu_emb, gpu_emb = _pair(num, dim, mode="sum", cache=ts.CacheConfig(rows=40, ways=8),
                             optimizer=_TorchOnlySgd(lr=0.1))  # fmt: skip
    rng = np.random.default_rng(17)
    for _ in range(6):
        x = _trace(rng, "zipf", num, 24 * 5).view(24, 5)
        g = torch.randn(24, dim)
        cpu_emb(x).backward(g)
        with pytest.warns(FallbackWarning, match="'sgd_torch' declares no cuda_functor"):
            gpu_emb(x.cuda()).backward(g.cuda())
        _check_rows(cpu_emb, gpu_emb, num)
    assert gpu_emb.stats() == cpu_emb.stats()
    _same_cache(gpu_emb.store.l1, cpu_emb.store.l1)


# ----------------------------------------------------------------- the module, end to end
OPTIMIZERS = [None, ts.SGD(lr=0.1), ts.Adagrad(lr=0.1), ts.RowWiseAdagrad(lr=0.1)]


def _pair(num, dim, **kw):
    return (
        ts.TieredEmbeddingBag(num, dim, device="cpu", **kw),
        ts.TieredEmbeddingBag(num, dim, device="cuda", **kw),
    )


def _check_rows(cpu_emb, gpu_emb, num):
    ids = torch.arange(num)
    want = cpu_emb.read_rows(ids, with_state=True)
    got = gpu_emb.read_rows(ids.cuda(), with_state=True)
    assert _rel(got, want) <= 1e-6


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name if o else "none")
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("cache_rows", [1, 40, 1000])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_module_matches_cpu(opt, mode, cache_rows, policy):
    num, dim = 700, 24
    cache = ts.CacheConfig(rows=cache_rows, ways=8, policy=policy)
    cpu_emb, gpu_emb = _pair(num, dim, mode=mode, cache=cache, optimizer=opt)
    assert gpu_emb.store.backend.name == "cuda"
    rng = np.random.default_rng(cache_rows + len(mode))
    for step in range(12):
        bags, length = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        dist = "zipf" if step % 2 else "uniform"
        x = _trace(rng, dist, num, bags * length).view(bags, length)
        use_psw = mode == "sum" and step % 3 == 0
        psw = torch.rand(bags, length) if use_psw else None
        y_cpu = cpu_emb(x, per_sample_weights=psw)
        y_gpu = gpu_emb(x.cuda(), per_sample_weights=psw.cuda() if use_psw else None)
        assert _rel(y_gpu, y_cpu) <= 1e-6, step
        if opt is not None:
            g = torch.randn_like(y_cpu)
            y_cpu.backward(g)
            y_gpu.backward(g.cuda())
        if step % 4 == 3:  # an inference forward between training steps (no transpose)
            with torch.no_grad():
                assert _rel(gpu_emb(x.cuda()), cpu_emb(x)) <= 1e-6, step
        _check_rows(cpu_emb, gpu_emb, num)
        assert gpu_emb.stats() == cpu_emb.stats()
        _same_cache(gpu_emb.store.l1, cpu_emb.store.l1)


@pytest.mark.parametrize("dim", [1, 31, 128, 129, 300])
def test_module_dims_and_offsets(dim):
    """Ragged bags given by offsets (empty bags too), odd dims, psw gradients."""
    num = 500
    opt = ts.RowWiseAdagrad(lr=0.05) if dim % 2 else ts.Adagrad(lr=0.05)
    cpu_emb, gpu_emb = _pair(
        num, dim, mode="sum", cache=ts.CacheConfig(rows=64, ways=4), optimizer=opt
    )
    rng = np.random.default_rng(dim)
    for _ in range(6):
        n = int(rng.integers(1, 300))
        idx = _trace(rng, "zipf", num, n)
        cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(1, 20))))
        offsets = torch.from_numpy(np.concatenate([[0], cuts]).astype(np.int64))
        psw = torch.rand(n, requires_grad=True)
        psw_g = psw.detach().cuda().requires_grad_()
        y_cpu = cpu_emb(idx, offsets, per_sample_weights=psw)
        y_gpu = gpu_emb(idx.cuda(), offsets.cuda(), per_sample_weights=psw_g)
        assert _rel(y_gpu, y_cpu) <= 1e-6
        g = torch.randn_like(y_cpu)
        y_cpu.backward(g)
        y_gpu.backward(g.cuda())
        assert _rel(psw_g.grad, psw.grad) <= 1e-6
        _check_rows(cpu_emb, gpu_emb, num)
    assert gpu_emb.stats() == cpu_emb.stats()


def test_flush_writes_every_row_back():
    num, dim = 3000, 16
    cpu_emb, gpu_emb = _pair(num, dim, cache=ts.CacheConfig(rows=200), optimizer=ts.SGD(lr=0.5))
    rng = np.random.default_rng(9)
    for _ in range(10):
        x = _trace(rng, "zipf", num, 64 * 8).view(64, 8)
        cpu_emb(x).sum().backward()
        gpu_emb(x.cuda()).sum().backward()
    cpu_emb.flush()
    gpu_emb.flush()
    assert int(gpu_emb.store.l1.dirty.sum()) == 0
    assert _rel(gpu_emb.store.host.data, cpu_emb.store.host.data) <= 1e-6
    assert gpu_emb.stats() == cpu_emb.stats()


def test_gather_scatter_and_prefetch():
    cuda = _cuda()
    num, dim = 400, 12
    cpu_emb, gpu_emb = _pair(
        num, dim, cache=ts.CacheConfig(rows=16, ways=4), optimizer=ts.Adagrad(lr=0.1)
    )
    x = torch.randint(0, num, (50, 4))
    gpu_emb.prefetch(x.cuda())
    cpu_emb.prefetch(x)
    y_gpu, y_cpu = gpu_emb(x.cuda()), cpu_emb(x)
    assert _rel(y_gpu, y_cpu) <= 1e-6
    store = gpu_emb.store
    batch = store.lookup(x.reshape(-1).cuda())
    assert batch.count is not None  # the sync-free step: buffers of n, U on the device
    ids = batch.trimmed().ids
    assert torch.equal(ids.cpu(), torch.unique(x))
    rows = cuda.gather(store, batch)
    assert torch.equal(rows.cpu(), store.read_rows(ids).cpu())
    cuda.scatter(store, batch, rows * 2)
    assert torch.equal(store.read_rows(ids).cpu(), (rows * 2).cpu())
    store.release(batch)


def test_places_point_at_each_index_row():
    """A training batch's places are each index's L1 slot, or the complement of its L2 address
    for a conflict miss, times two, plus one where no other index of the batch reads the row;
    checked against torch.unique's inverse of the batch."""
    num, dim = 5000, 8
    emb = ts.TieredEmbeddingBag(num, dim, cache=ts.CacheConfig(rows=64, ways=4), device="cuda")
    store = emb.store
    seed = int(np.random.SeedSequence().entropy % 2**32)  # fresh ids each run, named on failure
    flat = _trace(np.random.default_rng(seed), "zipf", num, 4000).cuda()
    batch = store.lookup(flat)
    places = cuda_bags._places(batch, store.device)
    t = batch.trimmed()
    _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    slot = t.slots[inverse]
    where = torch.where(slot >= 0, slot, ~t.addresses[inverse])
    single = counts[inverse] == 1
    assert torch.equal(places, where * 2 + single.long()), seed
    assert (slot >= 0).any() and (slot < 0).any(), seed  # both tiers, or it would show nothing
    assert single.any() and not single.all(), seed
    assert torch.equal(batch.inverse, inverse), seed  # made from the transpose on demand
    store.release(batch)


# ------------------------------------------------------------------------- the unique step
@pytest.mark.parametrize("bits", [1, 8, 9, 24, 31])
@pytest.mark.parametrize("n", [1, 4095, 4097, 200_000])  # one tile, one just past, many
def test_radix_sort_is_torchs_stable_sort(bits, n):
    """cuda.radix_sort against torch.sort(stable=True) on fresh random keys: uniform over
    [0, 2**bits), and skewed (a few hot keys: long runs of equal keys in a warp and a tile,
    where a rank out of position order would show). Keys outside the range, as in a batch the
    checks will reject, still give a permutation. With a device count, the first keys alone
    are sorted."""
    cuda = _cuda()
    seed = random.randrange(1 << 32)
    rng = np.random.default_rng(seed)
    for keys in (rng.integers(0, 1 << bits, n), (rng.zipf(1.3, n) * 7919) % (1 << bits)):
        k = torch.from_numpy(keys.astype(np.int64)).cuda()
        got, got_order = cuda.radix_sort(k, bits)
        want, want_order = torch.sort(k, stable=True)
        assert got.dtype == got_order.dtype == torch.int32
        assert torch.equal(got.long(), want), f"keys (seed {seed})"
        assert torch.equal(got_order.long(), want_order), f"order (seed {seed})"
    bad = torch.from_numpy(rng.integers(-(1 << 40), 1 << 40, n)).cuda()
    _, order = cuda.radix_sort(bad, bits)
    assert torch.equal(order.long().sort().values, torch.arange(n, device="cuda")), seed
    used = int(rng.integers(0, n + 1))  # a count on the device: only the first keys sorted
    count = torch.tensor([used], dtype=torch.int32, device="cuda")
    got, got_order = cuda.radix_sort(k, bits, count=count)
    want, want_order = torch.sort(k[:used], stable=True)
    assert torch.equal(got[:used].long(), want), f"keys of the first {used} (seed {seed})"
    assert torch.equal(got_order[:used].long(), want_order), f"order (seed {seed})"


@pytest.mark.parametrize("num_rows", [1000, 1 << 31, None])
@pytest.mark.parametrize("n", [1, 7, 5000, 300_000])
def test_unique_matches_torch(num_rows, n):
    """cuda.unique is torch.unique (sorted, inverse, counts) bit for bit, and its transpose is
    the stable sort of the inverse that backward would otherwise make."""
    cuda = _cuda()
    rng = np.random.default_rng(n)
    hi = num_rows or 1 << 40
    idx = torch.from_numpy(rng.zipf(1.2, n) * 7919 % hi).cuda()
    if num_rows is None:
        idx = idx - (1 << 39)  # negative ids too (an SSD table takes any int64 id)
    ids, inverse, counts, tr, count = cuda.unique(idx, num_rows)
    want = torch.unique(idx, return_inverse=True, return_counts=True)
    assert inverse is None and tr is not None and count is None  # the transpose stands for it
    for got, w in zip((ids, tr.inverse(), counts), want):
        assert got.dtype == w.dtype and torch.equal(got, w)
    # the sync-free form: the same in the first U entries of n-long buffers, U on the device
    p_ids, p_inverse, p_counts, p_tr, p_count = cuda.unique(idx, num_rows, padded=True)
    u = want[0].numel()
    assert p_count.dtype == torch.int32 and p_count.tolist() == [u]
    assert p_ids.numel() == n and torch.equal(p_ids[:u], want[0]) and p_inverse is None
    assert torch.equal(p_tr.inverse(), want[1]) and torch.equal(p_counts[:u], want[2])
    assert torch.equal(p_tr.start[: u + 1], tr.start)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device="cuda"), want[2].cumsum(0)])
    assert torch.equal(tr.start, starts)
    # the transpose: the stable sort of the inverse, split into indices whose row they alone
    # read and the sorted list of the others, with where each of their rows begins in it
    sorted_u, order = torch.sort(want[1], stable=True)
    multi = want[2][sorted_u] > 1
    for t in (tr, p_tr):
        length = int(multi.sum())
        assert t.list_length.dtype == torch.int32 and t.list_length.tolist() == [length]
        assert torch.equal(t.multi_u[:length].long(), sorted_u[multi])
        assert torch.equal(t.multi_index[:length].long(), order[multi])
        first_rows = torch.nonzero(want[2] > 1).view(-1)
        first_at = torch.cumsum(torch.where(want[2] > 1, want[2], 0), 0) - want[2]
        assert torch.equal(t.multi_first[first_rows].long(), first_at[first_rows])


@pytest.mark.parametrize(
    "num_rows, n, dist",
    [
        (1, 5, "uniform"),  # one id
        (4096, 1, "uniform"),  # one histogram tile, one id
        (4097, 300, "uniform"),  # a second tile of one entry
        (50_001, 5000, "zipf"),  # tiles not a multiple of 16 entries at the end
        (2_000_000, 65536, "zipf"),  # the replay's shape: hot ids repeat within a warp
        (2_000_000, 65536, "uniform"),
        (3_000_000, 65536, "uniform"),  # above the dense span: the sort
    ],
)
def test_unique_counts_matches_torch(num_rows, n, dist):
    """cuda.unique_counts (a histogram of the id space where it is small, else the sort) gives
    torch.unique's ids and counts in the first U entries, U on the device; twice in a row, so a
    histogram left dirty by a first call would show."""
    cuda = _cuda()
    rng = np.random.default_rng(num_rows + n)
    for _ in range(2):
        if dist == "zipf":
            raw = rng.zipf(1.1, n) * 7919 % num_rows
        else:
            raw = rng.integers(0, num_rows, n)
        raw[: min(n, 2)] = [num_rows - 1, 0][: min(n, 2)]  # both ends of the id space
        idx = torch.from_numpy(raw).cuda()
        ids, counts, count = cuda.unique_counts(idx, num_rows)
        want_ids, want_counts = torch.unique(idx, return_counts=True)
        u = want_ids.numel()
        assert count.dtype == torch.int32 and count.tolist() == [u]
        assert ids.dtype == counts.dtype == torch.int64 and ids.numel() >= u
        assert torch.equal(ids[:u], want_ids) and torch.equal(counts[:u], want_counts)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_rows, n", [(1000, 5000), (10_000_000, 2 << 20), (4097, 129)])
def test_unique_without_transpose_matches_torch(num_rows, n, padded):
    """cuda.unique for a batch no backward follows (the histogram where the id space is small)
    is torch.unique's ids, inverse and counts; ids out of range cost no access out of bounds."""
    cuda = _cuda()
    rng = np.random.default_rng(n)
    idx = torch.from_numpy(rng.zipf(1.1, n) * 7919 % num_rows).cuda()
    ids, inverse, counts, tr, count = cuda.unique(idx, num_rows, padded, transpose=False)
    want = torch.unique(idx, return_inverse=True, return_counts=True)
    u = want[0].numel()
    assert tr is None and (count.tolist() == [u] if padded else count is None)
    assert torch.equal(ids[:u], want[0]) and torch.equal(counts[:u], want[2])
    assert inverse.dtype == torch.int64 and torch.equal(inverse, want[1])
    idx[:3] = torch.tensor([-1, num_rows, 1 << 40])  # rejected later by the module's checks
    cuda.unique(idx, num_rows, padded, transpose=False)
    torch.cuda.synchronize()


def test_step_same_with_and_without_fast_paths():
    """The unique step's transpose (no second sort) changes no bit of a training run."""
    results = []
    for fast in (False, True):
        cuda_unique.FAST_UNIQUE = fast
        try:
            emb = ts.TieredEmbeddingBag(
                5000,
                129,
                cache=ts.CacheConfig(rows=300),
                optimizer=ts.RowWiseAdagrad(lr=0.1),
                device="cuda",
            )
            gen = np.random.default_rng(6)
            for _ in range(4):
                x = _trace(gen, "zipf", 5000, 64 * 20).view(64, 20).cuda()
                emb(x).backward(torch.from_numpy(gen.standard_normal((64, 129))).float().cuda())
            results.append(emb.read_rows(torch.arange(5000), with_state=True).cpu())
        finally:
            cuda_unique.FAST_UNIQUE = True
    assert torch.equal(results[0], results[1])
