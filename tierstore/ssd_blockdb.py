"""Batched reads and writes of one LMDB database of blocks (:mod:`tierstore.blocks`).

:class:`BlockDB` serves the SSD tier (:mod:`tierstore.ssd`) for its two databases, the flushed
``blocks`` and the staged rows. Everything is done per batch: block keys come from numpy, the
blocks of a batch are fetched with ``getmulti`` (a few thousand keys a call, so that decoding
starts early), and decoded on the tier's I/O threads by the compiled decoder
(:mod:`tierstore.blocks_compiled`, off the GIL) straight into the caller's rows, or by the
codec's numpy path where that decoder is not available. A block is fetched and decoded once
per batch however many of its rows the batch asks for.

Reads refuse damage (:class:`CorruptBlockError` naming the path and block): every block is
checked before any of its rows is written out, and a block that LMDB does not find in the
flushed database is checked against the B-tree entries around it (:meth:`check_absent`).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import itertools
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np
import torch

from tierstore.blocks import BadBlock, BlockCodec, DecodedBlocks, check
from tierstore.blocks_compiled import AVAILABLE as DECODER_COMPILED
from tierstore.blocks_compiled import decode_into
from tierstore.errors import CorruptBlockError, InvalidInputError
from tierstore.ssd_readers import ReaderPool, StaleSnapshot

# py-lmdb's getmulti releases and retakes the GIL around every key: two threads running it
# at once ping-pong the GIL and take twice as long as one after the other (measured).
_GETMULTI_LOCK = threading.Lock()
# Keys per getmulti call of a read: the blocks of one call are decoded on the I/O threads
# while the next call runs (the last call's on the reading thread).
_READ_CHUNK_BLOCKS = 4096
# Fewest blocks a read must have to go to the reader processes (and to start them).
_PROCESS_MIN_BLOCKS = 2048
# Rows per chunk when listing or merging a whole database's blocks (bounds memory).
_LIST_CHUNK_ROWS = 1 << 16


def getmulti(cursor: lmdb.Cursor, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``cursor.getmulti(keys)``, one thread of the process at a time."""
    with _GETMULTI_LOCK:
        return cursor.getmulti(keys)


def as_ids(ids: torch.Tensor, what: str = "ids") -> np.ndarray:
    """Validates a 1-D sorted unique integer id tensor; returns its int64 numpy array."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise InvalidInputError(f"{what} must be a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"{what} must be int64 or int32, got {ids.dtype}")
    arr = ids.detach().cpu().to(torch.int64).numpy()
    if len(arr) > 1 and not (arr[1:] > arr[:-1]).all():
        raise InvalidInputError(f"{what} must be sorted ascending and unique")
    return arr


def as_rows(rows: torch.Tensor, n: int, width: int) -> np.ndarray:
    """Validates a (n, width) float32 row tensor; returns a C-contiguous numpy array."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.float32:
        raise InvalidInputError(
            f"rows must be a float32 tensor, got {getattr(rows, 'dtype', rows)}"
        )
    if tuple(rows.shape) != (n, width):
        raise InvalidInputError(f"rows must have shape ({n}, {width}), got {tuple(rows.shape)}")
    return np.ascontiguousarray(rows.detach().cpu().numpy())


@dataclasses.dataclass
class _Read:
    """One read's arrays, shared by the threads that decode its blocks (n ids, m blocks)."""

    first: np.ndarray  # (m,) int64: each block's first id, an index into offset and dest
    count: np.ndarray  # (m,) int64: each block's ids
    offset: np.ndarray  # (n,) int64: each id's offset in its block
    dest: np.ndarray  # (n,) int64: each id's row in out
    out: np.ndarray  # (rows, 4 * row_width) uint8: the caller's rows
    hit: np.ndarray  # (n,) uint8: 1 where the id's row was found
    keys: np.ndarray  # (8 * m,) uint8: the blocks' keys


def _raise_first(errors: list[BaseException | None]) -> None:
    """Raises the error of the lowest block among several threads' errors, if any."""
    bad = [e for e in errors if e is not None]
    if bad:
        raise min(bad, key=lambda e: getattr(e, "block", -1))


