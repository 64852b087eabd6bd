"""Tests of the SSD tier's reader processes (tierstore/ssd_readers.py): reads through them
equal reads in this process bitwise, damage is still refused, a dead worker or a stale
snapshot falls back to this process, and close() leaves no process behind."""

from __future__ import annotations

import gc
import os

import lmdb
import numpy as np
import pytest
import torch
from ssd_rows import W, bitwise_equal, init_rows, random_bits

from tierstore import blocks_compiled, ssd_blockdb
from tierstore.blocks import BlockCodec
from tierstore.config import SSDConfig
from tierstore.errors import CorruptBlockError, InvalidInputError
from tierstore.ssd import SSDTier
from tierstore.ssd_readers import StaleSnapshot

pytestmark = pytest.mark.skipif(not blocks_compiled.AVAILABLE, reason="no compiled decoder")


@pytest.fixture
def small_reads(monkeypatch):
    """Reads of a few dozen blocks go to the processes, answered in chunks of odd sizes."""
    monkeypatch.setattr(ssd_blockdb, "_PROCESS_MIN_BLOCKS", 16)
    monkeypatch.setattr(ssd_blockdb, "_READ_CHUNK_BLOCKS", 37)


def started(tier: SSDTier, ids: torch.Tensor) -> None:
    """Starts the tier's reader processes (a large read) and waits until they are ready."""
    tier.read(ids)
    assert tier._db.readers.ready(timeout=60)


def in_process(tier: SSDTier, ids: torch.Tensor) -> torch.Tensor:
    readers, tier._db.readers = tier._db.readers, None
    try:
        return tier.read(ids)
    finally:
        tier._db.readers = readers


def gone(pids: list[int]) -> bool:
    return all(not os.path.exists(f"/proc/{pid}") for pid in pids)


@pytest.mark.parametrize("block_rows", [1, 4])
def test_reads_through_the_processes_equal_reads_in_process(
    tmp_path, small_reads, monkeypatch, block_rows
):
    rng = np.random.default_rng(block_rows)
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, block_rows=block_rows,
                          io_threads=2, io_processes=3)  # fmt: skip
    calls = []
    real = ssd_blockdb.getmulti
    monkeypatch.setattr(ssd_blockdb, "getmulti", lambda c, k: calls.append(k) or real(c, k))
    try:
        ids = np.unique(rng.integers(-(2**40), 2**40, 1500))
        ids = np.unique(np.concatenate((ids, np.arange(-100, 100))))
        model = dict(zip(ids.tolist(), random_bits(rng, len(ids)).numpy()))
        tier.flush(torch.from_numpy(ids), torch.from_numpy(np.stack(list(model.values()))))
        started(tier, torch.from_numpy(ids))
        pids = tier._db.readers.pids()
        assert len(pids) == 3
        for _ in range(3):
            batch = torch.from_numpy(np.concatenate((
                rng.choice(ids, 800), rng.integers(-(2**40), 2**40, 200),
                rng.integers(-150, 150, 100),
            )))  # fmt: skip
            unique, inverse = torch.unique(batch, return_inverse=True)
            calls.clear()
            got = tier.read(unique)
            assert calls == []  # every flushed block looked up by the processes
            want = init_rows(batch).clone()
            for i, x in enumerate(batch.tolist()):
                if x in model:
                    want[i] = torch.from_numpy(model[x])
            assert bitwise_equal(got[inverse], want)
            assert bitwise_equal(got, in_process(tier, unique))
            # A flush that changes some rows and adds others: the next read sees it.
            changed = np.unique(np.concatenate((rng.choice(ids, 300),
                                                rng.integers(-(2**40), 2**40, 50))))  # fmt: skip
            rows = random_bits(rng, len(changed))
            tier.flush(torch.from_numpy(changed), rows)
            model.update(zip(changed.tolist(), rows.numpy()))
            ids = np.fromiter(model, np.int64)
        assert tier._db.readers.pids() == pids and not tier._db.readers.broken
        # Staged rows are read in this process, and win over the flushed ones.
        staged = torch.from_numpy(np.unique(rng.choice(ids, 40)))
        staged_rows = random_bits(rng, len(staged))
        tier.write(staged, staged_rows)
        every = torch.from_numpy(np.unique(ids))
        got = tier.read(every)
        assert bitwise_equal(got[torch.searchsorted(every, staged)], staged_rows)
        assert bitwise_equal(got, in_process(tier, every))
    finally:
        tier.close()
    assert gone(pids)


