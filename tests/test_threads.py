"""One table used from several threads: every call is serialised by the table's lock.

Two threads running inference must see exactly the outputs of ``nn.EmbeddingBag`` over the
table's rows; two threads training on disjoint rows must end with the rows a serial run of
the same batches gives (each row's updates come from one thread, in that thread's order, so
every interleaving of the two threads gives the same rows); and no lock of a batch in flight
may be left held in L1 or L2 afterwards.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

import tierstore as ts
from tierstore.cache import EMPTY, by_slot

N, D = 400, 8
BAGS, PER_BAG = 8, 6


def make_table(config: str, tmp_path, optimizer=None, name="t"):
    opts = dict(
        mode="sum", cache=ts.CacheConfig(rows=32, ways=4), device="cpu", optimizer=optimizer
    )
    if config == "ssd":
        opts.update(ssd=ts.SSDConfig(tmp_path / name, host_rows=128))
    return ts.TieredEmbeddingBag(N, D, **opts)


def random_batches(seed: int, steps: int, rows: torch.Tensor):
    """``steps`` batches of ``BAGS`` bags drawn from ``rows`` (with a skew, so the cache hits)."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, rows.numel() + 1, dtype=torch.float64)
    out = []
    for _ in range(steps):
        pick = torch.multinomial(weights, BAGS * PER_BAG, replacement=True, generator=gen)
        idx = rows[pick]
        offs = torch.arange(0, BAGS * PER_BAG, PER_BAG)
        out.append((idx, offs, torch.randn(BAGS, D, generator=gen)))
    return out


def run_threads(work, count: int = 2) -> None:
    """Runs ``work(k)`` on ``count`` threads started together; re-raises their errors; fails
    (instead of hanging) if one of them does not finish (a deadlock)."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(k):
        try:
            barrier.wait()
            work(k)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock"


@contextmanager
def held_on_another_thread(lock):
    """``lock`` taken by another thread for the duration of the block (entered once it holds
    it), as a call of the table on another thread holds the table's lock."""
    holding, done = threading.Event(), threading.Event()

    def hold():
        with lock:
            holding.set()
            done.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(timeout=60)
    try:
        yield
    finally:
        done.set()
        holder.join(timeout=60)


def assert_no_batch_locks(emb) -> None:
    """No batch holds a row: L1's lock counts are all zero, and L2 (with an SSD tier) holds
    exactly one pin per row that L1 caches (L2 is inclusive of L1) and nothing else."""
    store = emb.store
    assert int(store.l1.locks.count_nonzero()) == 0
    host = store.host
    if hasattr(host, "cache"):
        cached = by_slot(store.l1.tags) != EMPTY
        pins = torch.zeros(host.cache.capacity, dtype=torch.int32)
        pins.index_add_(0, store.l1.home[cached], torch.ones(int(cached.sum()), dtype=torch.int32))
        assert torch.equal(by_slot(host.cache.locks), pins)


@pytest.mark.parametrize("config", ["memory", "ssd"])
def test_two_threads_inference_equals_embedding_bag(config, tmp_path):
    emb = make_table(config, tmp_path)
    before = emb.read_rows(torch.arange(N))
    ref = torch.nn.EmbeddingBag.from_pretrained(before, mode="sum")
    runs = [random_batches(10 + k, 40, torch.randperm(N)) for k in range(2)]
    got: list[list[torch.Tensor]] = [[], []]

    def work(k):
        with torch.no_grad():
            for idx, offs, _ in runs[k]:
                got[k].append(emb(idx, offs))

    run_threads(work)
    for k in range(2):
        for (idx, offs, _), out in zip(runs[k], got[k]):
            assert torch.equal(out, ref(idx, offs))
    assert_no_batch_locks(emb)
    assert torch.equal(emb.read_rows(torch.arange(N)), before)
    emb.flush()
    assert torch.equal(emb.read_rows(torch.arange(N)), before)
    emb.close()


