"""The SSD tier's directory on disk, apart from LMDB's own reading and writing.

A table's directory (see :mod:`tierstore.ssd`) is created in a sibling directory and renamed
into place; this module finds and removes the half-built siblings of dead processes, checks
``data.mdb`` against its LMDB meta pages before it is mapped, syncs directory entries, counts
the bytes the files occupy, and turns LMDB and OS errors into tierstore errors naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import shutil
import struct
import threading
import time
import weakref
from typing import Any

import lmdb

from tierstore.errors import (
    CorruptBlockError,
    NotATableError,
    StorageError,
    StorageFullError,
    TableLockedError,
)

LOCK_FILE = "writer.lock"
STAGED_DIR = "staged"
# Tables open in this process, by resolved path: LMDB forbids opening one environment twice
# in a process (closing either handle would drop the other's POSIX locks).
_OPEN_TABLES: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_OPEN_TABLES_LOCK = threading.Lock()
# A table being created lives in a sibling directory named so, until it is renamed into place.
CREATING = ".{name}.tierstore-creating."
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


def register_open(key: str, table: Any, path: pathlib.Path) -> None:
    """Records ``table`` (at ``path``) as open in this process under ``key`` (its resolved
    path); TableLockedError if a table is open there already."""
    with _OPEN_TABLES_LOCK:
        if key in _OPEN_TABLES:
            raise TableLockedError(f"{path}: table is already open in this process")
        _OPEN_TABLES[key] = table


def unregister_open(key: str, table: Any) -> None:
    """Forgets ``table`` as open under ``key`` (if it is the one recorded)."""
    with _OPEN_TABLES_LOCK:
        if _OPEN_TABLES.get(key) is table:
            del _OPEN_TABLES[key]


def open_table(key: str) -> Any | None:
    """The table open in this process under ``key`` (its resolved path), if any."""
    with _OPEN_TABLES_LOCK:
        return _OPEN_TABLES.get(key)


def take_writer_lock(path: pathlib.Path, directory: pathlib.Path) -> int:
    """Takes the writer lock of the table at ``path`` in ``directory`` without waiting;
    returns the lock file's descriptor (closing it releases the lock)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the writer lock file ({exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise TableLockedError(f"{path}: table is open for writing by another process") from exc
    return fd


def open_lmdb(path: pathlib.Path, map_size: int, readonly: bool, create: bool) -> lmdb.Environment:
    """The table's LMDB environment (databases ``meta`` and ``blocks``), errors named."""
    kwargs = dict(
        map_size=map_size, readonly=readonly, create=create, max_dbs=4, readahead=False,
        meminit=False,
    )  # fmt: skip
    try:
        return lmdb.open(str(path), **kwargs)
    except lmdb.InvalidError as exc:
        raise NotATableError(f"{path}: not a tierstore table ({exc})") from exc
    except lmdb.Error as exc:
        if readonly and getattr(exc, "code", None) in (13, 30):  # EACCES, EROFS
            # A read-only directory or lock file: read without LMDB's reader table.
            try:
                return lmdb.open(str(path), lock=False, **kwargs)
            except lmdb.Error as exc2:
                exc = exc2
        raise StorageError(f"{path}: cannot open the LMDB environment ({exc})") from exc


def lmdb_size_check(path: pathlib.Path) -> None:
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


def creation_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """Sibling directories where a table at ``path`` is or was being created."""
    prefix = CREATING.format(name=path.name)
    try:
        return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def remove_abandoned_creations(path: pathlib.Path) -> None:
    """Deletes half-created tables for ``path`` left by dead processes: those whose writer
    lock is free, or that have none and whose process is gone (or that are over a minute
    old). Never touches a live one."""
    for tmp in creation_dirs(path):
        try:
            fd = os.open(tmp / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # killed before it took its lock, or about to take it
            try:
                old = time.time() - tmp.stat().st_mtime > _ABANDONED_AFTER_S
            except OSError:
                continue
            if old or not _alive(tmp.name[len(CREATING.format(name=path.name)) :]):
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


def fsync_dir(path: pathlib.Path) -> None:
    """Makes the entries of directory ``path`` (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(path: pathlib.Path) -> int:
    """Bytes the files under ``path`` occupy on disk (sparse files count what is allocated)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class StorageErrors:
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


def open_staged(path: pathlib.Path, map_size: int) -> tuple[lmdb.Environment, Any, Any]:
    """A fresh, empty staged environment in ``path``'s ``staged/`` (what was there is deleted):
    the environment, its ``blocks`` database and its ``info`` database."""
    staged = path / STAGED_DIR
    try:
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir()
        # No fsync ever: nothing in it needs to survive a crash.
        env = lmdb.open(
            str(staged), map_size=map_size, max_dbs=2, sync=False, metasync=False,
            readahead=False, meminit=False,
        )  # fmt: skip
        return env, env.open_db(b"blocks"), env.open_db(b"info")
    except (OSError, lmdb.Error) as exc:
        raise StorageError(f"{path}: cannot reset the staged rows ({exc})") from exc
