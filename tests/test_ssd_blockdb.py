"""Tests of the SSD tier's batched block reads (tierstore/ssd_blockdb.py) and the compiled
decoder (tierstore/blocks_compiled.py): exactly the stored rows, whatever the decoder, the
I/O threads, the block layout and the batch; damaged blocks refused by both decoders."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ssd_rows import W, bitwise_equal, init_rows, random_bits

from tierstore import blocks_compiled, ssd_blockdb
from tierstore.blocks import seal
from tierstore.errors import CorruptBlockError
from tierstore.ssd import SSDTier

_NO_COMPILED = pytest.mark.skipif(
    not blocks_compiled.AVAILABLE, reason="no numba or no libz/libzstd shared library"
)
# How reads decode blocks fetched by getmulti: the compiled decoder (the default) or the
# codec's numpy path.
DECODERS = [
    pytest.param("compiled", marks=_NO_COMPILED),
    pytest.param("codec"),
]


def use(tier: SSDTier, decoder: str) -> None:
    tier._db.compiled = decoder != "codec"


def make_table(path, block_rows: int, level: int, io_threads: int, rng, n_flushed: int = 600):
    """A table with ``n_flushed`` flushed rows and a few staged ones, and its model:
    a dict id -> row (the staged rows win)."""
    tier = SSDTier.create(
        path, {"row_width": W}, init_rows, block_rows=block_rows, compression_level=level,
        io_threads=io_threads,
    )  # fmt: skip
    ids = np.unique(rng.integers(-(2**40), 2**40, n_flushed))
    ids = np.unique(np.concatenate((ids, np.arange(-40, 40))))  # dense run: shared blocks
    rows = random_bits(rng, len(ids))
    tier.flush(torch.from_numpy(ids), rows)
    model = dict(zip(ids.tolist(), rows.numpy()))
    staged = np.unique(np.concatenate((rng.choice(ids, 30), rng.integers(-60, 60, 30))))
    staged_rows = random_bits(rng, len(staged))
    tier.write(torch.from_numpy(staged), staged_rows)
    model.update(zip(staged.tolist(), staged_rows.numpy()))
    return tier, model


def expected(model: dict, ids: torch.Tensor) -> torch.Tensor:
    out = init_rows(ids).clone()
    for i, x in enumerate(ids.tolist()):
        if x in model:
            out[i] = torch.from_numpy(model[x])
    return out


@pytest.mark.parametrize("compiled", DECODERS)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    block_rows=st.sampled_from([1, 4, 64]), level=st.sampled_from([0, 3]),
    io_threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31),
)  # fmt: skip
def test_reads_return_exactly_the_stored_rows(tmp_path_factory, compiled, block_rows, level,
                                              io_threads, seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    tier, model = make_table(tmp_path_factory.mktemp("t") / "t", block_rows, level, io_threads, rng)
    try:
        use(tier, compiled)
        stored = np.fromiter(model, np.int64)
        # A batch as the engine sends it: duplicates, stored ids and never-written ones,
        # uniqued (sorted) before the read, gathered back through the inverse.
        batch = torch.from_numpy(np.concatenate((
            rng.choice(stored, 200), rng.integers(-(2**40), 2**40, 50), rng.integers(-80, 80, 50),
        )))  # fmt: skip
        unique, inverse = torch.unique(batch, return_inverse=True)
        assert bitwise_equal(tier.read(unique)[inverse], expected(model, batch))
        assert bitwise_equal(tier.read(unique[:0]), torch.empty(0, W))
    finally:
        tier.close()


@pytest.mark.parametrize("level", [0, 3])
def test_a_batch_of_many_getmulti_chunks_matches_the_codec(tmp_path, monkeypatch, level):
    """Batches larger than one getmulti call: chunks decoded on several threads at once give
    the codec's rows, bitwise; stats count each block once."""
    if not blocks_compiled.AVAILABLE:
        pytest.skip("no compiled decoder here")
    monkeypatch.setattr(ssd_blockdb, "_READ_CHUNK_BLOCKS", 97)  # many chunks, odd sizes
    rng = np.random.default_rng(level)
    tier, model = make_table(tmp_path / "t", 4, level, 4, rng, n_flushed=3000)
    try:
        ids = torch.from_numpy(np.unique(np.concatenate((
            np.fromiter(model, np.int64), rng.integers(-(2**40), 2**40, 500)))))  # fmt: skip
        before = dict(tier.stats)
        fast = tier.read(ids)
        read_blocks = tier.stats["blocks_read"] - before["blocks_read"]
        use(tier, "codec")
        slow = tier.read(ids)
        assert bitwise_equal(fast, slow)
        assert bitwise_equal(fast, expected(model, ids))
        assert tier.stats["blocks_read"] - before["blocks_read"] == 2 * read_blocks
        use(tier, "compiled")
        assert bitwise_equal(tier.read(ids), slow)
    finally:
        tier.close()


