"""L3, the SSD tier: every row ever written, in one LMDB environment (a directory).

Layout of the directory::

    data.mdb, lock.mdb   the table: named databases ``meta`` (JSON metadata, flush counter)
                         and ``blocks`` (one entry per block of consecutive ids)
    staged/              a scratch LMDB environment for rows written between flushes;
                         never synced, wiped on every open for writing
    writer.lock          flock'ed by the one process that has the table open for writing

Rows are grouped into blocks of ``block_rows`` consecutive ids. The key of a block is the
8-byte big-endian ``(id XOR 2**63) >> log2(block_rows)``: flipping the sign bit maps signed
ids onto unsigned ones in the same order, so LMDB's byte order is the ids' order. The
block format (byte planes, zstd on the sign/exponent plane only, and why) is
:mod:`tierstore.blocks`.

Every batch is handled in bulk: block keys are computed with numpy, blocks are fetched with
one ``getmulti`` and (de)compressed with zstandard's multi-frame calls, and rows are
(un)shuffled by fancy indexing across all blocks at once. No Python code runs per row.

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

import bisect
import concurrent.futures
import errno
import fcntl
import itertools
import json
import os
import pathlib
import secrets
import shutil
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np
import torch

from tierstore.blocks import SIGN, BadBlock, BlockCodec, DecodedBlocks, check, seal
from tierstore.errors import (
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    ReadOnlyTableError,
    StorageError,
    StorageFullError,
    TableLockedError,
    TableMismatchError,
)

InitRows = Callable[[torch.Tensor], torch.Tensor]

_META_KEY = b"meta"
_FLUSH_KEY = b"flush_count"
_LOCK_FILE = "writer.lock"
_STAGED_DIR = "staged"
# A table being created lives in a sibling directory named so, until it is renamed into place.
_CREATING = ".{name}.tierstore-creating."
# An abandoned creation without a writer lock file is removed once it is this old (seconds).
_ABANDONED_AFTER_S = 60.0
# LMDB's meta pages (pages 0 and 1, on 64-bit builds): after the 16-byte page header, the
# magic and version (uint32 each), the map address and size, two 48-byte database records
# (the first one's leading uint32 holds the page size), the last page number and the
# transaction id (uint64 each). Read with plain file reads before LMDB maps the file.
_LMDB_MAGIC = 0xBEEFC0DE
_META_LAYOUT = struct.Struct("<16xII8x8xI44x48xQQ")
# EIO on a write is a full disk when less than this is left free (LMDB reports a short write
# as EIO; the filesystem's ENOSPC does not reach the caller).
_FULL_DISK_BYTES = 64 << 20
# Rows per chunk when merging staged rows into the flush transaction (bounds memory).
_MERGE_CHUNK_ROWS = 1 << 16

# Tables open in this process, by resolved path: LMDB forbids opening one environment twice
# in a process (closing either handle would drop the other's POSIX locks).
_OPEN_TABLES: weakref.WeakValueDictionary[str, SSDTier] = weakref.WeakValueDictionary()
_OPEN_TABLES_LOCK = threading.Lock()


def _as_ids(ids: torch.Tensor, what: str = "ids") -> np.ndarray:
    """Validates a 1-D sorted unique integer id tensor; returns its int64 numpy array."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise InvalidInputError(f"{what} must be a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"{what} must be int64 or int32, got {ids.dtype}")
    arr = ids.detach().cpu().to(torch.int64).numpy()
    if len(arr) > 1 and not (arr[1:] > arr[:-1]).all():
        raise InvalidInputError(f"{what} must be sorted ascending and unique")
    return arr


