"""Tests of the SSD tier (tierstore/ssd.py) against a dict-of-rows model and hand-made faults."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib

import lmdb
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierstore.errors import (
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    StorageError,
    StorageFullError,
    TableLockedError,
    TableMismatchError,
)
from tierstore.hashing import initial_weights
from tierstore.ssd import SSDTier

W = 7  # odd on purpose: no row or plane falls on an aligned boundary
SEED, SCALE = 11, 0.05
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def init_rows(ids: torch.Tensor, width: int = W) -> torch.Tensor:
    return initial_weights(ids, width, SEED, SCALE)


def meta(width: int = W, **extra) -> dict:
    return {"row_width": width, "embedding_dim": width - 1, "dtype": "float32", **extra}


def random_bits(seed: int, n: int, width: int = W) -> torch.Tensor:
    """Rows of arbitrary float32 bit patterns: NaNs, infinities and denormals included."""
    bits = np.random.default_rng(seed).integers(0, 2**32, (n, width), dtype=np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def ids_of(values) -> torch.Tensor:
    return torch.tensor(sorted(set(values)), dtype=torch.int64)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


class Model:
    """The reference: flushed and staged rows as dicts of id -> row (float32 bit patterns)."""

    def __init__(self, width: int = W) -> None:
        self.width = width
        self.flushed: dict[int, np.ndarray] = {}
        self.staged: dict[int, np.ndarray] = {}

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.staged.update(zip(ids.tolist(), rows.numpy().copy()))

    def flush(self, chunks) -> None:
        self.flushed.update(self.staged)
        self.staged = {}
        for ids, rows in chunks:
            self.flushed.update(zip(ids.tolist(), rows.numpy().copy()))

    def crash(self) -> None:
        self.staged = {}

    def expected(self, ids: torch.Tensor) -> torch.Tensor:
        out = init_rows(ids, self.width).clone()
        for i, key in enumerate(ids.tolist()):
            row = self.staged.get(key, self.flushed.get(key))
            if row is not None:
                out[i] = torch.from_numpy(row)
        return out


# ------------------------------------------------------------------------- round trips

ID_VALUES = st.one_of(
    st.integers(-24, 24),  # dense: many rows share a block, so writes are read-modify-writes
    st.integers(I64_MIN, I64_MAX),
    st.sampled_from([I64_MIN, I64_MIN + 1, I64_MAX - 1, I64_MAX, 1 << 40, -(1 << 40)]),
)
IDS = st.lists(ID_VALUES, max_size=40, unique=True).map(ids_of)
SEEDS = st.integers(0, 2**32 - 1)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), IDS, SEEDS),
        st.tuples(st.just("flush"), st.lists(st.tuples(IDS, SEEDS), max_size=3)),
        st.tuples(st.just("abort"), IDS, SEEDS),
        st.tuples(st.just("read"), IDS),
        st.tuples(st.just("reopen")),
    ),
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, block_rows=st.sampled_from([1, 4, 64]), level=st.sampled_from([0, 3]))
def test_matches_dict_model(ops, block_rows, level):
    model = Model()
    seen: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t")
        tier = SSDTier.create(
            path, meta(), init_rows, block_rows=block_rows, compression_level=level
        )
        try:
            for op in ops:
                if op[0] == "write":
                    rows = random_bits(op[2], len(op[1]))
                    tier.write(op[1], rows)
                    model.write(op[1], rows)
                    seen.update(op[1].tolist())
                elif op[0] == "flush":
                    chunks = [(ids, random_bits(seed, len(ids))) for ids, seed in op[1]]
                    with tier.flush_begin() as writer:
                        for ids, rows in chunks:
                            writer.write(ids, rows)
                            seen.update(ids.tolist())
                    model.flush(chunks)
                elif op[0] == "abort":
                    writer = tier.flush_begin()
                    writer.write(op[1], random_bits(op[2], len(op[1])))
                    writer.abort()
                elif op[0] == "read":
                    assert_bitwise(tier.read(op[1]), model.expected(op[1]))
                else:
                    tier.close()
                    tier = SSDTier.open(path, init_rows)
                    model.crash()
            everything = ids_of(seen | {0, I64_MIN, I64_MAX})
            assert_bitwise(tier.read(everything), model.expected(everything))
        finally:
            tier.close()


@pytest.mark.parametrize("level", [0, 3])
@pytest.mark.parametrize("block_rows", [8, 64, None])
def test_round_trip_after_reopen(tmp_path, level, block_rows):
    rng = np.random.default_rng(level * 100 + (block_rows or 0))
    kwargs = {} if block_rows is None else {"block_rows": block_rows}
    tier = SSDTier.create(tmp_path / "t", meta(), init_rows, compression_level=level, **kwargs)
    ids = np.concatenate(
        [
            rng.integers(I64_MIN, I64_MAX, 3000, dtype=np.int64, endpoint=True),
            rng.integers(-5000, 5000, 3000),
            [I64_MIN, I64_MAX, -1, 0],
        ]
    )
    ids = ids_of(ids.tolist())
    rows = torch.from_numpy(rng.normal(0, 0.01, (len(ids), W)).astype(np.float32))
    with tier.flush_begin() as writer:  # in two chunks
        half = len(ids) // 2
        writer.write(ids[:half], rows[:half])
        writer.write(ids[half:], rows[half:])
    tier.close()
    tier = SSDTier.open(tmp_path / "t", init_rows, expect={"row_width": W})
    assert_bitwise(tier.read(ids), rows)
    unwritten = ids_of(set(rng.integers(-6000, 6000, 2000).tolist()) - set(ids.tolist()))
    assert_bitwise(tier.read(unwritten), init_rows(unwritten))
    assert tier.read(torch.empty(0, dtype=torch.int64)).shape == (0, W)
    mixed = ids_of(ids[::3].tolist() + unwritten[::3].tolist())
    expected = init_rows(mixed)
    written = dict(zip(ids.tolist(), rows))
    for i, key in enumerate(mixed.tolist()):
        if key in written:
            expected[i] = written[key]
    assert_bitwise(tier.read(mixed), expected)
    assert_bitwise(tier.read_async(mixed).result(), expected)
    tier.close()


def test_int32_ids_and_input_errors(tmp_path):
    tier = SSDTier.create(tmp_path / "t", meta(), init_rows)
    rows = random_bits(1, 3)
    tier.write(torch.tensor([1, 5, 9], dtype=torch.int32), rows)
    assert_bitwise(tier.read(torch.tensor([1, 5, 9])), rows)
    with pytest.raises(InvalidInputError, match="sorted"):
        tier.read(torch.tensor([5, 1]))
    with pytest.raises(InvalidInputError, match="sorted"):
        tier.write(torch.tensor([1, 1]), random_bits(1, 2))
    with pytest.raises(InvalidInputError, match="shape"):
        tier.write(torch.tensor([1, 2]), random_bits(1, 3))
    with pytest.raises(InvalidInputError, match="float32"):
        tier.write(torch.tensor([1]), torch.zeros(1, W, dtype=torch.float64))
    tier.close()


# --------------------------------------------------------------------- staged writes


def test_staged_rows_visible_then_dropped_or_flushed(tmp_path):
    path = tmp_path / "t"
    tier = SSDTier.create(path, meta(), init_rows, block_rows=4)
    a, b = ids_of(range(0, 20, 2)), ids_of(range(1, 20, 2))
    rows_a, rows_b = random_bits(1, len(a)), random_bits(2, len(b))
    tier.flush(a, rows_a)
    staged = random_bits(3, len(b))
    tier.write(b, staged)  # into blocks that already hold flushed rows
    assert_bitwise(tier.read(b), staged)
    assert_bitwise(tier.read(a), rows_a)
    tier.close()  # a crash before the next flush: staged rows are gone
    tier = SSDTier.open(path, init_rows)
    assert_bitwise(tier.read(b), init_rows(b))
    assert_bitwise(tier.read(a), rows_a)
    tier.write(b, rows_b)
    newer = random_bits(4, 3)
    with tier.flush_begin() as writer:  # flush rows win over staged rows of the same id
        writer.write(b[:3], newer)
    expected = rows_b.clone()
    expected[:3] = newer
    assert_bitwise(tier.read(b), expected)
    tier.close()
    tier = SSDTier.open(path, init_rows)
    assert_bitwise(tier.read(b), expected)
    tier.close()


def test_aborted_flush_keeps_staged_rows(tmp_path):
    tier = SSDTier.create(tmp_path / "t", meta(), init_rows)
    ids, rows = ids_of([3, 4]), random_bits(5, 2)
    tier.write(ids, rows)
    with pytest.raises(RuntimeError, match="boom"), tier.flush_begin() as writer:
        writer.write(ids_of([7]), random_bits(6, 1))
        raise RuntimeError("boom")
    assert_bitwise(tier.read(ids), rows)
    assert_bitwise(tier.read(ids_of([7])), init_rows(ids_of([7])))
    tier.flush(ids_of([]), random_bits(0, 0))
    tier.close()
    tier = SSDTier.open(tmp_path / "t", init_rows)
    assert_bitwise(tier.read(ids), rows)
    tier.close()


def test_write_during_own_flush_is_refused(tmp_path):
    tier = SSDTier.create(tmp_path / "t", meta(), init_rows)
    writer = tier.flush_begin()
    with pytest.raises(RuntimeError, match="flush open"):
        tier.write(ids_of([1]), random_bits(1, 1))
    writer.commit()
    with pytest.raises(RuntimeError, match="already committed"):
        writer.write(ids_of([1]), random_bits(1, 1))
    tier.close()


def test_reads_never_go_back_in_time_during_flushes(tmp_path):
    """A reader thread must see every id at one version per read, never older than the last
    committed flush, while the writer stages version 2k and flushes 2k + 1 over it (so the
    staged rows are stale once the flush commits, until they are cleared)."""
    import threading

    tier = SSDTier.create(tmp_path / "t", meta(), init_rows, block_rows=4)
    ids = ids_of(range(-30, 30, 3))
    committed = [0.0]  # the version of the last committed flush
    clear_staged = tier._clear_staged

    def slow_clear(*args):  # white box: widen the window between commit and clearing
        committed[0] = version
        time.sleep(0.005)
        clear_staged(*args)

    tier._clear_staged = slow_clear
    stop, reads, errors = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            floor = committed[0]
            rows = tier.read(ids)
            if not torch.all(rows == rows[0, 0]) or float(rows[0, 0]) < floor:
                errors.append((floor, rows[:, 0].tolist()))
                return
            reads[0] += 1

    version = 0.0
    tier.flush(ids, torch.zeros(len(ids), W))
    thread = threading.Thread(target=reader)
    thread.start()
    for k in range(1, 40):
        tier.write(ids, torch.full((len(ids), W), 2.0 * k))
        version = 2.0 * k + 1
        tier.flush(ids, torch.full((len(ids), W), version))
    stop.set()
    thread.join()
    tier.close()
    assert not errors, errors[0]
    assert reads[0] > 5


# ------------------------------------------------------------------ crash durability

POOL = np.concatenate(
    [np.arange(-60, 60), np.random.default_rng(0).integers(I64_MIN, I64_MAX, 80, endpoint=True)]
)
MARKER = torch.tensor([I64_MIN])  # its row holds (last flushed step + 1)


def step_rows(step: int):
    """What step ``step`` writes: staged rows A, then a flush of rows B plus the marker."""
    rng = np.random.default_rng(step)
    a = ids_of(rng.choice(POOL, 30, replace=False).tolist())
    b = ids_of(rng.choice(POOL, 30, replace=False).tolist() + [I64_MIN])
    rows_a = torch.from_numpy(rng.normal(0, 1, (len(a), W)).astype(np.float32))
    rows_b = torch.from_numpy(rng.normal(0, 1, (len(b), W)).astype(np.float32))
    rows_b[0] = step + 1  # b[0] is the marker
    return a, rows_a, b, rows_b


def last_step(tier: SSDTier) -> int:
    return int(round(float(tier.read(MARKER)[0, 0]))) - 1  # unwritten: |init| < 1 -> -1


def crash_child(path, out_fd: int) -> None:
    """Runs in a forked process: write, flush, report the flushed step, forever."""
    torch.set_num_threads(1)
    tier = SSDTier.open(path, init_rows)
    step = last_step(tier) + 1
    while True:
        a, rows_a, b, rows_b = step_rows(step)
        tier.write(a, rows_a)
        with tier.flush_begin() as writer:
            writer.write(b, rows_b)
        os.write(out_fd, f"{step}\n".encode())
        step += 1


class _FlushOnFirstRead:
    """The staged environment with a hook: the first read transaction begun on it first runs
    ``flush`` to its commit on another thread (a flush that commits between the two snapshots
    a listing takes, whichever it takes first)."""

    def __init__(self, env, flush):
        self._env, self._flush = env, flush

    def begin(self, *args, **kwargs):
        if not kwargs.get("write") and self._flush is not None:
            flush, self._flush = self._flush, None
            thread = threading.Thread(target=flush)
            thread.start()
            thread.join()
        return self._env.begin(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._env, name)


def test_stored_ids_keep_the_rows_a_concurrent_flush_merges(tmp_path):
    """``stored_ids`` takes the staged snapshot before the flushed one (as ``read`` does): a
    flush that commits between them has merged the staged rows into the flushed snapshot, so
    every row written is listed (taken the other way round, the staged rows were in neither)."""
    rng = random.Random()
    tier = SSDTier.create(tmp_path / "t", meta(), init_rows, block_rows=rng.choice([1, 4]))
    flushed = ids_of(rng.sample(range(-500, 500), 40))
    staged = ids_of(rng.sample(range(500, 900), 30))
    tier.flush(flushed, random_bits(rng.randrange(1 << 30), len(flushed)))
    tier.write(staged, random_bits(rng.randrange(1 << 30), len(staged)))
    tier._staged_env = _FlushOnFirstRead(
        tier._staged_env, lambda: tier.flush(ids_of([]), torch.empty(0, W))
    )
    listed = tier.stored_ids()
    assert tier._flush_count == 2  # the flush did commit during the listing
    assert torch.equal(listed, torch.cat([flushed, staged]))
    tier._staged_env = tier._staged_env._env
    tier.close()


def test_kill_9_loses_nothing_flushed(tmp_path):
    path = tmp_path / "t"
    SSDTier.create(path, meta(), init_rows, block_rows=4).close()
    models = {-1: Model()}

    def model_at(step: int) -> Model:
        while max(models) < step:
            k = max(models)
            m = Model()
            m.flushed = dict(models[k].flushed)
            a, rows_a, b, rows_b = step_rows(k + 1)
            m.write(a, rows_a)
            m.flush([(b, rows_b)])
            models[k + 1] = m
        return models[step]

    rand = random.Random(1)
    state, reached = -1, []
    everything = ids_of(POOL.tolist() + [I64_MIN])
    for _ in range(20):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_fd)
                crash_child(path, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        time.sleep(rand.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd) as pipe:
            printed = [int(line) for line in pipe.read().split()]
        flushed = printed[-1] if printed else state
        tier = SSDTier.open(path, init_rows)
        state = last_step(tier)
        # The kill may land between a commit and its report: then one step more is on disk.
        assert state in (flushed, flushed + 1), (printed, state)
        assert_bitwise(tier.read(everything), model_at(state).expected(everything))
        tier.close()
        reached.append(state)
        for k in [k for k in models if k < state - 1]:
            del models[k]
    assert reached[-1] > 20  # the children did make progress


# ------------------------------------------------------------------------- faults


def flushed_table(path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    tier = SSDTier.create(path, meta(), init_rows, **kwargs)
    ids = ids_of(list(range(-40, 40)) + [I64_MIN, I64_MAX])
    rows = random_bits(9, len(ids))
    tier.flush(ids, rows)
    tier.close()
    return ids, rows


def check_still_readable(path, ids, rows) -> None:
    tier = SSDTier.open(path, init_rows, readonly=True)
    assert_bitwise(tier.read(ids), rows)
    tier.close()


def test_mismatched_table(tmp_path):
    path = tmp_path / "t"
    ids, rows = flushed_table(path)
    for expect in ({"row_width": W + 1}, {"dtype": "float16"}, {"embedding_dim": 3}):
        with pytest.raises(TableMismatchError) as info:
            SSDTier.open(path, init_rows, expect={"row_width": W, **expect})
        assert str(path) in str(info.value)
        assert list(expect)[0] in str(info.value)
    env = lmdb.open(str(path), max_dbs=4)  # a table from another format version
    with env.begin(write=True) as txn:
        db = env.open_db(b"meta", txn=txn)
        raw = txn.get(b"meta", db=db)
        stored = json.loads(raw[:-4])  # the JSON, then its CRC-32
    env.close()
    for version, plain in ((99, False), (1, True)):  # version 1 had no checksums
        body = json.dumps({**stored, "format_version": version}).encode()
        value = body if plain else body + zlib.crc32(b"meta" + body).to_bytes(4, "little")
        env = lmdb.open(str(path), max_dbs=4)
        with env.begin(write=True) as txn:
            txn.put(b"meta", value, db=env.open_db(b"meta", txn=txn))
        env.close()
        with pytest.raises(TableMismatchError, match=f"format_version={version}") as info:
            SSDTier.open(path, init_rows)
        assert str(path) in str(info.value)
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"meta", raw, db=env.open_db(b"meta", txn=txn))
    env.close()
    check_still_readable(path, ids, rows)
    assert SSDTier.read_meta(path)["row_width"] == W


def test_not_a_table(tmp_path):
    cases = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    cases["empty"].mkdir()
    cases["random"] = tmp_path / "random"
    cases["random"].mkdir()
    (cases["random"] / "data.mdb").write_bytes(os.urandom(20000))
    (cases["random"] / "notes.txt").write_text("hello")
    cases["file"] = tmp_path / "file"
    cases["file"].write_text("not a directory")
    cases["plain_lmdb"] = tmp_path / "plain_lmdb"
    env = lmdb.open(str(cases["plain_lmdb"]), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    for name, path in cases.items():
        for readonly in (False, True):
            with pytest.raises(NotATableError) as info:
                SSDTier.open(path, init_rows, readonly=readonly)
            assert str(path) in str(info.value), name
        with pytest.raises(NotATableError):
            SSDTier.read_meta(path)
    assert sorted(os.listdir(cases["empty"])) == []  # nothing was created
    with pytest.raises(StorageError, match="already exists"):
        SSDTier.create(cases["random"], meta(), init_rows)


def corrupt(path, block_key: bytes, value: bytes, sealed: bool = True) -> None:
    """Replaces a stored block by ``value``, with a valid checksum trailer if ``sealed`` (so
    that the decoder's own checks are reached)."""
    if sealed:
        value += zlib.crc32(block_key + value).to_bytes(4, "little")
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        db = env.open_db(b"blocks", txn=txn)
        assert txn.get(block_key, db=db) is not None
        txn.put(block_key, value, db=db)
    env.close()


def block_key(row_id: int, block_rows: int) -> bytes:
    return (((row_id + 2**64) % 2**64 ^ 2**63) >> (block_rows.bit_length() - 1)).to_bytes(8, "big")


def bad_value(kind: str) -> bytes:
    if kind == "bad_frame":
        frame = b"\x28\xb5\x2f\xfd" + b"garbage!" * 4  # zstd magic, then nonsense
        return len(frame).to_bytes(4, "little") + frame
    if kind == "wrong_length":  # a valid frame that decompresses to 3 bytes
        frame = zstandard.ZstdCompressor().compress(b"xyz")
        return len(frame).to_bytes(4, "little") + frame + bytes(3 * W)
    if kind == "short_header":
        return b"\x01"
    return b"\x01\x00" + bytes(4 * W - 1)  # level 0: a raw block one byte short


@pytest.mark.parametrize(
    "level,kind,sealed",
    [
        (3, "bad_frame", True),
        (3, "wrong_length", True),
        (3, "short_header", True),
        (0, "raw_short", True),
        (3, "bad_frame", False),
        (0, "raw_short", False),
    ],
)
def test_corrupt_block(tmp_path, level, kind, sealed):
    path = tmp_path / "t"
    ids, rows = flushed_table(path, block_rows=8, compression_level=level)
    corrupt(path, block_key(16, 8), bad_value(kind), sealed)
    tier = SSDTier.open(path, init_rows)
    with pytest.raises(CorruptBlockError) as info:
        tier.read(ids_of([17]))
    assert str(path) in str(info.value) and "at id 16" in str(info.value)
    healthy = (ids < 16) | (ids >= 24)
    assert_bitwise(tier.read(ids[healthy]), rows[healthy])
    tier.close()


def test_full_map_rolls_back(tmp_path):
    path = tmp_path / "t"
    width = 64
    tier = SSDTier.create(path, meta(width), init_rows, map_size=1 << 20)
    ids = ids_of(range(100))
    rows = random_bits(1, 100, width)
    tier.flush(ids, rows)
    big = ids_of(range(1000, 21000))
    with pytest.raises(StorageFullError) as info:
        tier.flush(big, random_bits(2, len(big), width))
    assert str(path) in str(info.value)
    assert_bitwise(tier.read(ids), rows)  # the tier stays usable
    staged = random_bits(3, 10, width)
    tier.write(ids[:10], staged)
    with pytest.raises(StorageFullError):
        tier.write(big, random_bits(2, len(big), width))
    assert_bitwise(tier.read(ids[:10]), staged)  # earlier staged rows are kept
    tier.flush(ids[:0], rows[:0])
    tier.close()
    tier = SSDTier.open(path, lambda i: init_rows(i, width))
    expected = rows.clone()
    expected[:10] = staged
    assert_bitwise(tier.read(ids), expected)
    assert_bitwise(tier.read(big[:5]), init_rows(big[:5], width))
    tier.close()


@contextlib.contextmanager
def read_only_directory(path):
    """Makes ``path`` read-only: chmod for a normal user, the immutable flag for root."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a read-only directory")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root and chattr +i is not permitted here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_directory(tmp_path):
    path = tmp_path / "t"
    ids, rows = flushed_table(path)
    with read_only_directory(path):
        with pytest.raises(StorageError, match="read-only") as info:
            SSDTier.open(path, init_rows)
        assert str(path) in str(info.value)
        check_still_readable(path, ids, rows)
    check_still_readable(path, ids, rows)


def test_second_writer_is_locked_out(tmp_path):
    path = tmp_path / "t"
    ids, rows = flushed_table(path)
    tier = SSDTier.open(path, init_rows)
    with pytest.raises(TableLockedError, match="this process"):
        SSDTier.open(path, init_rows)
    assert SSDTier.read_meta(path)["row_width"] == W  # served from the open table
    tier.close()

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another process holds the table open for writing
        try:
            held = SSDTier.open(path, init_rows)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            held.close()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(TableLockedError) as info:
            SSDTier.open(path, init_rows)
        assert str(path) in str(info.value) and "another process" in str(info.value)
        check_still_readable(path, ids, rows)  # readers are welcome
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
    SSDTier.open(path, init_rows).close()  # released when the holder closes

    pid = os.fork()
    if pid == 0:  # ... and when the holder dies
        held = SSDTier.open(path, init_rows)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    check_still_readable(path, ids, rows)
    SSDTier.open(path, init_rows).close()


# ------------------------------------------------------------------ size and speed-free


def test_billion_row_table_is_created_small(tmp_path):
    tier = SSDTier.create(tmp_path / "t", meta(num_embeddings=10**9), init_rows)
    ids = ids_of([0, 123_456_789, 10**9 - 1])
    assert_bitwise(tier.read(ids), init_rows(ids))
    assert tier.disk_bytes() < 1 << 20
    tier.close()
    stored = SSDTier.read_meta(tmp_path / "t")
    assert stored["num_embeddings"] == 10**9
    assert stored["format_version"] == SSDTier.FORMAT_VERSION
    assert {"block_rows", "compression_level"} <= set(stored)


@pytest.mark.parametrize("block_rows", [4, 64, None])
def test_trained_rows_compress(tmp_path, block_rows):
    width, n = 129, 4096  # dim 128 + row-wise AdaGrad state
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 0.01, (n, width)).astype(np.float32)
    rows[:, -1] = np.abs(rng.normal(0, 1, n)) * 0.1  # positive optimizer state
    rows_t = torch.from_numpy(rows)
    ids = torch.arange(n)
    sizes = {}
    for level in (0, 3):
        kwargs = {} if block_rows is None else {"block_rows": block_rows}
        path = tmp_path / f"level{level}"
        tier = SSDTier.create(path, meta(width), init_rows, compression_level=level, **kwargs)
        tier.flush(ids, rows_t)
        sizes[level] = tier.stats["bytes_written"]
        tier.close()
        tier = SSDTier.open(path, lambda i: init_rows(i, width))
        assert_bitwise(tier.read(ids), rows_t)
        tier.close()
    raw = rows.nbytes
    assert raw / sizes[3] > 1.0
    assert sizes[3] < sizes[0]
    # Byte-shuffling is what makes the difference: zstd on the rows as they are gains ~nothing.
    plain = len(zstandard.ZstdCompressor(level=3).compress(rows.tobytes()))
    assert raw / sizes[3] > raw / plain
