"""Reading a later batch's L3 rows ahead (tierstore/read_ahead.py): a prefetched loop over an
SSD tier takes rows read ahead wherever L3 has not changed them since, and trains bitwise as the
plain loop at any depth, however small L2 is; a read ahead whose rows were rewritten in L3 in
between supplies only the rows that are still current."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore as ts
from tests.test_pipeline import D, N, make, no_locks, train, zipf_batches


def ssd_table(tmp_path, name, cache_rows, host_rows, ways=4):
    return make("cpu", cache_rows, ways=ways,
                ssd=ts.SSDConfig(tmp_path / name, host_rows=host_rows, host_ways=ways))  # fmt: skip


def flushed_table(tmp_path, name, cache_rows, host_rows, seed=0):
    """A table whose every row was written once (random values) and flushed: L3 holds them
    all, so that every L2 miss reads L3."""
    emb = ssd_table(tmp_path, name, cache_rows, host_rows)
    gen = torch.Generator().manual_seed(seed)
    emb.write_rows(torch.arange(N), torch.randn(N, D, generator=gen))
    emb.flush()
    return emb


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    depth=st.integers(1, 4),
    cache_rows=st.sampled_from([1, 4, 16]),
    spare=st.integers(0, 40),
)
def test_read_ahead_trains_as_the_plain_loop(tmp_path_factory, seed, depth, cache_rows, spare):
    """At the smallest L2 the batches allow (rows are evicted, rewritten and read back between
    a read ahead and its step), the prefetched loop equals the plain one bitwise."""
    tmp_path = tmp_path_factory.mktemp("ahead")
    batches = zipf_batches(seed, 10)
    largest = max(int(torch.unique(b[0]).numel()) for b in batches)
    host_rows = cache_rows + largest + spare
    ref = flushed_table(tmp_path, "ref", cache_rows, host_rows)
    emb = flushed_table(tmp_path, "emb", cache_rows, host_rows)
    for a, b in zip(train(ref, batches, "cpu"), train(emb, batches, "cpu", depth)):
        assert torch.equal(a, b)
    rows = torch.arange(N)
    assert torch.equal(ref.read_rows(rows, True), emb.read_rows(rows, True))
    assert no_locks(emb) and not emb.store.host.l3_writes.open
    for t in (ref, emb):
        t.close(flush=False)


def test_the_steps_take_rows_read_ahead(tmp_path):
    """Uniform ids over a small L2: most misses of a prefetched batch were read ahead (the
    counter is what the steps took), none in the plain loop; the L3 traffic is the same."""
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, N, (40,), generator=gen), torch.arange(0, 40, 4)) for _ in range(8)
    ]
    ref = flushed_table(tmp_path, "ref", 4, 64)
    emb = flushed_table(tmp_path, "emb", 4, 64)
    for t in (ref, emb):
        t.reset_stats()
    train(ref, batches, "cpu")
    train(emb, batches, "cpu", depth=2)
    plain, ahead = ref.stats(), emb.stats()
    assert plain.bytes_l3_read_ahead == 0
    assert ahead.bytes_l3_to_l2 == plain.bytes_l3_to_l2 > 0
    assert ahead.bytes_l3_read_ahead > ahead.bytes_l3_to_l2 // 2


def test_rows_rewritten_after_their_read_ahead_are_read_again(tmp_path):
    """A read ahead of rows 0..9, then rows 2 and 5 rewritten in L3 (write_rows of rows L2 does
    not hold): the step takes 8 rows from the read ahead and the two new ones from L3."""
    emb = flushed_table(tmp_path, "t", 1, 32)
    host = emb.store.host
    ids = torch.arange(10)
    ahead = host.read_ahead(ids)
    assert torch.equal(ahead.ids, ids)
    new = torch.full((2, D), 7.0)
    emb.write_rows(torch.tensor([2, 5]), new)
    want = emb.read_rows(ids, True)
    addresses = host.acquire(ids, ahead)
    assert torch.equal(host.read(addresses), want)
    assert host.rows_read_ahead == 8 and not host.l3_writes.open
    assert torch.equal(want[[2, 5], :D], new)
    host.release(addresses)
    emb.close(flush=False)


def test_a_dropped_prefetch_forgets_its_read_ahead(tmp_path):
    emb = flushed_table(tmp_path, "t", 4, 64)
    for idx, offs in zipf_batches(1, 3):
        emb.prefetch(idx, offs)
    assert len(emb.store.host.l3_writes.open) >= 1
    emb.clear_prefetched()
    assert not emb.store.host.l3_writes.open and not emb.store.host.l3_writes.entries
    assert no_locks(emb)
    emb.close(flush=False)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(2, 4))
def test_flushes_between_steps(tmp_path_factory, seed, depth):
    """A flush after every step makes rows clean that a later step then evicts without a
    write: a row read ahead before such a flush is read again, not taken stale."""
    tmp_path = tmp_path_factory.mktemp("flush")
    batches = zipf_batches(seed, 10)
    host_rows = 4 + max(int(torch.unique(b[0]).numel()) for b in batches)
    outs = []
    for name, loop_depth in (("ref", None), ("emb", depth)):
        emb = flushed_table(tmp_path, name, 4, host_rows)
        loop = batches if loop_depth is None else ts.prefetching(batches, emb, depth=loop_depth)
        got = []
        for idx, offs in loop:
            y = emb(idx, offs)
            y.backward(torch.ones_like(y))
            emb.flush()
            got.append(y.detach())
        outs.append((got, emb.read_rows(torch.arange(N), True)))
        emb.close()
    (want, want_rows), (got, got_rows) = outs
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert torch.equal(want_rows, got_rows)
