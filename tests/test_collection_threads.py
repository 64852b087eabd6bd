"""A collection used from several threads: every call, and every backward, holds its lock.

As ``tests/test_threads.py`` for one table, over a collection of two groups (dims 8 and 4; a
group that mixes ``"sum"`` and ``"mean"`` tables, and a ``"mean"`` one). Two threads running
inference see exactly the outputs of a serial run (and ``nn.EmbeddingBag``'s over the rows);
two threads training on disjoint rows (even ids for one, odd for the other, in every table)
end with exactly the rows, and produce exactly the outputs, of a serial run of the same
batches: each row's updates come from one thread, in that thread's order, and each batch reads
only its own thread's rows, so every interleaving gives the same bits. Independently of what a
race would corrupt, the groups' stores are watched: no two threads are ever inside one at
once. Afterwards no batch holds a lock in L1 or L2.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_threads import assert_no_batch_locks, held_on_another_thread, run_threads

import tierstore as ts

B, MAX_LEN = 8, 5
FEATURES = ["a", "b", "c"]


def tables() -> list[ts.TableConfig]:
    """Two groups: a and b (dim 8, sum and mean: a mixed group), c (dim 4, mean)."""
    return [
        ts.TableConfig(name="a", embedding_dim=8, num_embeddings=300),
        ts.TableConfig(name="b", embedding_dim=8, num_embeddings=200, pooling="mean"),
        ts.TableConfig(name="c", embedding_dim=4, num_embeddings=150, pooling="mean"),
    ]


def make_collection(config: str, tmp_path, optimizer=None, name="col"):
    opts = dict(cache=ts.CacheConfig(rows=48, ways=4), device="cpu", optimizer=optimizer)
    if config == "ssd":
        opts.update(ssd=ts.SSDConfig(tmp_path / name, host_rows=256))
    return ts.TieredEmbeddingBagCollection(tables(), **opts)


def random_batches(seed: int, steps: int, parity: int | None):
    """``steps`` batches as keys/values/lengths (each with a gradient of the output), ids
    skewed (so the caches hit) and, with ``parity``, only ids of that parity in every table."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        values, lengths = [], []
        for t in tables():
            n_t = t.num_embeddings
            own = torch.arange(0 if parity is None else parity, n_t, 1 if parity is None else 2)
            own = own[torch.randperm(own.numel(), generator=gen)]
            lens = torch.randint(0, MAX_LEN + 1, (B,), generator=gen)
            skew = 1.0 / torch.arange(1, own.numel() + 1, dtype=torch.float64)
            pick = torch.multinomial(skew, int(lens.sum()), replacement=True, generator=gen)
            values.append(own[pick])
            lengths.append(lens)
        batch = dict(keys=FEATURES, values=torch.cat(values), lengths=torch.cat(lengths))
        out.append((batch, torch.randn(B, 8 + 8 + 4, generator=gen)))
    return out


def all_rows(col) -> list[torch.Tensor]:
    return [
        col.read_rows(t.name, torch.arange(t.num_embeddings), with_state=True) for t in col.tables
    ]


def assert_rows(col, want: list[torch.Tensor]) -> None:
    """Every table's rows (with their state) are bitwise ``want``."""
    for now, then in zip(all_rows(col), want, strict=True):
        assert torch.equal(now, then)


def assert_unlocked(col) -> None:
    for g in col.groups:  # a group has the ``store`` that the single-table check reads
        assert_no_batch_locks(g)


class OneAtATime:
    """Wraps the groups' stores' ``lookup`` and ``release`` (a forward, a backward and a freed
    graph each pass through them) to count the threads inside any of them at once, holding
    each call a little longer so that an unserialised second thread would be caught there."""

    def __init__(self, col):
        self.inside = self.most = 0
        self._count = threading.Lock()
        for g in col.groups:
            for name in ("lookup", "release"):
                setattr(g.store, name, self._watched(getattr(g.store, name)))

    def _watched(self, call):
        def watched(*args, **kwargs):
            with self._count:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                time.sleep(0.0005)
                return call(*args, **kwargs)
            finally:
                with self._count:
                    self.inside -= 1

        return watched


@pytest.mark.parametrize("config", ["memory", "ssd"])
def test_two_threads_inference_equals_a_serial_run(config, tmp_path):
    col = make_collection(config, tmp_path)
    before = all_rows(col)
    runs = [random_batches(10 + k, 25, None) for k in range(2)]
    with torch.no_grad():
        want = [[col(**b).values() for b, _ in runs[k]] for k in range(2)]
    got: list[list[torch.Tensor]] = [[], []]
    watch = OneAtATime(col)

    def work(k):
        with torch.no_grad():
            for b, _ in runs[k]:
                got[k].append(col(**b).values())

    run_threads(work)
    assert watch.most == 1
    refs = [torch.nn.EmbeddingBag.from_pretrained(r[:, : t.embedding_dim], mode=t.pooling)
            for r, t in zip(before, col.tables, strict=True)]  # fmt: skip
    for k in range(2):
        for (b, _), out, serial in zip(runs[k], got[k], want[k], strict=True):
            assert torch.equal(out, serial)
            parts, start = [], 0
            for ref, lens in zip(refs, b["lengths"].view(3, B), strict=True):
                ids = b["values"][start : start + int(lens.sum())]
                start += ids.numel()
                offs = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
                parts.append(ref(ids, offs))
            torch.testing.assert_close(out, torch.cat(parts, 1), rtol=1e-6, atol=1e-6)
    assert_unlocked(col)
    assert_rows(col, before)
    col.flush()
    col.close()