def test_damaged_blocks_are_refused_through_the_processes(tmp_path, small_reads):
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows)
    ids = torch.arange(0, 3000, 2)
    rows = random_bits(np.random.default_rng(1), len(ids))
    tier.flush(ids, rows)
    tier.close()
    key = np.array([1000 ^ (1 << 63)], ">u8").tobytes()
    env = lmdb.open(str(tmp_path / "t"), max_dbs=4)
    with env.begin(write=True) as txn:
        db = env.open_db(b"blocks", txn=txn)
        value = txn.get(key, db=db)
        txn.put(key, value[:7] + bytes([value[7] ^ 1]) + value[8:], db=db)
    env.close()
    tier = SSDTier.open(tmp_path / "t", init_rows, io_processes=2)
    try:
        good = ids[ids != 1000]
        started(tier, good)
        with pytest.raises(CorruptBlockError, match="checksum") as info:
            tier.read(ids)
        assert f"{1000 ^ (1 << 63):#x}" in str(info.value)
        assert not tier._db.readers.broken  # the pool stays usable after refusing
        assert bitwise_equal(tier.read(good), rows[ids != 1000])
    finally:
        tier.close()


def test_a_dead_worker_falls_back_to_this_process(tmp_path, small_reads):
    rng = np.random.default_rng(7)
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, io_processes=2)
    try:
        ids = torch.from_numpy(np.unique(rng.integers(-(2**40), 2**40, 2000)))
        rows = random_bits(rng, len(ids))
        tier.flush(ids, rows)
        started(tier, ids)
        readers = tier._db.readers
        pids = readers.pids()
        readers._procs[1].kill()
        readers._procs[1].wait()
        assert bitwise_equal(tier.read(ids), rows)
        assert readers.closed and gone(pids)
        assert bitwise_equal(tier.read(ids), rows)  # later reads: in this process
    finally:
        tier.close()


def test_a_stale_snapshot_is_refused_by_the_worker(tmp_path):
    """A worker asked for a snapshot that is not its own answers 'stale' (the tier then
    reads in this process) and keeps serving."""
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, io_processes=1)
    try:
        tier.flush(torch.arange(10), torch.rand(10, W))
        readers = tier._db.readers
        readers.start()
        assert readers.ready(timeout=60)
        codec = BlockCodec(W, 1, 3, 1)
        _, blocks = codec.blocks(np.arange(10, dtype=np.uint64) ^ np.uint64(1 << 63))
        keys = blocks.astype(">u8")
        with tier._env.begin() as txn:
            current = txn.id()
        for txn_id, stale in ((current + 1, True), (current, False)):
            readers.send(0, txn_id, keys, 4)
            try:
                if stale:
                    with pytest.raises(StaleSnapshot):
                        list(readers.answers(0, len(keys), 4))
                else:
                    answers = list(readers.answers(0, len(keys), 4))
                    assert sum(len(a[1]) for a in answers) == 10
            finally:
                readers.release(0)
        pids = readers.pids()
    finally:
        tier.close()
    assert gone(pids)


def test_io_processes_is_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="io_processes"):
        SSDConfig(tmp_path / "t", io_processes=-1)
    with pytest.raises(InvalidInputError, match="io_processes"):
        SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, io_processes="2")
    assert not (tmp_path / "t").exists()
    assert SSDConfig(tmp_path / "t", io_processes=2).tier_options(True)["io_processes"] == 2
    assert "io_processes" not in SSDConfig(tmp_path / "t").tier_options(True)


def test_reads_on_several_threads_at_once_share_the_processes(tmp_path, small_reads):
    """Reads in flight together (read_async) take turns on each worker: every one gets its
    own rows."""
    rng = np.random.default_rng(11)
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, io_threads=3,
                          io_processes=2)  # fmt: skip
    try:
        ids = torch.from_numpy(np.unique(rng.integers(-(2**40), 2**40, 3000)))
        rows = random_bits(rng, len(ids))
        tier.flush(ids, rows)
        started(tier, ids)
        picks = [torch.from_numpy(np.sort(rng.choice(len(ids), 500, replace=False)))
                 for _ in range(8)]  # fmt: skip
        futures = [tier.read_async(ids[p]) for p in picks]
        for p, future in zip(picks, futures):
            assert bitwise_equal(future.result(), rows[p])
        assert not tier._db.readers.broken and not tier._db.readers.closed
    finally:
        tier.close()


def test_a_table_dropped_without_close_stops_its_processes(tmp_path, small_reads):
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, io_processes=2)
    ids = torch.arange(0, 2000, 3)
    tier.flush(ids, torch.rand(len(ids), W))
    started(tier, ids)
    pids = tier._db.readers.pids()
    assert not gone(pids)
    del tier
    gc.collect()
    assert gone(pids)


def test_the_module_passes_io_processes_to_its_table(tmp_path):
    """SSDConfig(io_processes=...) reaches the SSD tier of a TieredEmbeddingBag; close()
    stops the processes it started."""
    import tierstore as ts

    emb = ts.TieredEmbeddingBag(1000, 4, device="cpu",
                                ssd=ts.SSDConfig(tmp_path / "t", io_processes=2))  # fmt: skip
    readers = emb.store.host.ssd._db.readers
    assert readers is not None and readers.processes == 2
    readers.start()
    assert readers.ready(timeout=60)
    pids = readers.pids()
    emb.close()
    assert readers.closed and gone(pids)
    emb = ts.TieredEmbeddingBag(1000, 4, device="cpu", ssd=ts.SSDConfig(tmp_path / "t"))
    assert emb.store.host.ssd._db.readers is None
    emb.close()