class BlockDB:
    """Batched access to the blocks of one table (both of its LMDB databases).

    Args:
        path: the table's directory, named in errors.
        codec: the table's block format.
        io_threads: threads that decode a read's blocks (the caller fetches them meanwhile).
        count: adds to the tier's statistics (``count(blocks_read=n, ...)``).
        readers: reader processes that look keys of large reads of the flushed database up
            (:mod:`tierstore.ssd_readers`), or None: all lookups in this process.
    """

    def __init__(
        self, path: pathlib.Path, codec: BlockCodec, io_threads: int, count: Callable[..., None],
        readers: ReaderPool | None = None,
    ) -> None:  # fmt: skip
        self.path, self.codec, self._count = path, codec, count
        self.readers = readers
        self.row_width, self.block_rows = codec.row_width, codec.block_rows
        # Whether reads decode with the compiled decoder (tests switch it off to compare).
        self.compiled = DECODER_COMPILED
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, io_threads), thread_name_prefix="tierstore-ssd-decode"
        )

    def close(self) -> None:
        """Waits for decodes in flight and stops the decoding threads and reader processes."""
        self._pool.shutdown(wait=True)
        if self.readers is not None:
            self.readers.close()

    # ----------------------------------------------------------------------------- reading

    def read_into(
        self, txn: lmdb.Transaction, db: Any, u: np.ndarray, out: np.ndarray, where: np.ndarray,
        flushed: bool,
    ) -> np.ndarray:  # fmt: skip
        """Reads the stored rows of sorted unique unsigned ids ``u`` (n,) from ``db``: the row
        of ``u[i]``, if stored, goes to ``out[where[i]]`` (out: (rows, row_width) float32).
        Returns the (n,) bool mask of the ids found. ``flushed``: ``db`` is the flushed
        database, whose absent blocks are checked (:meth:`check_absent`)."""
        codec = self.codec
        first, blocks = codec.blocks(u)
        cursor = txn.cursor(db)
        # Per requested id: its offset in its block, its output row; per block: its ids.
        read = _Read(
            first=first.astype(np.int64), count=np.diff(np.append(first, len(u))),
            offset=(u & np.uint64(self.block_rows - 1)).astype(np.int64),
            dest=np.ascontiguousarray(where, dtype=np.int64),
            out=out.view(np.uint8).reshape(len(out), 4 * self.row_width),
            hit=np.zeros(len(u), np.uint8), keys=blocks.astype(">u8").view(np.uint8),
        )  # fmt: skip
        found = np.zeros(len(blocks), bool)
        # Blocks looked up (found or not) and decoded by the reader processes.
        done = np.zeros(len(blocks), bool)
        if flushed and self.compiled and self.readers is not None:
            self._read_by_processes(txn.id(), blocks, read, found, done)
        todo = np.flatnonzero(~done)
        pending: list[concurrent.futures.Future] = []
        try:
            for start in range(0, len(todo), _READ_CHUNK_BLOCKS):
                span = todo[start : start + _READ_CHUNK_BLOCKS]
                pairs = getmulti(cursor, codec.keys(blocks[span]))
                if not pairs:
                    continue
                if len(pairs) < len(span):
                    keys = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8")
                    span = span[np.searchsorted(blocks[span], keys.astype(np.uint64))]
                found[span] = True
                values = [v for _, v in pairs]
                size = np.fromiter(map(len, values), np.int64, len(values))
                self._count(blocks_read=len(values), bytes_read=int(size.sum()))
                if not self.compiled:
                    self._decode_with_codec(read, span, values, blocks)
                    continue
                data = np.frombuffer(b"".join(values), np.uint8)
                job = (read, span, data, np.cumsum(size) - size, size, blocks)
                if start + _READ_CHUNK_BLOCKS >= len(todo):
                    # the last chunk: nothing left to fetch meanwhile, so this thread decodes it
                    # (a hand-off to the pool and back cost a small read more than its decode)
                    self._decode_span(*job)
                else:
                    pending.append(self._pool.submit(self._decode_span, *job))
        finally:
            _raise_first([f.exception() for f in pending])
        if flushed and not found.all():
            self.check_absent(cursor, codec.keys(blocks[~found]))
        return read.hit.view(bool)

    def _read_by_processes(
        self, txn_id: int, blocks: np.ndarray, read: _Read, found: np.ndarray, done: np.ndarray
    ) -> None:
        """Has the reader processes look the blocks up, a slice each, in the snapshot
        ``txn_id``, and decodes their answers on the I/O threads (and this one) as they come;
        sets ``found`` and ``done``. Slices not answered (a stale snapshot, a failed worker)
        are left not ``done``, for this process to look up. A read too small, or a pool not
        started or not yet ready, does nothing (a large read starts the pool)."""
        pool = self.readers
        if pool is None or len(blocks) < _PROCESS_MIN_BLOCKS or pool.closed:
            return
        if not pool.ready():
            pool.start()
            return
        chunk = _READ_CHUNK_BLOCKS
        step = -(-len(blocks) // pool.processes)
        keys = blocks.astype(">u8")
        sent = []
        for worker, a in enumerate(range(0, len(blocks), step)):
            b = min(a + step, len(blocks))
            try:
                pool.send(worker, txn_id, keys[a:b], chunk)
            except Exception:  # a dead worker: this process reads the rest
                pool.broken = True
                break
            sent.append((worker, a, b))

        def exchange(worker: int, a: int, b: int) -> list[BaseException]:
            errors: list[BaseException] = []
            in_step = False  # whether the worker's answers were all read (or it said stale)
            try:
                for start, where, size, data in pool.answers(worker, b - a, chunk):
                    span = a + where
                    if errors:
                        continue  # a bad block already: read the rest, keep the pipe in step
                    try:
                        self._decode_span(read, span, data, np.cumsum(size) - size, size, blocks)
                    except CorruptBlockError as exc:
                        errors.append(exc)
                        continue
                    found[span] = True
                    done[a + start : min(a + start + chunk, b)] = True
                    self._count(blocks_read=len(span), bytes_read=int(size.sum()))
                in_step = True
            except StaleSnapshot:
                in_step = True
            except Exception:  # a failed worker or pipe: this process reads the rest
                pass
            finally:
                pool.broken |= not in_step
                pool.release(worker)
            return errors

        futures = [self._pool.submit(exchange, *job) for job in sent[1:]]
        errors = exchange(*sent[0]) if sent else []
        for future in futures:
            errors += future.result()
        if pool.broken:
            pool.close()
        _raise_first(errors)

    def _decode_span(
        self, read: _Read, span: np.ndarray, data: np.ndarray, base: np.ndarray,
        size: np.ndarray, blocks: np.ndarray,
    ) -> None:  # fmt: skip
        """Blocks ``span`` of a read (indices into its blocks), stored at ``data[base[i]:
        base[i] + size[i]]``, checked and decoded into the read's rows (on an I/O thread)."""
        if len(span) == 0:
            return
        keys = read.keys.reshape(-1, 8)[span].reshape(-1)
        try:
            decode_into(
                data, base, size, keys, read.first[span], read.count[span], read.offset,
                read.dest, read.out, read.hit, (0, len(span)), self.row_width,
                self.block_rows, self.codec.level,
            )  # fmt: skip
        except BadBlock as bad:
            raise self._corrupt(int(blocks[span[bad.index]]), bad.problem) from None

    def _decode_with_codec(
        self, read: _Read, span: np.ndarray, values: list[bytes], blocks: np.ndarray
    ) -> None:
        """:meth:`_decode_span` by the codec's numpy path (where nothing is compiled)."""
        decoded = self.decode(values, blocks[span])
        count = read.count[span]
        block_of = np.repeat(np.arange(len(span)), count)
        ids = np.repeat(read.first[span] - (np.cumsum(count) - count), count) + np.arange(
            int(count.sum())
        )  # the read's index of every id of these blocks
        want = block_of * self.block_rows + read.offset[ids]
        entry = np.minimum(np.searchsorted(decoded.key, want), len(decoded.key) - 1)
        hit = decoded.key[entry] == want
        rows = decoded.rows(entry[hit])
        read.out[read.dest[ids[hit]]] = rows.view(np.uint8).reshape(len(rows), 4 * self.row_width)
        read.hit[ids[hit]] = 1

    def check_absent(self, cursor: lmdb.Cursor, keys: list[bytes]) -> None:
        """Makes sure that blocks whose keys (sorted) LMDB did not find are truly absent, and
        not stored under a damaged key: each gap between stored keys that a missing key
        falls in has its two bounding entries checked against their own keys (a damaged key,
        node header or node pointer fails that check). One cursor seek per gap, not per key.
        """
        # Entries already checked (a bound shared with the gap before), by key and value: a
        # damaged key may equal another entry's, so a key alone does not name an entry.
        checked: set[tuple[bytes, bytes]] = set()
        with _GETMULTI_LOCK:
            i = 0
            while i < len(keys):
                if cursor.set_range(keys[i]):
                    upper = cursor.key()
                    bounds = [cursor.item()]
                    if upper <= keys[i]:  # an exact match that getmulti missed: disorder
                        self._refuse_absent(keys[i], "the B-tree is out of order")
                    if cursor.prev():
                        bounds.append(cursor.item())
                else:
                    upper = None
                    bounds = [cursor.item()] if cursor.last() else []
                for entry in bounds:
                    if entry in checked:
                        continue
                    try:
                        check([entry[1]], [entry[0]])
                    except BadBlock as bad:
                        self._refuse_absent(entry[0], bad.problem)
                    checked.add(entry)
                if upper is None:
                    return
                i = bisect.bisect_left(keys, upper, i + 1)

    def _refuse_absent(self, key: bytes, problem: str) -> None:
        if len(key) == 8:
            block = int.from_bytes(key, "big")
            where = f"block key {block:#x} (rows from id {self.codec.first_id(block)})"
        else:
            where = f"a {len(key)}-byte block key {key[:16].hex()}"
        raise CorruptBlockError(f"{self.path}: corrupt block near {where}: {problem}")

    def _corrupt(self, block: int, problem: str) -> CorruptBlockError:
        error = CorruptBlockError(
            f"{self.path}: corrupt block starting at id {self.codec.first_id(block)} (block "
            f"key {block:#x}): {problem}"
        )
        error.block = block  # the lowest of several bad blocks is reported
        return error

    def decode(self, values: list[bytes], blocks: np.ndarray) -> DecodedBlocks:
        """Checks and decodes values stored under the keys of ``blocks`` (the codec's path)."""
        try:
            return self.codec.decode(values, self.codec.keys(blocks))
        except BadBlock as bad:
            raise self._corrupt(int(blocks[bad.index]), bad.problem) from None

    def stored_ids(self, cursor: lmdb.Cursor) -> list[np.ndarray]:
        """The unsigned ids of every row in a database's blocks, a chunk of blocks at a time."""
        out, chunk = [], max(1, _LIST_CHUNK_ROWS // self.block_rows)
        keys = cursor.iternext(keys=True, values=self.block_rows > 1)
        while batch := list(itertools.islice(keys, chunk)):
            if self.block_rows == 1:  # a block is one row: its key is the id
                out.append(np.frombuffer(b"".join(batch), ">u8").astype(np.uint64))
                continue
            blocks = np.frombuffer(b"".join([k for k, _ in batch]), ">u8").astype(np.uint64)
            decoded = self.decode([v for _, v in batch], blocks)
            out.append(
                (blocks[decoded.block] << self.codec.shift) | decoded.offset.astype(np.uint64)
            )
        return out

    # ----------------------------------------------------------------------------- writing

    def merge(
        self, txn: lmdb.Transaction, db: Any, u: np.ndarray, rows: np.ndarray, flushed: bool
    ) -> None:
        """Read-modify-write of every block that rows of sorted unique unsigned ids ``u``
        touch, in one batch: existing rows of those blocks are kept unless overwritten."""
        if len(u) == 0:
            return
        codec = self.codec
        first, blocks = codec.blocks(u)
        cursor = txn.cursor(db)
        # Blocks whose every row is rewritten need not be read (with block_rows=1: none).
        partial = np.diff(np.append(first, len(u))) < self.block_rows
        pairs = getmulti(cursor, codec.keys(blocks[partial])) if partial.any() else []
        if len(pairs) < int(partial.sum()) and flushed:
            have = {k for k, _ in pairs}
            self.check_absent(cursor, [k for k in codec.keys(blocks[partial]) if k not in have])
        if pairs:
            old_blocks = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8").astype(np.uint64)
            decoded = self.decode([v for _, v in pairs], old_blocks)
            old_u = (old_blocks[decoded.block] << codec.shift) | decoded.offset.astype(np.uint64)
            pos = np.minimum(np.searchsorted(u, old_u), len(u) - 1)
            keep = np.flatnonzero(u[pos] != old_u)
            if len(keep):
                u = np.concatenate((u, old_u[keep]))
                order = np.argsort(u, kind="stable")
                u = u[order]
                rows = np.concatenate((rows, decoded.rows(keep)))[order]
        keys, values, nbytes = codec.encode(u, rows)
        # Past the last key (a bulk load in id order), LMDB's append mode fills pages full
        # instead of splitting them in half.
        append = not pairs and (not cursor.last() or cursor.key() < keys[0])
        cursor.putmulti(list(zip(keys, values)), append=append)
        self._count(blocks_written=len(keys), bytes_written=nbytes)

    def merge_all(
        self, txn: lmdb.Transaction, db: Any, source: lmdb.Cursor,
        decode: Callable[[list[bytes], np.ndarray], DecodedBlocks],
    ) -> None:  # fmt: skip
        """Merges every block of another database (read through the cursor ``source``, whose
        blocks ``decode`` decodes: its :class:`BlockDB`'s) into ``db``, a bounded chunk of
        blocks at a time."""
        chunk, items = max(1, _LIST_CHUNK_ROWS // self.block_rows), iter(source)
        # One iterator: a new one on the cursor would start again at its current entry.
        while pairs := list(itertools.islice(items, chunk)):
            blocks = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8").astype(np.uint64)
            decoded = decode([v for _, v in pairs], blocks)
            u = (blocks[decoded.block] << self.codec.shift) | decoded.offset.astype(np.uint64)
            self.merge(txn, db, u, decoded.rows(np.arange(len(u))), flushed=True)
