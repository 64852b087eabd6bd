"""Damaged, truncated, half-created and read-only tables: refused or correct, never wrong.

What README.md's "Durability, corruption and concurrency" section promises, checked here:
random byte damage anywhere in ``data.mdb`` (except the 16-byte page headers and the meta
pages' transaction ids, which README lists as not detected) reads back exactly or raises a tierstore error naming the path;
a truncated file is refused without a signal; a kill during the first create leaves no
table or an empty one; edited metadata is refused clearly; a read-only open sees the last
flush and refuses training before anything changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import lmdb
import pytest
import torch

import tierstore as ts
from tierstore.errors import CorruptBlockError, StorageError, StorageFullError, TierstoreError
from tierstore.hashing import initial_weights
from tierstore.ssd import SSDTier
from tierstore.ssd_files import StorageErrors as _StorageErrors

W = 9


def init_rows(ids: torch.Tensor) -> torch.Tensor:
    return initial_weights(ids, W, 3, 0.1)


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(ts.__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=timeout
    )


# ------------------------------------------------------------------ random damage

# Runs in a subprocess, so that a crash is a failed test and not a dead test run. Prints one
# line per damaged copy: "<layout> <seed> ok", "... refused <error>", or what went wrong.
DAMAGE = textwrap.dedent(
    """
    import pathlib, random, shutil, struct, sys, torch
    from tierstore.errors import TierstoreError
    from tierstore.hashing import initial_weights
    from tierstore.ssd import SSDTier

    W, root = 9, pathlib.Path(sys.argv[1])
    init_rows = lambda ids: initial_weights(ids, W, 3, 0.1)

    def damage(level, block_rows, seeds):
        base = root / f"base{level}_{block_rows}"
        tier = SSDTier.create(base, {"row_width": W}, init_rows, block_rows=block_rows,
                              compression_level=level)
        n = 1500
        ids = torch.arange(0, 2 * n, 2)  # every other id: the odd ones were never written
        rows = torch.randn(n, W, generator=torch.Generator().manual_seed(level + block_rows))
        tier.flush(ids[: n // 2], rows[: n // 2])
        tier.flush(ids[n // 2 :], rows[n // 2 :])
        tier.close()
        every = torch.arange(-3, 2 * n + 5)
        want = init_rows(every)
        want[ids + 3] = rows
        data = (base / "data.mdb").read_bytes()
        page = struct.unpack_from("<I", data, 40)[0]
        # Not detected (README says so): a meta page's transaction id (8 bytes at 144) picks
        # the table's version, and raising the older one rolls the table back a flush; a
        # page's 16-byte header (its entry count, flags) can hide stored blocks.
        spared = lambda pos: pos % page < 16 or pos in range(144, 152) or pos in range(
            page + 144, page + 152)
        for seed in seeds:
            rng = random.Random(seed)
            damaged = bytearray(data)
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                pos = rng.randrange(len(damaged))
                while spared(pos):
                    pos = rng.randrange(len(damaged))
                damaged[pos] ^= rng.randrange(1, 256)
            copy = root / f"copy{seed}"
            shutil.copytree(base, copy)
            (copy / "data.mdb").write_bytes(bytes(damaged))
            try:
                tier = SSDTier.open(copy, init_rows, readonly=True)
                try:
                    got = tier.read(every)
                finally:
                    tier.close()
                wrong = (got != want).any(1).nonzero().squeeze(1) - 3
                line = "ok" if len(wrong) == 0 else f"WRONG rows {wrong[:5].tolist()}"
            except TierstoreError as exc:
                named = str(copy) in str(exc)
                line = f"refused {type(exc).__name__}" if named else f"UNNAMED {exc}"
            except Exception as exc:
                line = f"OTHER {exc!r}"
            print(f"{level}/{block_rows}", seed, line, flush=True)
            shutil.rmtree(copy)

    for level, block_rows in ((3, 1), (0, 8), (3, 64)):
        first = 1000 * block_rows + level
        damage(level, block_rows, range(first, first + 50))
    """
)


def test_random_damage_is_refused_or_harmless_never_wrong(tmp_path):
    """Changes 1-3 bytes at random positions of a flushed table (50 seeds for each of three
    layouts: values, keys, node headers and pointers, branch pages, free pages, meta pages;
    not the page headers nor the meta pages' transaction ids) and reads every row, written or
    not: each read is exactly right or refused with the path named; the process never dies."""
    proc = subprocess.run(
        [sys.executable, "-c", DAMAGE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # never a signal, never a traceback
    lines = proc.stdout.splitlines()
    assert len(lines) == 150
    bad = [line for line in lines if line.split(" ", 2)[2].split()[0] not in ("ok", "refused")]
    assert not bad, bad
    for layout in ("3/1", "0/8", "3/64"):  # the damage was seen, and some was harmless
        outcomes = [line.split(" ", 2)[2] for line in lines if line.startswith(layout + " ")]
        assert sum(o.startswith("refused") for o in outcomes) >= 10, (layout, outcomes)
        assert "ok" in outcomes, (layout, outcomes)


# ------------------------------------------------------------------ truncation

TRUNCATED = textwrap.dedent(
    """
    import sys, torch, tierstore as ts
    from tierstore.errors import TierstoreError
    from tierstore.hashing import initial_weights
    from tierstore.ssd import SSDTier
    init_rows = lambda ids: initial_weights(ids, 9, 3, 0.1)
    for path in sys.argv[1:]:
        for readonly in (True, False):
            try:
                tier = SSDTier.open(path, init_rows, readonly=readonly)
                tier.read(torch.arange(4000))
                if not readonly:
                    tier.flush(torch.arange(5), torch.zeros(5, 9))
                print(path, "opened", flush=True)
            except TierstoreError as exc:
                print(path, "refused", type(exc).__name__, path in str(exc), flush=True)
        try:
            config = ts.SSDConfig(path, host_rows=64)
            ts.TieredEmbeddingBag.open(config, cache=ts.CacheConfig(rows=8)).flush()
            print(path, "opened", flush=True)
        except TierstoreError as exc:
            print(path, "refused", type(exc).__name__, path in str(exc), flush=True)
    """
)


def test_truncated_table_is_refused_without_a_signal(tmp_path):
    """A data.mdb cut short anywhere is refused at open (SSD tier and module, read-only and
    for writing) with an error naming the path, and the process never dies of SIGBUS."""
    emb = ts.TieredEmbeddingBag(
        4000, 9, cache=ts.CacheConfig(rows=64), ssd=ts.SSDConfig(tmp_path / "t", host_rows=4096)
    )
    emb.write_rows(torch.arange(4000), torch.randn(4000, 9))
    emb.flush()
    emb.close()
    size = (tmp_path / "t" / "data.mdb").stat().st_size
    cuts = sorted({0, 100, 4096, 8192 + 17, size // 3, size // 2, size - 4096, size - 1})
    tables = []
    for cut in cuts:
        table = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "t", table)
        with open(table / "data.mdb", "r+b") as f:
            f.truncate(cut)
        tables.append(str(table))
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATED, *tables], capture_output=True, text=True, env=_env()
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 * len(cuts)
    assert all(line.split()[1] == "refused" and line.endswith("True") for line in lines), lines


# ------------------------------------------------------------------ atomic create


def test_kill_during_the_first_create_leaves_no_table_or_an_empty_one(tmp_path):
    """SIGKILL at random moments of SSDTier.create (25 kills spread over its duration):
    afterwards the path holds no table (create works) or a complete empty one (open works),
    and half-built siblings are cleaned up by the next create."""
    rng = random.Random(7)
    start = time.perf_counter()
    SSDTier.create(tmp_path / "timing", {"row_width": W}, init_rows).close()
    duration = time.perf_counter() - start
    outcomes = []
    for kill in range(25):
        path = tmp_path / f"t{kill}"
        pid = os.fork()
        if pid == 0:
            try:
                SSDTier.create(path, {"row_width": W}, init_rows).close()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 1.3 * duration))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if path.exists() and any(path.iterdir()):
            tier = SSDTier.open(path, init_rows)  # complete: opens, and is empty
            ids = torch.arange(-5, 50)
            assert torch.equal(tier.read(ids), init_rows(ids))
            assert tier.meta["row_width"] == W
            outcomes.append("table")
        else:
            tier = SSDTier.create(path, {"row_width": W}, init_rows)  # no table: create works
            outcomes.append("none")
        tier.close()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".t{kill}.")]
        assert not leftovers, leftovers  # the next create removed the dead one's sibling
    assert len(outcomes) == 25


def test_an_abandoned_half_created_table_is_ignored_and_removed(tmp_path):
    building = tmp_path / ".t.tierstore-creating.99999.abcd"
    building.mkdir()
    (building / "writer.lock").write_bytes(b"")
    (building / "data.mdb").write_bytes(b"\0" * 100)
    with pytest.raises(ts.NotATableError):
        SSDTier.open(tmp_path / "t", init_rows)
    tier = SSDTier.create(tmp_path / "t", {"row_width": W}, init_rows)
    assert not building.exists()
    tier.close()


# ------------------------------------------------------------------ metadata


def _edit_meta(path, change, sealed: bool = True) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        db = env.open_db(b"meta", txn=txn)
        meta = json.loads(txn.get(b"meta", db=db)[:-4])
        change(meta)
        body = json.dumps(meta).encode()
        value = (
            body + zlib.crc32(b"meta" + body).to_bytes(4, "little") if sealed else body + b"0000"
        )
        txn.put(b"meta", value, db=db)
    env.close()


EDITS = {
    "seed_str": lambda m: m.update(seed="7"),
    "seed_huge": lambda m: m.update(seed=2**70),
    "init_scale_nan": lambda m: m.update(init_scale=float("nan")),
    "init_scale_str": lambda m: m.update(init_scale="0.1"),
    "block_rows_3": lambda m: m.update(block_rows=3),
    "block_rows_huge": lambda m: m.update(block_rows=2**40),
    "row_width_0": lambda m: m.update(row_width=0),
    "no_embedding_dim": lambda m: m.pop("embedding_dim"),
    "dim_mismatch": lambda m: m.update(embedding_dim=m["embedding_dim"] + 1),
    "optimizer_unknown": lambda m: m.update(optimizer={"name": "zzz"}),
    "optimizer_bad_lr": lambda m: m.update(optimizer={"name": "sgd", "lr": "x"}),
    "optimizer_list": lambda m: m.update(optimizer=[1]),
    "num_embeddings_neg": lambda m: m.update(num_embeddings=-5),
    "compression_str": lambda m: m.update(compression_level="3"),
    "no_format_version": lambda m: m.pop("format_version"),
    "dtype": lambda m: m.update(dtype="float16"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_metadata_is_refused_clearly(tmp_path, edit):
    """A metadata value changed and re-sealed with a valid checksum (a deliberate edit)
    is refused by type and range with a tierstore error naming the path; changed without
    resealing, it fails its checksum."""
    base = tmp_path / "base"
    emb = ts.TieredEmbeddingBag(
        100, 4, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(base, host_rows=64)
    )
    emb.flush()
    emb.close()
    for sealed in (True, False):
        path = tmp_path / f"sealed{sealed}"
        shutil.copytree(base, path)
        _edit_meta(path, EDITS[edit], sealed)
        with pytest.raises(TierstoreError) as info:
            ts.TieredEmbeddingBag.open(
                ts.SSDConfig(path, host_rows=64), cache=ts.CacheConfig(rows=8)
            )
        assert str(path) in str(info.value)
        if not sealed:
            assert isinstance(info.value, (CorruptBlockError, ts.TableMismatchError))


# ------------------------------------------------------------------ full disk


def test_eio_with_the_disk_full_is_storage_full(tmp_path, monkeypatch):
    """LMDB reports a short write on a full disk as EIO: it is StorageFullError when little
    space is left, a plain StorageError otherwise. (A full map: tests/test_ssd.py.)"""
    eio = lmdb.DiskError("mdb_txn_commit", 5) if hasattr(lmdb, "DiskError") else None
    if eio is None or getattr(eio, "code", None) != 5:
        eio = lmdb.Error("mdb_txn_commit: Input/output error")
        eio.code = 5
    monkeypatch.setattr(_StorageErrors, "_free_bytes", lambda self: 4096)
    with pytest.raises(StorageFullError, match="disk is full") as info:
        with _StorageErrors(tmp_path, "flush"):
            raise eio
    assert str(tmp_path) in str(info.value)
    monkeypatch.setattr(_StorageErrors, "_free_bytes", lambda self: 1 << 40)
    with pytest.raises(StorageError) as info:
        with _StorageErrors(tmp_path, "flush"):
            raise eio
    assert not isinstance(info.value, StorageFullError)


def test_full_map_keeps_the_last_flush_and_serves_reads(tmp_path):
    path = tmp_path / "t"
    emb = ts.TieredEmbeddingBag(
        20_000, 32, mode="sum", cache=ts.CacheConfig(rows=64),
        ssd=ts.SSDConfig(path, host_rows=20_480, compression_level=0, map_size=1 << 20),
    )  # fmt: skip
    first = torch.randn(100, 32)
    emb.write_rows(torch.arange(100), first)
    emb.flush()
    big = torch.arange(20_000)
    emb(big, torch.arange(0, 20_000, 100)).sum().backward()  # ~3 MB dirty: no room in 1 MiB
    latest = emb.read_rows(torch.arange(20_000))
    with pytest.raises(StorageFullError, match=str(path)):
        emb.flush()
    assert torch.equal(emb.read_rows(torch.arange(20_000)), latest)  # still serving, unchanged
    y = emb(torch.arange(10), torch.tensor([0, 5]))
    assert torch.allclose(y, torch.stack([latest[:5].sum(0), latest[5:10].sum(0)]))
    emb.close()
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(path, host_rows=20_480), cache=ts.CacheConfig(rows=64)
    )
    assert torch.equal(again.read_rows(torch.arange(100)), first)
    again.close()


# ------------------------------------------------------------------ read-only opens

READER = textwrap.dedent(
    """
    import torch, tierstore as ts
    emb = ts.TieredEmbeddingBag.open(
        ts.SSDConfig({path!r}, host_rows=256, read_only=True), cache=ts.CacheConfig(rows=8)
    )
    torch.save(emb.read_rows(torch.arange(200)), {out!r})
    with torch.no_grad():  # inference is allowed
        emb(torch.arange(6), torch.tensor([0, 3]))
    for name, call in [
        ("train", lambda: emb(torch.arange(6), torch.tensor([0, 3])).sum().backward()),
        ("write_rows", lambda: emb.write_rows(torch.arange(2), torch.zeros(2, 4))),
        ("flush", emb.flush),
    ]:
        try:
            call()
            print(name, "allowed")
        except ts.ReadOnlyTableError as exc:
            print(name, "refused", {path!r} in str(exc))
    print("unchanged", torch.equal(emb.read_rows(torch.arange(200)), torch.load({out!r})))
    """
)


def test_read_only_open_beside_a_writer_sees_the_last_flush(tmp_path):
    """Another process opens the table read_only while this one has it open for writing with
    unflushed changes: it reads the last flushed rows, and refuses training, write_rows and
    flush before changing anything."""
    path = tmp_path / "t"
    emb = ts.TieredEmbeddingBag(
        200, 4, cache=ts.CacheConfig(rows=16), ssd=ts.SSDConfig(path, host_rows=256)
    )
    flushed = torch.randn(200, 4)
    emb.write_rows(torch.arange(200), flushed)
    emb.flush()
    emb.write_rows(torch.arange(50), torch.zeros(50, 4))  # not flushed: invisible to readers
    emb(torch.arange(20), torch.tensor([0, 10])).sum().backward()
    out = tmp_path / "rows.pt"
    proc = _run(READER.format(path=str(path), out=str(out)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out), flushed)
    lines = proc.stdout.split("\n")
    assert lines[:4] == [
        "train refused True",
        "write_rows refused True",
        "flush refused True",
        "unchanged True",
    ]
    emb.close()
    with pytest.raises(ts.NotATableError):
        ts.TieredEmbeddingBag(
            10, 4, cache=ts.CacheConfig(rows=4),
            ssd=ts.SSDConfig(tmp_path / "e", host_rows=64, read_only=True),
        )  # fmt: skip