def _as_rows(rows: torch.Tensor, n: int, width: int) -> np.ndarray:
    """Validates a (n, width) float32 row tensor; returns a C-contiguous numpy array."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.float32:
        raise InvalidInputError(
            f"rows must be a float32 tensor, got {getattr(rows, 'dtype', rows)}"
        )
    if tuple(rows.shape) != (n, width):
        raise InvalidInputError(f"rows must have shape ({n}, {width}), got {tuple(rows.shape)}")
    return np.ascontiguousarray(rows.detach().cpu().numpy())


# py-lmdb's getmulti releases and retakes the GIL around every key: two threads running it
# at once ping-pong the GIL and take twice as long as one after the other (measured).
_GETMULTI_LOCK = threading.Lock()


def _getmulti(cursor: lmdb.Cursor, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``cursor.getmulti(keys)``, one thread of the process at a time."""
    with _GETMULTI_LOCK:
        return cursor.getmulti(keys)


def _seal(key: bytes, body: bytes) -> bytes:
    """A metadata value: its body and the CRC-32 of key and body (the block trailer)."""
    return seal([key], [body])[0]


def _unseal(path: pathlib.Path, key: bytes, value: bytes | None) -> bytes:
    """The body of a sealed metadata value; CorruptBlockError if it is missing or damaged."""
    if value is None:
        raise CorruptBlockError(f"{path}: the stored metadata has no {key.decode()!r} entry")
    try:
        check([value], [key])
    except BadBlock as bad:
        raise CorruptBlockError(
            f"{path}: damaged metadata entry {key.decode()!r}: {bad.problem}"
        ) from None
    return value[:-4]


def _lmdb_size_check(path: pathlib.Path) -> None:
    """Refuses a ``data.mdb`` shorter than its own meta pages say, before LMDB maps it (reading
    a page past the end of a mapped file kills the process with SIGBUS)."""
    data = path / "data.mdb"
    try:
        with open(data, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_META_LAYOUT.size)
            page_size = _META_LAYOUT.unpack(head)[2] if len(head) == _META_LAYOUT.size else 0
            f.seek(max(page_size, 1))
            second = f.read(_META_LAYOUT.size)
    except OSError as exc:
        raise StorageError(f"{path}: cannot read data.mdb ({exc})") from exc
    if len(head) < _META_LAYOUT.size:
        raise NotATableError(f"{path}: data.mdb is {size} bytes, too short for LMDB")
    magic, _, page_size, last_page, _ = _META_LAYOUT.unpack(head)
    if magic != _LMDB_MAGIC or not 512 <= page_size <= 1 << 16:
        raise NotATableError(f"{path}: data.mdb is not an LMDB file (bad meta page)")
    pages = last_page + 1
    if len(second) == _META_LAYOUT.size:
        magic2, _, page_size2, last_page2, _ = _META_LAYOUT.unpack(second)
        if magic2 == _LMDB_MAGIC and page_size2 == page_size:
            pages = max(pages, last_page2 + 1)
    if size < max(2, pages) * page_size:
        raise CorruptBlockError(
            f"{path}: data.mdb is truncated: {size} bytes, but its meta pages say "
            f"{max(2, pages)} pages of {page_size} bytes ({max(2, pages) * page_size} bytes)"
        )


