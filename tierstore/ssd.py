"""L3, the SSD tier: every row ever written, in one LMDB environment (a directory).

Layout of the directory::

    data.mdb, lock.mdb   the table: named databases ``meta`` (JSON metadata, flush counter)
                         and ``blocks`` (one entry per block of consecutive ids)
    staged/              a scratch LMDB environment for rows written between flushes, stored
                         raw (no zstd); never synced, wiped on every open for writing
    writer.lock          flock'ed by the one process that has the table open for writing

Rows are grouped into blocks of ``block_rows`` consecutive ids. The key of a block is the
8-byte big-endian ``(id XOR 2**63) >> log2(block_rows)``: flipping the sign bit maps signed
ids onto unsigned ones in the same order, so LMDB's byte order is the ids' order. The
block format (byte planes, zstd on the sign/exponent plane only, and why) is
:mod:`tierstore.blocks`.

Every batch is handled in bulk (:mod:`tierstore.ssd_blockdb`): block keys are computed with
numpy; blocks are fetched with ``getmulti`` a few thousand keys a call, and checked and
decoded by a compiled decoder (:mod:`tierstore.blocks_compiled`) off the GIL on the I/O
threads, or by the codec's numpy and multi-frame zstd calls where nothing is compiled. No
Python code runs per row or per block.

This module is the table's API; its helpers: :mod:`~tierstore.ssd_files` (directory, locks,
file checks, errors), :mod:`~tierstore.ssd_meta` (metadata), :mod:`~tierstore.ssd_blockdb`
(batched block I/O), :mod:`~tierstore.ssd_readers` (reader processes),
:mod:`~tierstore.ssd_flush`, :mod:`~tierstore.blocks` and :mod:`~tierstore.blocks_compiled`.

Durability: ``write()`` goes to the staged environment, which ``read()`` consults first; a
flush merges staged rows and the dirty rows into ``blocks`` in one LMDB write transaction
that LMDB fsyncs on commit. A process killed at any moment leaves the table exactly as of
the last completed flush: the staged environment is discarded on the next open. A table is
created in a sibling directory (``.NAME.tierstore-creating.PID.RANDOM``) and renamed into
place once its metadata is durable, so a kill during creation leaves no table or an empty one.

Damage (format version 2): every block value and both metadata values end with a CRC-32 of
their key and bytes (:mod:`tierstore.blocks`), checked on every read; a block that LMDB does
not find is checked against the B-tree entries around it (a damaged key or node hides it
there); ``data.mdb`` shorter than its LMDB meta pages say is refused before it is mapped
(reading past the end of a mapped file is SIGBUS). All raise :class:`CorruptBlockError`
naming the path. Not detected: a rollback through the meta pages' transaction ids.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import secrets
import shutil
import threading
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np
import torch

from tierstore.blocks import SIGN, BlockCodec
from tierstore.errors import (
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    ReadOnlyTableError,
    StorageError,
    TableMismatchError,
)
from tierstore.ssd_blockdb import BlockDB, as_ids, as_rows
from tierstore.ssd_files import (
    CREATING,
    StorageErrors,
    allocated_bytes,
    fsync_dir,
    lmdb_size_check,
    open_lmdb,
    open_staged,
    open_table,
    register_open,
    remove_abandoned_creations,
    take_writer_lock,
    unregister_open,
)
from tierstore.ssd_flush import FlushWriter
from tierstore.ssd_meta import FLUSH_KEY, META_KEY, check_meta, refuse_unsealed, seal_value, unseal
from tierstore.ssd_readers import ReaderPool, check_processes

__all__ = ["FlushWriter", "InitRows", "SSDTier"]

InitRows = Callable[[torch.Tensor], torch.Tensor]


class SSDTier:
    """L3: every row ever written, in one LMDB environment, as zstd-compressed blocks of
    consecutive ids.

    Thread safety: :meth:`read` and :meth:`read_async` may run from any threads at once
    (py-lmdb lookups take turns: ``tierstore.ssd_blockdb.getmulti``); :meth:`write` and flushes are
    serialised (a :meth:`write` waits for a flush open on another thread, and is refused on the
    thread that holds one). :meth:`close` waits for pending :meth:`read_async` calls; commit or
    abort an open flush first. One process may open a table once (LMDB's rule); other
    processes may open it ``readonly`` while one writes.
    ``io_threads`` decode blocks; ``io_processes`` reader processes (default 0) look up the
    keys of large reads of flushed rows (:mod:`tierstore.ssd_readers`).
    """

    # 2: every block and metadata value carries a CRC-32 (``tierstore.blocks``). Tables of
    # version 1 (no checksums) are refused with a message saying so.
    FORMAT_VERSION: int = 2

    meta: dict
    row_width: int
    path: pathlib.Path
    stats: dict

    def __init__(self) -> None:
        raise TypeError("use SSDTier.create() or SSDTier.open()")

    # ----------------------------------------------------------------- creating and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        meta: dict,
        init_rows: InitRows,
        *,
        block_rows: int = 1,
        compression_level: int = 3,
        map_size: int = 1 << 40,
        io_threads: int = 4,
        io_processes: int = 0,
    ) -> SSDTier:
        """Creates an empty table at ``path`` (a new or empty directory) and opens it for writing.

        ``meta`` must be JSON-serialisable and hold ``row_width``; ``format_version``,
        ``block_rows`` and ``compression_level`` (0 = stored raw) are added. Nothing is
        written per row, so the size of the id space costs nothing.

        Atomic: the table is built in a sibling directory and renamed into place once its
        metadata is durable, so a process killed at any moment leaves either no table at
        ``path`` or a complete, empty one. Half-built siblings of dead processes are removed.
        """
        path = pathlib.Path(path)
        row_width = meta.get("row_width") if isinstance(meta, dict) else None
        if not isinstance(row_width, int) or row_width <= 0:
            raise InvalidInputError(f"{path}: meta must hold a positive int 'row_width'")
        if not (1 <= block_rows <= 1 << 16) or block_rows & (block_rows - 1):
            raise InvalidInputError(f"{path}: block_rows must be a power of two in [1, 65536]")
        if not -7 <= compression_level <= 22:
            raise InvalidInputError(f"{path}: compression_level must be in [-7, 22] (0 = none)")
        meta = dict(meta)
        meta.update(
            format_version=cls.FORMAT_VERSION,
            block_rows=block_rows,
            compression_level=compression_level,
        )
        try:
            meta_json = json.dumps(meta, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{path}: meta is not JSON-serialisable ({exc})") from exc
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StorageError(f"{path}: already exists and is not an empty directory")
        remove_abandoned_creations(path)
        name = CREATING.format(name=path.name) + f"{os.getpid()}.{secrets.token_hex(4)}"
        building = path.parent / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            building.mkdir()
        except OSError as exc:
            raise StorageError(f"{path}: cannot create the table directory ({exc})") from exc
        check_processes(path, io_processes)
        self = cls._new(path, readonly=False)
        try:
            self._lock_for_writing(building)  # held across the rename: the lock file moves too
            env = lmdb.open(
                str(building), map_size=map_size, max_dbs=4, readahead=False, meminit=False
            )
            try:
                with self._storage_errors("create"), env.begin(write=True) as txn:
                    meta_db = env.open_db(b"meta", txn=txn)
                    env.open_db(b"blocks", txn=txn)
                    txn.put(META_KEY, seal_value(META_KEY, meta_json), db=meta_db)
                    txn.put(FLUSH_KEY, seal_value(FLUSH_KEY, b"0"), db=meta_db)
            finally:
                env.close()
            fsync_dir(building)  # the new files' directory entries, before they appear
            try:
                # Replaces an empty directory; fails if another process created one first.
                os.rename(building, path)
            except OSError as exc:
                raise StorageError(
                    f"{path}: already exists and is not an empty directory ({exc})"
                ) from exc
            building = None
            fsync_dir(path.parent)
            self._env = self._open_env(map_size, readonly=False, create=False)
            meta = self._load_meta()
            self._finish_open(meta, init_rows, map_size, io_threads, io_processes)
        except BaseException:
            self._release()
            if building is not None:
                shutil.rmtree(building, ignore_errors=True)
            raise
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        init_rows: InitRows,
        *,
        expect: dict | None = None,
        readonly: bool = False,
        map_size: int | None = None,
        io_threads: int = 4,
        io_processes: int = 0,
    ) -> SSDTier:
        """Opens an existing table. Every key of ``expect`` must equal the stored metadata's
        (TableMismatchError otherwise). Opening for writing takes the table's writer lock and
        discards rows staged by a previous process that did not flush them."""
        path = pathlib.Path(path)
        if not path.exists():
            raise NotATableError(f"{path}: no such table (the path does not exist)")
        if not path.is_dir() or not (path / "data.mdb").is_file():
            raise NotATableError(f"{path}: not a tierstore table (no LMDB data.mdb)")
        if not readonly and not os.access(path, os.W_OK):
            raise StorageError(f"{path}: directory is read-only; open it with readonly=True")
        map_size = map_size or 1 << 40
        check_processes(path, io_processes)
        self = cls._new(path, readonly)
        try:
            if not readonly:
                self._lock_for_writing()
            lmdb_size_check(path)
            self._env = self._open_env(map_size, readonly, create=False)
            meta = self._load_meta()
            # Compare as JSON would store them (a tuple is stored as a list).
            expect = json.loads(json.dumps(expect or {}))
            wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in expect.items()
                     if meta.get(k) != v]  # fmt: skip
            if wrong:
                raise TableMismatchError(f"{path}: table was made with " + ", ".join(wrong))
            self._finish_open(meta, init_rows, map_size, io_threads, io_processes)
        except BaseException:
            self._release()
            raise
        return self

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The stored metadata of the table at ``path`` (to reopen a table by path alone)."""
        path = pathlib.Path(path)
        table = open_table(str(path.resolve()))
        if table is not None:
            return dict(table.meta)
        if not path.exists():
            raise NotATableError(f"{path}: no such table (the path does not exist)")
        if not path.is_dir() or not (path / "data.mdb").is_file():
            raise NotATableError(f"{path}: not a tierstore table (no LMDB data.mdb)")
        self = SSDTier._new(path, readonly=True)
        try:
            lmdb_size_check(path)
            self._env = self._open_env(1 << 40, readonly=True, create=False)
            return self._load_meta()
        finally:
            self._release()

    @classmethod
    def _new(cls, path: pathlib.Path, readonly: bool) -> SSDTier:
        self = object.__new__(cls)
        self.path = path
        self.readonly = readonly
        self._key = str(path.resolve())
        self._registered = False
        self._lock_fd: int | None = None
        self._env: lmdb.Environment | None = None
        self._staged_env: lmdb.Environment | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer: FlushWriter | None = None
        self._write_mutex = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = dict.fromkeys(
            ("rows_read", "rows_written", "bytes_read", "bytes_written", "blocks_read",
             "blocks_written"),
            0,
        )  # fmt: skip
        return self

    def _lock_for_writing(self, directory: pathlib.Path | None = None) -> None:
        """Registers the table in this process and takes its writer lock (non-blocking), in
        ``directory`` (default: the table's)."""
        register_open(self._key, self, self.path)
        self._registered = True
        self._lock_fd = take_writer_lock(self.path, directory or self.path)

    def _open_env(self, map_size: int, readonly: bool, create: bool) -> lmdb.Environment:
        if readonly:
            register_open(self._key, self, self.path)
            self._registered = True
        return open_lmdb(self.path, map_size, readonly, create)

    def _load_meta(self) -> dict:
        """Reads and checks the metadata; opens the named databases."""
        try:
            self._meta_db = self._env.open_db(b"meta", create=False)
            self._blocks = self._env.open_db(b"blocks", create=False)
            with self._env.begin(db=self._meta_db) as txn:
                raw = txn.get(META_KEY)
                flushes = txn.get(FLUSH_KEY)
        except lmdb.Error as exc:
            raise NotATableError(
                f"{self.path}: LMDB environment without tierstore metadata"
            ) from exc
        if raw is None:
            raise NotATableError(f"{self.path}: LMDB environment without tierstore metadata")
        try:
            body = unseal(self.path, META_KEY, raw)
        except CorruptBlockError:
            refuse_unsealed(self.path, raw, self.FORMAT_VERSION)
            raise
        try:
            meta = json.loads(body)
        except ValueError as exc:
            raise CorruptBlockError(f"{self.path}: stored metadata is not JSON ({exc})") from exc
        count = unseal(self.path, FLUSH_KEY, flushes)
        self._flush_count = check_meta(self.path, meta, count, self.FORMAT_VERSION)
        return meta

    def _finish_open(self, meta: dict, init_rows: InitRows, map_size: int, threads, processes):
        self.meta = meta
        self.row_width = int(meta["row_width"])
        self.block_rows = int(meta["block_rows"])
        self.compression_level = int(meta["compression_level"])
        self._init_rows = init_rows
        codec = BlockCodec(self.row_width, self.block_rows, self.compression_level, threads)
        readers = ReaderPool(str(self.path), map_size, processes) if processes > 0 else None
        self._db = BlockDB(self.path, codec, threads, self._count, readers)
        # Staged rows are re-encoded when a flush merges them: stored raw (zstd level 0), the
        # training thread's writes of evicted rows compress nothing
        raw = BlockCodec(self.row_width, self.block_rows, 0, threads)
        self._staged_db = BlockDB(self.path, raw, threads, self._count)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="tierstore-ssd"
        )
        if not self.readonly:
            self._reset_staged(map_size)

    def _reset_staged(self, map_size: int) -> None:
        """A fresh, empty staged environment: rows staged by a dead process are discarded."""
        self._staged_env, self._staged_rows, self._staged_info = open_staged(self.path, map_size)
        self._clear_staged()

    def close(self) -> None:
        """Waits for pending reads, rolls back an open flush and closes the table (rows
        written since the last flush are dropped). Releases the writer lock. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._db.close()
            self._staged_db.close()
        writer = self._writer
        if writer is not None and writer.on_this_thread():
            writer.abort()
        self._release()

    def _release(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None and db.readers is not None:
            db.readers.close()  # also for a table dropped without close()
        for env in (self._staged_env, self._env):
            if env is not None:
                env.close()
        self._staged_env = self._env = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._registered:
            unregister_open(self._key, self)
            self._registered = False

    def __enter__(self) -> SSDTier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A table dropped without close() must not keep its writer lock until process exit.
        try:
            self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writable"
        state = mode if self._env is not None else "closed"
        return f"SSDTier({str(self.path)!r}, row_width={getattr(self, 'row_width', '?')}, {state})"

    # ----------------------------------------------------------------------------- reading

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (1-D, sorted ascending, unique, any int64), as a (len(ids),
        row_width) float32 tensor: staged rows first, then flushed rows, then ``init_rows``."""
        self._check_usable()
        ids_np = as_ids(ids)
        u = ids_np.view(np.uint64) ^ SIGN
        out = np.empty((len(u), self.row_width), np.float32)
        todo = np.arange(len(u))
        with self._storage_errors("read"):
            # Staged before main: a flush committing in between makes main newer, not older.
            staged_txn = self._staged_env.begin() if self._staged_env is not None else None
            main_txn = self._env.begin()
            try:
                sources = []
                if staged_txn is not None:
                    base = int(staged_txn.get(FLUSH_KEY, db=self._staged_info))
                    # A flush committed after our staged snapshot has merged all of it.
                    stored = main_txn.get(FLUSH_KEY, db=self._meta_db)
                    current = base == int(unseal(self.path, FLUSH_KEY, stored))
                    if current and staged_txn.stat(self._staged_rows)["entries"]:
                        sources.append((staged_txn, self._staged_rows, False))
                sources.append((main_txn, self._blocks, True))
                for txn, db, flushed in sources:
                    if len(todo) == 0:
                        break
                    blocks = self._db if flushed else self._staged_db
                    found = blocks.read_into(txn, db, u[todo], out, todo, flushed)
                    todo = todo[~found]
            finally:
                main_txn.abort()
                if staged_txn is not None:
                    staged_txn.abort()
        if len(todo):
            out[todo] = self._initial(ids_np[todo])
        self._count(rows_read=len(u))
        return torch.from_numpy(out)

    def read_async(self, ids: torch.Tensor) -> concurrent.futures.Future:
        """:meth:`read` on the tier's background I/O thread pool."""
        self._check_usable()
        return self._executor.submit(self.read, ids)

    def stored_ids(self, flushed: bool = True, staged: bool = True) -> torch.Tensor:
        """Ids of the rows stored (flushed, and staged since the last flush), ascending, int64
        (8 bytes of memory per row; blocks are decoded a chunk at a time when they hold
        several rows). For checkpoints, which list the rows a table ever wrote."""
        self._check_usable()
        parts = [np.empty(0, np.uint64)]
        with self._storage_errors("list rows"):
            # Staged before main, as in read: a flush committing in between must find its rows
            # in main's snapshot (begun later), not lost from both
            staged_txn = self._staged_env.begin() if self._staged_env is not None else None
            main_txn = self._env.begin()
            try:
                sources = [(main_txn, self._blocks, self._db)] if flushed else []
                if staged and staged_txn is not None:
                    base = int(staged_txn.get(FLUSH_KEY, db=self._staged_info))
                    stored = main_txn.get(FLUSH_KEY, db=self._meta_db)
                    if base == int(unseal(self.path, FLUSH_KEY, stored)):  # not merged
                        sources.append((staged_txn, self._staged_rows, self._staged_db))
                for txn, db, blocks in sources:
                    parts += blocks.stored_ids(txn.cursor(db))
            finally:
                main_txn.abort()
                if staged_txn is not None:
                    staged_txn.abort()
        u = np.unique(np.concatenate(parts))
        return torch.from_numpy((u ^ SIGN).view(np.int64))

    def _initial(self, ids: np.ndarray) -> np.ndarray:
        rows = self._init_rows(torch.from_numpy(ids))
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (len(ids), self.row_width):
            raise InvalidInputError(
                f"{self.path}: init_rows returned {getattr(rows, 'shape', type(rows))}, "
                f"expected ({len(ids)}, {self.row_width})"
            )
        return rows.detach().cpu().to(torch.float32).numpy()

    # ----------------------------------------------------------------------------- writing

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Stages rows (ids sorted ascending, unique): :meth:`read` returns them at once, the
        next flush makes them durable, a crash before it loses them."""
        self._check_writable()
        writer = self._writer
        if writer is not None and writer.on_this_thread():
            raise RuntimeError(f"{self.path}: write() while this thread has a flush open")
        u, rows_np = self._prepare(ids, rows)
        with self._write_mutex, self._storage_errors("write"):
            with self._staged_env.begin(write=True) as txn:
                if int(txn.get(FLUSH_KEY, db=self._staged_info)) != self._flush_count:
                    # A flush merged these staged rows but failed to clear them: do it now.
                    self._clear_staged(txn)
                self._staged_db.merge(txn, self._staged_rows, u, rows_np, flushed=False)
        self._count(rows_written=len(u))

    def flush_begin(self) -> FlushWriter:
        """Starts a flush (one LMDB write transaction, staged rows merged into it first).
        Send the dirty rows in chunks with ``writer.write``, then ``writer.commit()``."""
        self._check_writable()
        if self._writer is not None and self._writer.on_this_thread():
            raise RuntimeError(f"{self.path}: a flush is already open on this thread")
        self._write_mutex.acquire()
        try:
            with self._storage_errors("flush"):
                txn = self._env.begin(write=True)
        except BaseException:
            self._write_mutex.release()
            raise
        writer = self._writer = FlushWriter(self.path, txn, self._flush_merge, self._flush_end)
        try:
            with self._storage_errors("flush"):
                self._merge_staged(txn)
        except BaseException:
            writer.abort()
            raise
        return writer

    def flush(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """A whole flush in one call: staged rows plus these rows, committed durably."""
        with self.flush_begin() as writer:
            writer.write(ids, rows)

    def _prepare(self, ids: torch.Tensor, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        ids_np = as_ids(ids)
        rows_np = as_rows(rows, len(ids_np), self.row_width)
        return ids_np.view(np.uint64) ^ SIGN, rows_np

    def _flush_merge(self, txn: lmdb.Transaction, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """A flush's chunk of dirty rows, merged into its transaction (FlushWriter.write)."""
        u, rows_np = self._prepare(ids, rows)
        with self._storage_errors("flush"):
            self._db.merge(txn, self._blocks, u, rows_np, flushed=True)
        self._count(rows_written=len(u))

    def _flush_end(self, txn: lmdb.Transaction, commit: bool) -> None:
        """Commits (durably, with the next flush count) or aborts a flush's transaction."""
        try:
            if commit:
                count = self._flush_count + 1
                with self._storage_errors("flush"):
                    try:
                        txn.put(FLUSH_KEY, seal_value(FLUSH_KEY, str(count).encode()),
                                db=self._meta_db)  # fmt: skip
                        txn.commit()
                    except BaseException:
                        txn.abort()
                        raise
                self._flush_count = count
                self._clear_staged()
            else:
                txn.abort()
        finally:
            self._writer = None
            self._write_mutex.release()

    def _merge_staged(self, txn: lmdb.Transaction) -> None:
        """Copies the staged rows into a flush transaction, a bounded chunk at a time."""
        with self._staged_env.begin(db=self._staged_rows) as staged:
            self._db.merge_all(txn, self._blocks, staged.cursor(), self._staged_db.decode)

    def _clear_staged(self, txn: lmdb.Transaction | None = None) -> None:
        """Empties the staged rows and records the flush they now build on."""
        if txn is None:
            with self._storage_errors("clear staged rows"), self._staged_env.begin(write=True) as t:
                self._clear_staged(t)
            return
        txn.drop(self._staged_rows, delete=False)
        txn.put(FLUSH_KEY, str(self._flush_count).encode(), db=self._staged_info)

    # ------------------------------------------------------------------------------ misc

    def disk_bytes(self) -> int:
        """Bytes the table's directory occupies on disk (allocated blocks of every file)."""
        return allocated_bytes(self.path)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                self.stats[key] += value

    def _check_usable(self) -> None:
        if self._env is None:
            raise StorageError(f"{self.path}: table is closed")

    def _check_writable(self) -> None:
        self._check_usable()
        if self.readonly:
            raise ReadOnlyTableError(f"{self.path}: table was opened readonly")

    def _storage_errors(self, doing: str) -> StorageErrors:
        return StorageErrors(self.path, doing)