@pytest.mark.parametrize("config", ["memory", "ssd"])
def test_two_threads_training_equals_a_serial_run(config, tmp_path):
    # each thread trains its own rows (even, odd): every interleaving gives the same rows
    own = [torch.arange(0, N, 2), torch.arange(1, N, 2)]
    runs = [random_batches(20 + k, 30, own[k][torch.randperm(own[k].numel())]) for k in range(2)]
    serial = make_table(config, tmp_path, ts.Adagrad(0.1), "serial")
    for idx, offs, g in runs[0] + runs[1]:
        serial(idx, offs).backward(g)
    want = serial.read_rows(torch.arange(N), with_state=True)
    serial.close()

    emb = make_table(config, tmp_path, ts.Adagrad(0.1), "threads")

    def work(k):
        for idx, offs, g in runs[k]:
            emb(idx, offs).backward(g)

    run_threads(work)
    assert torch.equal(emb.read_rows(torch.arange(N), with_state=True), want)
    assert_no_batch_locks(emb)
    emb.flush()
    if config == "ssd":
        emb.close()
        emb = ts.TieredEmbeddingBag.open(
            tmp_path / "threads", cache=ts.CacheConfig(rows=32), device="cpu"
        )
    assert torch.equal(emb.read_rows(torch.arange(N), with_state=True), want)
    emb.close()


def test_backward_on_another_thread_while_forwards_go_on(tmp_path):
    """Forwards on one thread, their backwards on another (as autograd's device threads do),
    with several batches in flight: no deadlock, and the rows of a serial run."""
    own = torch.arange(N)
    run = random_batches(30, 24, own)
    serial = make_table("ssd", tmp_path, ts.SGD(0.5), "serial")
    for idx, offs, g in run:
        serial(idx, offs).backward(g)
    want = serial.read_rows(own, with_state=True)
    emb = make_table("ssd", tmp_path, ts.SGD(0.5), "split")
    outputs: list = []
    ready, room = threading.Semaphore(0), threading.Semaphore(2)  # two batches in flight

    def work(k):
        if k == 0:  # forwards, ahead of the backwards
            for idx, offs, g in run:
                assert room.acquire(timeout=60)
                outputs.append((emb(idx, offs), g))
                ready.release()
        else:  # backwards, in the same order
            for step in range(len(run)):
                assert ready.acquire(timeout=60)
                out, g = outputs[step]
                out.backward(g)
                outputs[step] = None
                room.release()

    run_threads(work)
    # Each forward may read rows before or after an earlier batch's backward updated them, so
    # the outputs may differ from the serial run's, but SGD's update does not depend on them.
    # The rows then differ only in the order floats were summed: allow that, nothing more.
    assert torch.allclose(emb.read_rows(own, with_state=True), want, rtol=0, atol=1e-6)
    assert_no_batch_locks(emb)
    emb.flush()
    emb.close()


def test_graph_freed_while_another_thread_holds_the_table():
    """A training output dropped without a backward releases its batch; if another thread
    is inside a call of the table then, the release waits for the table's next call instead
    of blocking the thread that dropped it."""
    emb = make_table("memory", None, ts.SGD(0.1))
    idx, offs, _ = random_batches(40, 1, torch.arange(N))[0]
    out = emb(idx, offs)
    assert int(emb.store.l1.locks.count_nonzero()) > 0  # the batch waits for its backward
    with held_on_another_thread(emb._lock):
        del out  # the finalizer runs here, on this thread, and must not block
        assert int(emb.store.l1.locks.count_nonzero()) > 0
    emb.stats()  # the next call releases it
    assert_no_batch_locks(emb)


def test_flush_stats_and_reads_beside_training(tmp_path):
    """One thread trains while another flushes, reads rows and stats: training ends with the
    serial run's rows, and the table reopened from disk holds them."""
    run = random_batches(50, 30, torch.arange(N))
    serial = make_table("ssd", tmp_path, ts.Adagrad(0.1), "serial")
    for idx, offs, g in run:
        serial(idx, offs).backward(g)
    want = serial.read_rows(torch.arange(N), with_state=True)
    serial.close()
    emb = make_table("ssd", tmp_path, ts.Adagrad(0.1), "busy")
    finished = threading.Event()
    seen = []

    def work(k):
        if k == 0:
            for idx, offs, g in run:
                emb(idx, offs).backward(g)
            finished.set()
        else:
            while not finished.is_set():
                emb.flush()
                seen.append(emb.stats().requested)
                assert emb.read_rows(torch.arange(N)).shape == (N, D)

    run_threads(work)
    assert seen == sorted(seen)  # counters only grow
    assert torch.equal(emb.read_rows(torch.arange(N), with_state=True), want)
    assert_no_batch_locks(emb)
    emb.flush()
    emb.close()
    back = ts.TieredEmbeddingBag.open(
        tmp_path / "busy", cache=ts.CacheConfig(rows=32), device="cpu"
    )
    assert torch.equal(back.read_rows(torch.arange(N), with_state=True), want)
    back.close()