@pytest.mark.parametrize("config", ["memory", "ssd"])
def test_two_threads_training_equals_a_serial_run(config, tmp_path):
    runs = [random_batches(20 + k, 25, parity=k) for k in range(2)]
    serial = make_collection(config, tmp_path, ts.Adagrad(0.1), "serial")
    want_out = []
    for b, grad in runs[0] + runs[1]:
        kt = serial(**b)
        want_out.append(kt.values().detach().clone())
        kt.values().backward(grad)
    want = all_rows(serial)
    serial.close()

    col = make_collection(config, tmp_path, ts.Adagrad(0.1), "threads")
    watch = OneAtATime(col)
    got: list[list[torch.Tensor]] = [[], []]

    def work(k):
        for b, grad in runs[k]:
            kt = col(**b)
            got[k].append(kt.values().detach().clone())
            kt.values().backward(grad)

    run_threads(work)
    assert watch.most == 1  # no two threads were ever inside a group's store at once
    for out, serial_out in zip(got[0] + got[1], want_out, strict=True):
        assert torch.equal(out, serial_out)
    assert_rows(col, want)
    assert_unlocked(col)
    col.flush()
    if config == "ssd":
        col.close()
        col = ts.TieredEmbeddingBagCollection.open(
            tmp_path / "threads", cache=ts.CacheConfig(rows=48), device="cpu"
        )
    assert_rows(col, want)
    col.close()


def serial_rows(run: list, tmp_path, optimizer) -> list:
    """The rows of every table after ``run`` trained on one thread (an SSD-tier collection)."""
    serial = make_collection("ssd", tmp_path, optimizer, "serial")
    for b, grad in run:
        serial(**b).values().backward(grad)
    want = all_rows(serial)
    serial.close()
    return want


def test_backward_on_another_thread_while_forwards_go_on(tmp_path):
    """Forwards on one thread, their backwards (one per group, each taking the lock) on
    another, two batches in flight: no deadlock, and the rows of a serial run up to the order
    in which floats were summed (a forward may read rows before or after an earlier batch's
    update; SGD's update does not depend on them)."""
    run = random_batches(30, 20, None)
    want = serial_rows(run, tmp_path, ts.SGD(0.5))
    col = make_collection("ssd", tmp_path, ts.SGD(0.5), "split")
    outputs: list = []
    ready, room = threading.Semaphore(0), threading.Semaphore(2)

    def work(k):
        if k == 0:
            for b, grad in run:
                assert room.acquire(timeout=60)
                outputs.append((col(**b).values(), grad))
                ready.release()
        else:
            for step in range(len(run)):
                assert ready.acquire(timeout=60)
                out, grad = outputs[step]
                out.backward(grad)
                outputs[step] = None
                room.release()

    run_threads(work)
    for now, then in zip(all_rows(col), want, strict=True):
        torch.testing.assert_close(now, then, rtol=0, atol=1e-6)
    assert_unlocked(col)
    col.close()


def test_graph_freed_while_another_thread_holds_the_collection():
    """A training output dropped without a backward releases its batch in every group; if
    another thread is inside a call of the collection then, the releases wait for the
    collection's next call instead of blocking the thread that dropped it."""
    col = make_collection("memory", None, ts.SGD(0.1))
    b, _ = random_batches(40, 1, None)[0]
    out = col(**b)
    assert all(int(g.store.l1.locks.count_nonzero()) > 0 for g in col.groups)
    with held_on_another_thread(col._lock):
        del out  # the finalizers run here, on this thread, and must not block
        assert all(int(g.store.l1.locks.count_nonzero()) > 0 for g in col.groups)
        assert len(col._deferred_releases) == len(col.groups)
    col.stats()  # the next call releases them
    assert not col._deferred_releases
    assert_unlocked(col)


def test_flush_stats_and_reads_beside_training(tmp_path):
    """One thread trains while another flushes, reads rows and stats: training ends with the
    serial run's rows, and the collection reopened from disk holds them."""
    run = random_batches(50, 20, None)
    want = serial_rows(run, tmp_path, ts.Adagrad(0.1))
    col = make_collection("ssd", tmp_path, ts.Adagrad(0.1), "busy")
    finished = threading.Event()
    seen = []

    def work(k):
        if k == 0:
            for b, grad in run:
                col(**b).values().backward(grad)
            finished.set()
        else:
            while not finished.is_set():
                col.flush()
                seen.append(col.stats().overall.requested)
                assert col.read_rows("c", torch.arange(150)).shape == (150, 4)

    run_threads(work)
    assert seen == sorted(seen)  # counters only grow
    assert_rows(col, want)
    assert_unlocked(col)
    col.flush()
    col.close()
    back = ts.TieredEmbeddingBagCollection.open(
        tmp_path / "busy", cache=ts.CacheConfig(rows=48), device="cpu"
    )
    assert_rows(back, want)
    back.close()