def _damaged_table(path, level: int, edit, at=(1000,)) -> tuple[torch.Tensor, int]:
    """A flushed table of the even ids below 3000 whose blocks holding the ids ``at`` are
    replaced by ``edit(key, value)``; returns every id stored and the first such block's key."""
    tier = SSDTier.create(path, {"row_width": W}, init_rows, block_rows=1, compression_level=level)
    ids = torch.arange(0, 3000, 2)
    tier.flush(ids, random_bits(np.random.default_rng(1), len(ids)))
    tier.close()
    keys = [np.array([i ^ (1 << 63)], ">u8").tobytes() for i in at]
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        db = env.open_db(b"blocks", txn=txn)
        for key in keys:
            txn.put(key, edit(key, txn.get(key, db=db)), db=db)
    env.close()
    return ids, int.from_bytes(keys[0], "big")


def _reseal(key: bytes, body: bytes) -> bytes:
    """A value with a valid checksum for ``body``: damage that only the layout checks see."""
    return seal([key], [body])[0]


def _bad_frame(key: bytes, value: bytes) -> bytes:
    frame_len = int.from_bytes(value[:4], "little")
    junk = bytes(b ^ 0x5A for b in value[4 : 4 + frame_len])
    return _reseal(key, value[:4] + junk + value[4 + frame_len : -4])


def _oversized_frame(key: bytes, value: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(3 * (2 + W)))  # too many rows
    return _reseal(key, len(frame).to_bytes(4, "little") + frame + value[-4 - 3 * W : -4])


EDITS = {
    "flipped byte": (lambda key, value: value[:7] + bytes([value[7] ^ 1]) + value[8:], "checksum"),
    "short value": (lambda key, value: value[:3], "shorter than its checksum"),
    "frame length": (
        lambda key, value: _reseal(key, (10**6).to_bytes(4, "little") + value[4:-4]),
        "frame length past the end",
    ),
    "bad frame": (_bad_frame, "bad zstd frame"),
    "oversized frame": (_oversized_frame, "does not match the layout"),
    "bad offset": (
        lambda key, value: _reseal(key, b"\x07\x00" + value[2:-4]),
        "offsets out of order",
    ),
}


@pytest.mark.parametrize("compiled", DECODERS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_damaged_blocks_are_refused_by_both_decoders(tmp_path, compiled, edit):
    level = 0 if edit == "bad offset" else 3
    fn, problem = EDITS[edit]
    ids, block = _damaged_table(tmp_path / "t", level, fn)
    tier = SSDTier.open(tmp_path / "t", init_rows, io_threads=3)
    try:
        use(tier, compiled)
        with pytest.raises(CorruptBlockError, match=problem) as info:
            tier.read(ids)
        assert f"{block:#x}" in str(info.value) and str(tmp_path / "t") in str(info.value)
        good = ids[ids != 1000]
        assert tier.read(good).shape == (len(good), W)  # the other blocks still read
    finally:
        tier.close()


def test_the_first_damaged_block_of_a_read_of_many_chunks_is_named(tmp_path, monkeypatch):
    """A read of many getmulti chunks, its earlier chunks decoded on the I/O threads and its
    last on the reading thread: the first damaged block in id order is the one refused,
    wherever it was decoded, and a read without the damaged blocks is whole."""
    if not blocks_compiled.AVAILABLE:
        pytest.skip("no compiled decoder here")
    monkeypatch.setattr(ssd_blockdb, "_READ_CHUNK_BLOCKS", 97)  # 1 500 blocks: 16 chunks
    flip = EDITS["flipped byte"][0]
    ids, first = _damaged_table(tmp_path / "t", 3, flip, at=(1000, 2990))  # chunks 6 and 16
    tier = SSDTier.open(tmp_path / "t", init_rows, io_threads=3)
    try:
        with pytest.raises(CorruptBlockError, match="checksum") as info:
            tier.read(ids)
        assert f"{first:#x}" in str(info.value)
        with pytest.raises(CorruptBlockError, match="checksum") as info:
            tier.read(ids[ids != 1000])  # the last chunk's block, decoded on this thread
        assert f"{2990 ^ (1 << 63):#x}" in str(info.value)
        keep = (ids != 1000) & (ids != 2990)
        rows = random_bits(np.random.default_rng(1), len(ids))  # as _damaged_table wrote them
        assert bitwise_equal(tier.read(ids[keep]), rows[keep])
    finally:
        tier.close()


@pytest.mark.parametrize("block_rows", [1, 4])
def test_staged_rows_merge_and_list_in_many_chunks(tmp_path, monkeypatch, block_rows):
    """A flush merges the staged rows a bounded chunk at a time (here 7 rows: 7 blocks, or 1
    block of 4 rows), each block once; listing the rows goes by the same chunks."""
    monkeypatch.setattr(ssd_blockdb, "_LIST_CHUNK_ROWS", 7)
    rng = np.random.default_rng(block_rows)
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows, block_rows=block_rows)
    try:
        ids = torch.from_numpy(np.unique(rng.integers(-500, 500, 60)))
        rows = random_bits(rng, len(ids))
        tier.write(ids, rows)
        assert torch.equal(tier.stored_ids(flushed=False), ids)
        written = tier.stats["blocks_written"]
        tier.flush(ids[:0], rows[:0])
        blocks = len(np.unique(ids.numpy() // block_rows))
        assert tier.stats["blocks_written"] - written == blocks
        assert bitwise_equal(tier.read(ids), rows)
        assert torch.equal(tier.stored_ids(), ids)
    finally:
        tier.close()
