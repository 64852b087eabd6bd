"""The engine with its SSD tier: transparency, durability, reopening, sparse ids, faults."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import tierstore as ts

N, D = 600, 8


def batches(seed, steps, num=N, sparse=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        w = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 1.05
        idx = torch.multinomial(w, 48, replacement=True, generator=gen)
        if sparse:  # hashed feature ids: anywhere in int64
            idx = idx * -0x61C8864680B583EB + 12345
        offs = torch.arange(0, 48, 6)
        out.append((idx, offs, torch.randn(8, D, generator=gen)))
    return out


def train(emb, run, device="cpu"):
    for idx, offs, g in run:
        emb(idx.to(device), offs.to(device)).backward(g.to(device))


def rows_of(emb, ids):
    return emb.read_rows(ids, with_state=True).cpu()


def test_ssd_tier_is_transparent(device, tmp_path):
    run = batches(1, 25)
    ref = ts.TieredEmbeddingBag(
        N, D, cache=ts.CacheConfig(rows=N), optimizer=ts.Adagrad(0.1), device=device
    )
    train(ref, run, device)
    want = rows_of(ref, torch.arange(N))
    for i, (cache_rows, host_rows) in enumerate([(1, 64), (16, 128), (N, 4 * N)]):
        emb = ts.TieredEmbeddingBag(
            N,
            D,
            cache=ts.CacheConfig(rows=cache_rows, ways=4),
            ssd=ts.SSDConfig(tmp_path / f"t{i}", host_rows=host_rows),
            optimizer=ts.Adagrad(0.1),
            device=device,
        )
        train(emb, run, device)
        assert torch.equal(rows_of(emb, torch.arange(N)), want)
        emb.flush()
        emb.close()
        again = ts.TieredEmbeddingBag.open(
            ts.SSDConfig(tmp_path / f"t{i}", host_rows=64),
            cache=ts.CacheConfig(rows=8),
            device=device,
        )
        assert torch.equal(rows_of(again, torch.arange(N)), want)
        assert again.optimizer == ts.Adagrad(0.1)
        again.close()


def test_close_without_flush_goes_back_to_the_last_flush(tmp_path):
    emb = ts.TieredEmbeddingBag(
        N,
        D,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
        optimizer=ts.SGD(0.5),
    )
    train(emb, batches(2, 10))
    emb.flush()
    flushed = rows_of(emb, torch.arange(N))
    train(emb, batches(3, 10))  # evictions stage rows in L3, nothing is flushed
    assert not torch.equal(rows_of(emb, torch.arange(N)), flushed)
    emb.close()
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "t", host_rows=64), cache=ts.CacheConfig(rows=8)
    )
    assert torch.equal(rows_of(again, torch.arange(N)), flushed)


def test_unbounded_hashed_ids(tmp_path):
    run = batches(4, 15, sparse=True)
    a = ts.TieredEmbeddingBag(
        None, D, mode="sum", cache=ts.CacheConfig(rows=16),
        ssd=ts.SSDConfig(tmp_path / "a", host_rows=128), optimizer=ts.RowWiseAdagrad(0.2),
    )  # fmt: skip
    b = ts.TieredEmbeddingBag(
        None,
        D,
        mode="sum",
        cache=ts.CacheConfig(rows=4096),
        ssd=ts.SSDConfig(tmp_path / "b", host_rows=8192),
        optimizer=ts.RowWiseAdagrad(0.2),
    )
    ids = torch.unique(torch.cat([r[0] for r in run]))
    assert int(ids.min()) < 0 < int(ids.max())
    first = rows_of(a, ids)
    ref = torch.nn.EmbeddingBag.from_pretrained(first[:, :D], mode="sum")
    idx, offs, _ = run[0]
    torch.testing.assert_close(
        a(idx, offs).detach(), ref(torch.searchsorted(ids, idx), offs), rtol=1e-6, atol=1e-7
    )
    train(a, run)
    train(b, run)
    assert torch.equal(rows_of(a, ids), rows_of(b, ids))
    assert not torch.equal(rows_of(a, ids), first)


def test_a_billion_row_table_is_created_at_once(tmp_path):
    t0 = time.perf_counter()
    emb = ts.TieredEmbeddingBag(
        10**9,
        64,
        cache=ts.CacheConfig(rows=1024),
        ssd=ts.SSDConfig(tmp_path / "big", host_rows=1 << 14),
    )
    assert time.perf_counter() - t0 < 30  # generous: a dense 10^9-row table would need 256 GB
    ids = torch.tensor([0, 123_456_789, 10**9 - 1])
    want = ts.hashing.initial_weights(ids, 64, 0, 1 / 8)
    assert torch.equal(emb.read_rows(ids), want)
    size = sum(f.stat().st_size for f in (tmp_path / "big").iterdir())
    assert size < 64 << 20


def test_batch_too_large_for_host_rows_fails_before_any_change(tmp_path):
    emb = ts.TieredEmbeddingBag(
        N, D, cache=ts.CacheConfig(rows=8, ways=8), ssd=ts.SSDConfig(tmp_path / "t", host_rows=128)
    )
    train(emb, batches(5, 3))
    before = rows_of(emb, torch.arange(N)), emb.stats(), emb.store.host.cache.locks.clone()
    idx = torch.arange(200)
    with pytest.raises(ts.CapacityError, match="host_rows") as err:
        emb(idx, torch.tensor([0]))
    assert "200 unique rows" in str(err.value)
    after = rows_of(emb, torch.arange(N)), emb.stats(), emb.store.host.cache.locks
    assert (
        torch.equal(before[0], after[0])
        and before[1] == after[1]
        and torch.equal(before[2], after[2])
    )


@pytest.mark.parametrize("ahead", [0, 1])
def test_smallest_host_rows_the_rule_allows_never_fails(device, tmp_path, ahead):
    """README's capacity rule: L2 holds L1's rows plus every unique row of the batches in
    flight (``1 + ahead`` of them, prefetching ``ahead`` batches). At exactly that size, with
    few ways (so that sets overflow often), many steps of random Zipf-ish batches train
    without a CapacityError, and the rows equal an all-in-memory table's (the overflow is
    transparent), before and after a flush and reopen."""
    num, dim, per_batch, l1_rows = 5000, 8, 256, 64
    gen = torch.Generator().manual_seed(11)
    weights = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 0.9
    perm = torch.randperm(num, generator=gen)  # hot rows anywhere, not clustered by id
    run = []
    for _ in range(40):
        idx = perm[torch.multinomial(weights, per_batch, replacement=True, generator=gen)]
        run.append((idx, torch.arange(0, per_batch, 8), torch.randn(per_batch // 8, dim)))
    run = [tuple(t.to(device) for t in batch) for batch in run]
    ref = ts.TieredEmbeddingBag(
        num, dim, cache=ts.CacheConfig(rows=num), optimizer=ts.Adagrad(0.1), device=device
    )
    emb = ts.TieredEmbeddingBag(
        num, dim, cache=ts.CacheConfig(rows=l1_rows, ways=8),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=l1_rows + (1 + ahead) * per_batch, host_ways=4),
        optimizer=ts.Adagrad(0.1), device=device,
    )  # fmt: skip
    assert emb.store.host.cache.capacity == l1_rows + (1 + ahead) * per_batch  # no slack
    most_lent = 0
    for idx, offs, _ in run[:ahead]:
        emb.prefetch(idx, offs)
    for step, (idx, offs, g) in enumerate(run):
        if step + ahead < len(run) and ahead:
            emb.prefetch(*run[step + ahead][:2])
        ref(idx, offs).backward(g)
        emb(idx, offs).backward(g)
        most_lent = max(most_lent, emb.store.host.overflow_ids.numel())
        if step % 20 == 19:
            emb.flush()
    assert most_lent > 0  # sets did overflow: the test exercised the overflow
    want = rows_of(ref, torch.arange(num))
    assert torch.equal(rows_of(emb, torch.arange(num)), want)
    emb.flush()
    emb.close()
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "t", host_rows=64), cache=ts.CacheConfig(rows=8), device=device
    )
    assert torch.equal(rows_of(again, torch.arange(num)), want)
    again.close()


def test_reopening_with_another_shape_or_optimizer_fails(tmp_path):
    emb = ts.TieredEmbeddingBag(
        N,
        D,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
        optimizer=ts.Adagrad(0.1),
    )
    train(emb, batches(6, 3))
    emb.flush()
    want = rows_of(emb, torch.arange(N))
    emb.close()
    with pytest.raises(ts.TableMismatchError, match="embedding_dim"):
        ts.TieredEmbeddingBag(
            N,
            D + 1,
            cache=ts.CacheConfig(rows=8),
            ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
            optimizer=ts.Adagrad(0.1),
        )
    with pytest.raises(ts.TableMismatchError, match="row_width|optimizer"):
        ts.TieredEmbeddingBag(
            N,
            D,
            cache=ts.CacheConfig(rows=8),
            ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
            optimizer=ts.SGD(0.1),
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ts.NotATableError, match="junk"):
        ts.TieredEmbeddingBag(
            N, D, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(tmp_path / "junk", host_rows=64)
        )
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "t", host_rows=64), cache=ts.CacheConfig(rows=8)
    )
    assert torch.equal(rows_of(again, torch.arange(N)), want)


def test_second_writer_is_refused(tmp_path):
    emb = ts.TieredEmbeddingBag(
        N, D, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(tmp_path / "t", host_rows=64)
    )
    emb.flush()
    code = (
        "import tierstore as ts; ts.TieredEmbeddingBag.open("
        f"ts.SSDConfig({str(tmp_path / 't')!r}, host_rows=64), cache=ts.CacheConfig(rows=8))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode != 0 and "TableLockedError" in proc.stderr


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(ts.__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


TRAINER = textwrap.dedent(
    """
    import sys, torch, tierstore as ts
    sys.path.insert(0, {tests!r})
    from test_tiered_ssd import batches, train, N, D
    emb = ts.TieredEmbeddingBag(N, D, cache=ts.CacheConfig(rows=8),
                                ssd=ts.SSDConfig({path!r}, host_rows=64), optimizer=ts.Adagrad(0.1))
    run = batches(9, 400)
    for step in range(len(run)):
        train(emb, run[step : step + 1])
        if step % 3 == 2:
            emb.flush()
            print(step, flush=True)
    """
)


def test_kill_9_during_training_keeps_the_last_flush(tmp_path):
    """A training process killed at random moments reopens exactly as of its last flush."""
    rng = random.Random(0)
    path = str(tmp_path / "t")
    run = batches(9, 400)
    tests = os.path.dirname(os.path.abspath(__file__))
    ref = ts.TieredEmbeddingBag(N, D, cache=ts.CacheConfig(rows=N), optimizer=ts.Adagrad(0.1))
    done = -1  # steps of `run` that ref has trained
    for kill in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAINER.format(tests=tests, path=path)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        first = proc.stdout.readline()  # training is under way (the start-up time varies)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        flushed = [int(x) for x in (first + out).split()]
        assert flushed
        emb = ts.TieredEmbeddingBag.open(
            ts.SSDConfig(path, host_rows=64), cache=ts.CacheConfig(rows=8)
        )
        got = rows_of(emb, torch.arange(N))
        emb.close()
        # each restart trains from step 0 again on the reopened rows: the reference follows
        # the same history (steps up to the last flush of every earlier run)
        last = flushed[-1] if flushed else -1
        candidates = [last, last + 3]  # + 3: killed after a commit, before its print
        ok = False
        for last in candidates:
            trial = ts.TieredEmbeddingBag(
                N, D, cache=ts.CacheConfig(rows=N), optimizer=ts.Adagrad(0.1)
            )
            trial.store.write_rows(torch.arange(N), rows_of(ref, torch.arange(N)))
            train(trial, run[: last + 1])
            if torch.equal(rows_of(trial, torch.arange(N)), got):
                ok, ref = True, trial
                break
        assert ok, f"kill {kill}: the table is not as of a completed flush"
        done += 1
    assert done == 5


def test_a_full_map_fails_the_flush_and_loses_nothing(tmp_path):
    """A flush that does not fit in the LMDB map raises StorageFullError; the table keeps its
    rows in memory, and what was flushed before is intact on disk."""
    path = tmp_path / "t"
    emb = ts.TieredEmbeddingBag(
        20_000, 64, cache=ts.CacheConfig(rows=64),
        ssd=ts.SSDConfig(path, host_rows=40_000, compression_level=0, map_size=2 << 20),
        optimizer=ts.SGD(0.1),
    )  # fmt: skip
    ids = torch.arange(200)
    emb(ids, torch.tensor([0])).sum().backward()
    emb.flush()
    flushed = rows_of(emb, torch.arange(20_000))
    big = torch.arange(20_000)
    emb(big, torch.arange(0, 20_000, 100)).sum().backward()  # 20 000 dirty rows: ~5 MB
    trained = rows_of(emb, torch.arange(20_000))
    with pytest.raises(ts.StorageFullError, match=str(path)):
        emb.flush()
    assert torch.equal(rows_of(emb, torch.arange(20_000)), trained)
    emb.close()
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(path, host_rows=40_000), cache=ts.CacheConfig(rows=64)
    )
    assert torch.equal(rows_of(again, torch.arange(20_000)), flushed)


def test_a_corrupt_block_is_named(tmp_path):
    import lmdb

    path = tmp_path / "t"
    emb = ts.TieredEmbeddingBag(
        N,
        D,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(path, host_rows=64),
        optimizer=ts.SGD(0.1),
    )
    train(emb, batches(7, 2))
    emb.flush()
    emb.close()
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"blocks", txn=txn)
        key, value = next(iter(txn.cursor(db)))
        txn.put(key, value[: len(value) // 2], db=db)
    env.close()
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(path, host_rows=64), cache=ts.CacheConfig(rows=8)
    )
    with pytest.raises(ts.CorruptBlockError, match=str(path)):
        again.read_rows(torch.arange(N))