def _creation_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """Sibling directories where a table at ``path`` is or was being created."""
    prefix = _CREATING.format(name=path.name)
    try:
        return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def _remove_abandoned_creations(path: pathlib.Path) -> None:
    """Deletes half-created tables for ``path`` left by dead processes: those whose writer
    lock is free, or that have none and whose process is gone (or that are over a minute
    old). Never touches a live one."""
    for tmp in _creation_dirs(path):
        try:
            fd = os.open(tmp / _LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # killed before it took its lock, or about to take it
            try:
                old = time.time() - tmp.stat().st_mtime > _ABANDONED_AFTER_S
            except OSError:
                continue
            if old or not _alive(tmp.name[len(_CREATING.format(name=path.name)) :]):
                shutil.rmtree(tmp, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its creator is alive
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)


def _alive(suffix: str) -> bool:
    """Whether the process whose pid starts ``suffix`` ("<pid>.<random>") may be running."""
    try:
        os.kill(int(suffix.split(".")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    return True


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocated_bytes(path: pathlib.Path) -> int:
    """Bytes the files under ``path`` occupy on disk (sparse files count what is allocated)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _check_meta(path: pathlib.Path, meta: Any, count: bytes, version: int) -> int:
    """Validates the stored metadata's SSD keys by type and range; returns the flush count."""

    def bad(what: str) -> CorruptBlockError:
        return CorruptBlockError(f"{path}: stored metadata is invalid: {what}")

    if not isinstance(meta, dict):
        raise bad(f"a JSON {type(meta).__name__}, expected an object")
    if meta.get("format_version") != version:
        raise TableMismatchError(
            f"{path}: table has format_version={meta.get('format_version')!r}, this code "
            f"reads {version}"
        )

    def integer(key: str, lo: int, hi: int) -> int:
        value = meta.get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise bad(f"{key}={value!r}, expected an int in [{lo}, {hi}]")
        return value

    integer("row_width", 1, 1 << 24)
    block_rows = integer("block_rows", 1, 1 << 16)
    if block_rows & (block_rows - 1):
        raise bad(f"block_rows={block_rows}, expected a power of two")
    integer("compression_level", -7, 22)
    try:
        flushes = int(count.decode("ascii"))
    except ValueError:
        raise bad(f"flush count {count[:20]!r} is not an integer") from None
    if flushes < 0:
        raise bad(f"flush count {flushes} is negative")
    return flushes


class FlushWriter:
    """One flush: a single LMDB write transaction that first merges the staged rows, then the
    dirty rows sent with :meth:`write`, and becomes durable on :meth:`commit`.

    Use it from the thread that called :meth:`SSDTier.flush_begin` (LMDB write transactions
    belong to their thread). As a context manager it commits on normal exit, aborts on error.
    """

    def __init__(self, tier: SSDTier, txn: lmdb.Transaction) -> None:
        self._tier = tier
        self._thread = threading.get_ident()
        self._txn: lmdb.Transaction | None = txn

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Adds a chunk of dirty rows (ids sorted ascending, unique) to the flush."""
        self._check_open()
        tier = self._tier
        u, rows_np = tier._prepare(ids, rows)
        try:
            with tier._storage_errors("flush"):
                tier._merge(self._txn, tier._blocks, u, rows_np)
        except BaseException:
            self._end(commit=False)  # LMDB needs the failed transaction aborted
            raise
        tier._count(rows_written=len(u))

    def commit(self) -> None:
        """Commits the flush; when this returns, the rows survive a crash (LMDB fsyncs)."""
        self._check_open()
        self._end(commit=True)

    def abort(self) -> None:
        """Rolls the flush back: the table, staged rows included, is as before flush_begin."""
        if self._txn is not None:
            self._end(commit=False)

    def __enter__(self) -> FlushWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _check_open(self) -> None:
        if self._txn is None:
            raise RuntimeError(f"{self._tier.path}: this flush was already committed or aborted")
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                f"{self._tier.path}: a flush must be used by the thread that began it"
            )

    def _end(self, commit: bool) -> None:
        txn, self._txn = self._txn, None
        tier = self._tier
        try:
            if commit:
                count = tier._flush_count + 1
                with tier._storage_errors("flush"):
                    try:
                        txn.put(_FLUSH_KEY, _seal(_FLUSH_KEY, str(count).encode()),
                                db=tier._meta_db)  # fmt: skip
                        txn.commit()
                    except BaseException:
                        txn.abort()
                        raise
                tier._flush_count = count
                tier._clear_staged()
            else:
                txn.abort()
        finally:
            tier._writer = None
            tier._write_mutex.release()


class SSDTier:
    """L3: every row ever written, in one LMDB environment, as zstd-compressed blocks of
    consecutive ids.

    Thread safety: :meth:`read` and :meth:`read_async` may run from any threads at once (the
    LMDB lookups themselves take turns: see ``_GETMULTI_LOCK``); :meth:`write` and flushes are
    serialised (a :meth:`write` waits for a flush open on another thread, and is refused on the
    thread that holds one). :meth:`close` waits for pending :meth:`read_async` calls; commit or
    abort an open flush first. One process may open a table once (LMDB's rule); other
    processes may open it ``readonly`` while one writes.
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
        _remove_abandoned_creations(path)
        name = _CREATING.format(name=path.name) + f"{os.getpid()}.{secrets.token_hex(4)}"
        building = path.parent / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            building.mkdir()
        except OSError as exc:
            raise StorageError(f"{path}: cannot create the table directory ({exc})") from exc
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
                    txn.put(_META_KEY, _seal(_META_KEY, meta_json), db=meta_db)
                    txn.put(_FLUSH_KEY, _seal(_FLUSH_KEY, b"0"), db=meta_db)
            finally:
                env.close()
            _fsync_dir(building)  # the new files' directory entries, before they appear
            try:
                # Replaces an empty directory; fails if another process created one first.
                os.rename(building, path)
            except OSError as exc:
                raise StorageError(
                    f"{path}: already exists and is not an empty directory ({exc})"
                ) from exc
            building = None
            _fsync_dir(path.parent)
            self._env = self._open_env(map_size, readonly=False, create=False)
            meta = self._load_meta()
            self._finish_open(meta, init_rows, map_size, io_threads)
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
        self = cls._new(path, readonly)
        try:
            if not readonly:
                self._lock_for_writing()
            _lmdb_size_check(path)
            self._env = self._open_env(map_size, readonly, create=False)
            meta = self._load_meta()
            # Compare as JSON would store them (a tuple is stored as a list).
            expect = json.loads(json.dumps(expect or {}))
            wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in expect.items()
                     if meta.get(k) != v]  # fmt: skip
            if wrong:
                raise TableMismatchError(f"{path}: table was made with " + ", ".join(wrong))
            self._finish_open(meta, init_rows, map_size, io_threads)
        except BaseException:
            self._release()
            raise
        return self

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The stored metadata of the table at ``path`` (to reopen a table by path alone)."""
        path = pathlib.Path(path)
        with _OPEN_TABLES_LOCK:
            table = _OPEN_TABLES.get(str(path.resolve()))
        if table is not None:
            return dict(table.meta)
        if not path.exists():
            raise NotATableError(f"{path}: no such table (the path does not exist)")
        if not path.is_dir() or not (path / "data.mdb").is_file():
            raise NotATableError(f"{path}: not a tierstore table (no LMDB data.mdb)")
        self = SSDTier._new(path, readonly=True)
        try:
            _lmdb_size_check(path)
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
        with _OPEN_TABLES_LOCK:
            if self._key in _OPEN_TABLES:
                raise TableLockedError(f"{self.path}: table is already open in this process")
            _OPEN_TABLES[self._key] = self
            self._registered = True
        try:
            fd = os.open(
                (directory or self.path) / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot create the writer lock file ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise TableLockedError(
                f"{self.path}: table is open for writing by another process"
            ) from exc
        self._lock_fd = fd

    def _open_env(self, map_size: int, readonly: bool, create: bool) -> lmdb.Environment:
        if readonly:
            with _OPEN_TABLES_LOCK:
                if self._key in _OPEN_TABLES:
                    raise TableLockedError(f"{self.path}: table is already open in this process")
                _OPEN_TABLES[self._key] = self
                self._registered = True
        kwargs = dict(
            map_size=map_size, readonly=readonly, create=create, max_dbs=4, readahead=False,
            meminit=False,
        )  # fmt: skip
        try:
            return lmdb.open(str(self.path), **kwargs)
        except lmdb.InvalidError as exc:
            raise NotATableError(f"{self.path}: not a tierstore table ({exc})") from exc
        except lmdb.Error as exc:
            if readonly and getattr(exc, "code", None) in (13, 30):  # EACCES, EROFS
                # A read-only directory or lock file: read without LMDB's reader table.
                try:
                    return lmdb.open(str(self.path), lock=False, **kwargs)
                except lmdb.Error as exc2:
                    exc = exc2
            raise StorageError(f"{self.path}: cannot open the LMDB environment ({exc})") from exc

    def _load_meta(self) -> dict:
        """Reads and checks the metadata; opens the named databases."""
        try:
            self._meta_db = self._env.open_db(b"meta", create=False)
            self._blocks = self._env.open_db(b"blocks", create=False)
            with self._env.begin(db=self._meta_db) as txn:
                raw = txn.get(_META_KEY)
                flushes = txn.get(_FLUSH_KEY)
        except lmdb.Error as exc:
            raise NotATableError(
                f"{self.path}: LMDB environment without tierstore metadata"
            ) from exc
        if raw is None:
            raise NotATableError(f"{self.path}: LMDB environment without tierstore metadata")
        try:
            body = _unseal(self.path, _META_KEY, raw)
        except CorruptBlockError:
            self._refuse_unsealed(raw)
            raise
        try:
            meta = json.loads(body)
        except ValueError as exc:
            raise CorruptBlockError(f"{self.path}: stored metadata is not JSON ({exc})") from exc
        count = _unseal(self.path, _FLUSH_KEY, flushes)
        self._flush_count = _check_meta(self.path, meta, count, self.FORMAT_VERSION)
        return meta

    def _refuse_unsealed(self, raw: bytes) -> None:
        """A metadata value without a valid checksum: a table of another format version
        (version 1 stored plain JSON) is refused as such; anything else is damage."""
        try:
            version = json.loads(raw).get("format_version")
        except (ValueError, AttributeError):
            return
        if version == self.FORMAT_VERSION:
            return  # a current table whose checksum fails: damaged
        raise TableMismatchError(
            f"{self.path}: table has format_version={version!r}, this code reads "
            f"{self.FORMAT_VERSION} (version 1 tables carry no checksums: read the rows with "
            "the tierstore that wrote them and write them into a new table)"
        )

    def _finish_open(self, meta: dict, init_rows: InitRows, map_size: int, threads: int) -> None:
        self.meta = meta
        self.row_width = int(meta["row_width"])
        self.block_rows = int(meta["block_rows"])
        self.compression_level = int(meta["compression_level"])
        self._init_rows = init_rows
        self._codec = BlockCodec(self.row_width, self.block_rows, self.compression_level, threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="tierstore-ssd"
        )
        if not self.readonly:
            self._reset_staged(map_size)

    def _reset_staged(self, map_size: int) -> None:
        """A fresh, empty staged environment: rows staged by a dead process are discarded."""
        staged = self.path / _STAGED_DIR
        try:
            if staged.exists():
                shutil.rmtree(staged)
            staged.mkdir()
            # No fsync ever: nothing in it needs to survive a crash.
            self._staged_env = lmdb.open(
                str(staged), map_size=map_size, max_dbs=2, sync=False, metasync=False,
                readahead=False, meminit=False,
            )  # fmt: skip
            self._staged_rows = self._staged_env.open_db(b"blocks")
            self._staged_info = self._staged_env.open_db(b"info")
        except (OSError, lmdb.Error) as exc:
            raise StorageError(f"{self.path}: cannot reset the staged rows ({exc})") from exc
        self._clear_staged()

    def close(self) -> None:
        """Waits for pending reads, rolls back an open flush and closes the table (rows
        written since the last flush are dropped). Releases the writer lock. Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        writer = self._writer
        if writer is not None and writer._thread == threading.get_ident():
            writer.abort()
        self._release()

    def _release(self) -> None:
        for env in (self._staged_env, self._env):
            if env is not None:
                env.close()
        self._staged_env = self._env = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._registered:
            with _OPEN_TABLES_LOCK:
                if _OPEN_TABLES.get(self._key) is self:
                    del _OPEN_TABLES[self._key]
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
        ids_np = _as_ids(ids)
        u = ids_np.view(np.uint64) ^ SIGN
        out: np.ndarray | None = None  # allocated unless one database holds every row
        todo = np.arange(len(u))
        with self._storage_errors("read"):
            # Staged before main: a flush committing in between makes main newer, not older.
            staged_txn = self._staged_env.begin() if self._staged_env is not None else None
            main_txn = self._env.begin()
            try:
                sources = []
                if staged_txn is not None:
                    base = int(staged_txn.get(_FLUSH_KEY, db=self._staged_info))
                    # A flush committed after our staged snapshot has merged all of it.
                    stored = main_txn.get(_FLUSH_KEY, db=self._meta_db)
                    current = base == int(_unseal(self.path, _FLUSH_KEY, stored))
                    if current and staged_txn.stat(self._staged_rows)["entries"]:
                        sources.append((staged_txn, self._staged_rows))
                sources.append((main_txn, self._blocks))
                for txn, db in sources:
                    if len(todo) == 0:
                        break
                    found, rows = self._lookup(txn, db, u[todo])
                    if not found.any():
                        continue
                    if out is None and found.all():  # todo is still every id
                        out = rows
                    else:
                        if out is None:
                            out = np.empty((len(u), self.row_width), np.float32)
                        out[todo[found]] = rows
                    todo = todo[~found]
            finally:
                main_txn.abort()
                if staged_txn is not None:
                    staged_txn.abort()
        if out is None:
            out = np.empty((len(u), self.row_width), np.float32)
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
            main_txn = self._env.begin()
            staged_txn = self._staged_env.begin() if self._staged_env is not None else None
            try:
                sources = [(main_txn, self._blocks)] if flushed else []
                if staged and staged_txn is not None:
                    base = int(staged_txn.get(_FLUSH_KEY, db=self._staged_info))
                    stored = main_txn.get(_FLUSH_KEY, db=self._meta_db)
                    if base == int(_unseal(self.path, _FLUSH_KEY, stored)):  # not merged
                        sources.append((staged_txn, self._staged_rows))
                for txn, db in sources:
                    parts += self._block_ids(txn.cursor(db))
            finally:
                main_txn.abort()
                if staged_txn is not None:
                    staged_txn.abort()
        u = np.unique(np.concatenate(parts))
        return torch.from_numpy((u ^ SIGN).view(np.int64))

    def _block_ids(self, cursor: lmdb.Cursor) -> list[np.ndarray]:
        """The unsigned ids of every row in a database's blocks, a chunk of blocks at a time."""
        out, chunk = [], max(1, _MERGE_CHUNK_ROWS // self.block_rows)
        keys = cursor.iternext(keys=True, values=self.block_rows > 1)
        while batch := list(itertools.islice(keys, chunk)):
            if self.block_rows == 1:  # a block is one row: its key is the id
                out.append(np.frombuffer(b"".join(batch), ">u8").astype(np.uint64))
                continue
            blocks = np.frombuffer(b"".join([k for k, _ in batch]), ">u8").astype(np.uint64)
            decoded = self._decode([v for _, v in batch], blocks)
            out.append(
                (blocks[decoded.block] << self._codec.shift) | decoded.offset.astype(np.uint64)
            )
        return out

    def _initial(self, ids: np.ndarray) -> np.ndarray:
        rows = self._init_rows(torch.from_numpy(ids))
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (len(ids), self.row_width):
            raise InvalidInputError(
                f"{self.path}: init_rows returned {getattr(rows, 'shape', type(rows))}, "
                f"expected ({len(ids)}, {self.row_width})"
            )
        return rows.detach().cpu().to(torch.float32).numpy()

    def _lookup(
        self, txn: lmdb.Transaction, db: Any, u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Looks sorted unsigned ids up in one database: (found mask, rows of the found ids)."""
        codec = self._codec
        first, blocks = codec.blocks(u)
        cursor = txn.cursor(db)
        pairs = _getmulti(cursor, codec.keys(blocks))
        if len(pairs) < len(blocks) and db is self._blocks:
            found_keys = [k for k, _ in pairs]
            self._check_absent(cursor, blocks, found_keys)
        if not pairs:
            return np.zeros(len(u), bool), np.empty((0, self.row_width), np.float32)
        values = [v for _, v in pairs]
        if len(pairs) == len(blocks):
            found_blocks = blocks
        else:
            found_blocks = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8").astype(np.uint64)
        decoded = self._decode(values, found_blocks)
        self._count(blocks_read=len(values), bytes_read=sum(map(len, values)))
        # For every id: the position of its block among the found ones, then its entry.
        count = np.diff(np.append(first, len(u)))
        block_of = np.repeat(np.arange(len(blocks)), count)
        pos = np.searchsorted(found_blocks, blocks)
        block_found = pos < len(found_blocks)
        block_found[block_found] = found_blocks[pos[block_found]] == blocks[block_found]
        offset = (u & np.uint64(self.block_rows - 1)).astype(np.int64)
        want = pos[block_of] * self.block_rows + offset
        entry = np.searchsorted(decoded.key, want)
        entry = np.minimum(entry, len(decoded.key) - 1)
        hit = block_found[block_of] & (decoded.key[entry] == want)
        return hit, decoded.rows(entry[hit])

    def _check_absent(self, cursor: lmdb.Cursor, blocks: np.ndarray, found: list[bytes]) -> None:
        """Makes sure that the ``blocks`` (sorted) that LMDB did not find are truly absent,
        and not stored under a damaged key: each gap between stored keys that a missing key
        falls in has its two bounding entries checked against their own keys (a damaged key,
        node header or node pointer fails that check). One cursor seek per gap, not per key.
        """
        keys = self._codec.keys(blocks)
        if found:
            have = set(found)
            keys = [k for k in keys if k not in have]
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
            where = f"block key {block:#x} (rows from id {self._codec.first_id(block)})"
        else:
            where = f"a {len(key)}-byte block key {key[:16].hex()}"
        raise CorruptBlockError(f"{self.path}: corrupt block near {where}: {problem}")

    def _decode(self, values: list[bytes], blocks: np.ndarray) -> DecodedBlocks:
        """Checks and decodes values stored under the keys of ``blocks``."""
        try:
            return self._codec.decode(values, self._codec.keys(blocks))
        except BadBlock as bad:
            first = self._codec.first_id(int(blocks[bad.index]))
            raise CorruptBlockError(
                f"{self.path}: corrupt block starting at id {first} (block key "
                f"{int(blocks[bad.index]):#x}): {bad.problem}"
            ) from None

    # ----------------------------------------------------------------------------- writing

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Stages rows (ids sorted ascending, unique): :meth:`read` returns them at once, the
        next flush makes them durable, a crash before it loses them."""
        self._check_writable()
        writer = self._writer
        if writer is not None and writer._thread == threading.get_ident():
            raise RuntimeError(f"{self.path}: write() while this thread has a flush open")
        u, rows_np = self._prepare(ids, rows)
        with self._write_mutex, self._storage_errors("write"):
            with self._staged_env.begin(write=True) as txn:
                if int(txn.get(_FLUSH_KEY, db=self._staged_info)) != self._flush_count:
                    # A flush merged these staged rows but failed to clear them: do it now.
                    self._clear_staged(txn)
                self._merge(txn, self._staged_rows, u, rows_np)
        self._count(rows_written=len(u))

    def flush_begin(self) -> FlushWriter:
        """Starts a flush (one LMDB write transaction, staged rows merged into it first).
        Send the dirty rows in chunks with ``writer.write``, then ``writer.commit()``."""
        self._check_writable()
        if self._writer is not None and self._writer._thread == threading.get_ident():
            raise RuntimeError(f"{self.path}: a flush is already open on this thread")
        self._write_mutex.acquire()
        try:
            with self._storage_errors("flush"):
                txn = self._env.begin(write=True)
        except BaseException:
            self._write_mutex.release()
            raise
        writer = self._writer = FlushWriter(self, txn)
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
        ids_np = _as_ids(ids)
        rows_np = _as_rows(rows, len(ids_np), self.row_width)
        return ids_np.view(np.uint64) ^ SIGN, rows_np

    def _merge(self, txn: lmdb.Transaction, db: Any, u: np.ndarray, rows: np.ndarray) -> None:
        """Read-modify-write of every block the rows touch, in one batch: existing rows of
        those blocks are kept unless overwritten."""
        if len(u) == 0:
            return
        codec = self._codec
        first, blocks = codec.blocks(u)
        cursor = txn.cursor(db)
        # Blocks whose every row is rewritten need not be read (with block_rows=1: none).
        partial = np.diff(np.append(first, len(u))) < self.block_rows
        pairs = _getmulti(cursor, codec.keys(blocks[partial])) if partial.any() else []
        if len(pairs) < int(partial.sum()) and db is self._blocks:
            self._check_absent(cursor, blocks[partial], [k for k, _ in pairs])
        if pairs:
            old_blocks = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8").astype(np.uint64)
            decoded = self._decode([v for _, v in pairs], old_blocks)
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

    def _merge_staged(self, txn: lmdb.Transaction) -> None:
        """Copies the staged rows into a flush transaction, a bounded chunk at a time."""
        chunk_blocks = max(1, _MERGE_CHUNK_ROWS // self.block_rows)
        with self._staged_env.begin(db=self._staged_rows) as staged:
            pairs: list[tuple[bytes, bytes]] = []
            for pair in staged.cursor():
                pairs.append(pair)
                if len(pairs) == chunk_blocks:
                    self._merge_pairs(txn, pairs)
                    pairs = []
            self._merge_pairs(txn, pairs)

    def _merge_pairs(self, txn: lmdb.Transaction, pairs: list[tuple[bytes, bytes]]) -> None:
        if not pairs:
            return
        blocks = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8").astype(np.uint64)
        decoded = self._decode([v for _, v in pairs], blocks)
        u = (blocks[decoded.block] << self._codec.shift) | decoded.offset.astype(np.uint64)
        self._merge(txn, self._blocks, u, decoded.rows(np.arange(len(u))))

    def _clear_staged(self, txn: lmdb.Transaction | None = None) -> None:
        """Empties the staged rows and records the flush they now build on."""
        if txn is None:
            with self._storage_errors("clear staged rows"), self._staged_env.begin(write=True) as t:
                self._clear_staged(t)
            return
        txn.drop(self._staged_rows, delete=False)
        txn.put(_FLUSH_KEY, str(self._flush_count).encode(), db=self._staged_info)

    # ------------------------------------------------------------------------------ misc

    def disk_bytes(self) -> int:
        """Bytes the table's directory occupies on disk (allocated blocks of every file)."""
        return _allocated_bytes(self.path)

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

    def _storage_errors(self, doing: str) -> _StorageErrors:
        return _StorageErrors(self.path, doing)


class _StorageErrors:
    """Context manager turning LMDB and OS errors into tierstore errors naming the path."""

    def __init__(self, path: pathlib.Path, doing: str) -> None:
        self.path, self.doing = path, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, (lmdb.Error, OSError)):
            return False
        if isinstance(exc, StorageError):
            return False
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        if isinstance(exc, lmdb.MapFullError) or code == 28:  # ENOSPC
            raise StorageFullError(
                f"{self.path}: {self.doing} failed, the LMDB map or the disk is full "
                f"(rolled back; reopen with a larger map_size): {exc}"
            ) from exc
        if code == errno.EIO and self._disk_is_full():
            raise StorageFullError(
                f"{self.path}: {self.doing} failed, the disk is full ({self._free_bytes()} "
                f"bytes free; rolled back, the last flush is intact): {exc}"
            ) from exc
        if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError)):
            raise CorruptBlockError(f"{self.path}: {self.doing}: LMDB corruption ({exc})") from exc
        raise StorageError(f"{self.path}: {self.doing} failed: {exc}") from exc

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return -1
        return st.f_bavail * st.f_frsize

    def _disk_is_full(self) -> bool:
        """LMDB reports a short write as EIO: call it a full disk when little space is left."""
        return 0 <= self._free_bytes() < _FULL_DISK_BYTES
