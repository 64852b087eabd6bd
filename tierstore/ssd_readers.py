"""A pool of reader processes that look block keys up in a table's LMDB environment.

py-lmdb's ``getmulti`` holds the GIL for every key (about 1-2 us each), so however many I/O
threads a process has, its lookups run one at a time. :class:`ReaderPool` runs them in
``processes`` other processes instead, each with the table's environment opened read-only
(``lmdb.open(readonly=True)``, LMDB's reader table shared with the writer): the tier sends a
worker a slice of a read's sorted block keys and the transaction id of its own snapshot; the
worker looks them up in a fresh read transaction and streams back, a chunk at a time over a
pipe, which keys it found and their raw values (read with ``os.readv`` straight into numpy
arrays: one copy, off the GIL). The tier checks and decodes those values as
it does its own (every block's CRC-32 covers its key and bytes, so a value under a wrong key
is refused, not returned).

A worker whose snapshot is not the tier's (a flush committed in between) answers "stale"
and the tier looks that slice up itself; so does it after any failure of a worker, and the
pool is then closed for good. Workers are fresh interpreters running this file as a script
(``subprocess``, fork+exec: a forked copy of the parent is unsafe once CUDA is initialised;
and not multiprocessing's ``spawn``, which re-runs the caller's main script in every
worker): they import numpy and lmdb only, not torch. They are started lazily, without
waiting: a read uses the pool only once every worker has said it is ready. A worker exits
when the pool closes or its parent dies (its request pipe reaches end of file).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np

# Seconds close() waits for a worker to exit before terminating it.
_JOIN_SECONDS = 5.0


# Answer headers: (start, found, bytes) int64, or one of these starts with zeros.
_STALE, _READY, _FAILED = -1, -2, -3


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, nbytes: int) -> np.ndarray:
    """``nbytes`` from a pipe into a fresh array (os.readv: one copy, the GIL released)."""
    out = np.empty(nbytes, np.uint8)
    view, got = memoryview(out), 0
    while got < nbytes:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("a reader process closed its pipe")
        got += n
    return out


def _widen(fd: int) -> None:
    """A 1 MiB pipe buffer where Linux allows it (fewer, larger reads); else as it is."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass


def _serve(path: str, map_size: int, requests: Connection, answers: int) -> None:
    """A worker's loop. Request: ``(txn_id, chunk_blocks)`` then the keys' bytes (8 per key,
    sorted). Answer per chunk, raw bytes on the pipe ``answers``: a header ``(chunk_start,
    n_found, nbytes)`` ``(3,) int64``, then the found keys' indices in the request
    ``(n_found,) int64``, their values' sizes ``(n_found,) int64`` and the values joined
    (``nbytes``); or a header ``(_STALE, 0, 0)``: the snapshot is not ``txn_id``'s.
    ``None`` stops the worker."""
    import lmdb  # here, not at import: a spawned worker imports only what it needs

    try:
        env = lmdb.open(path, readonly=True, map_size=map_size, max_dbs=4, readahead=False)
        blocks_db = env.open_db(b"blocks", create=False)
    except lmdb.Error as exc:
        print(f"tierstore reader: cannot open {path}: {exc}", file=sys.stderr)
        _write_all(answers, np.array([_FAILED, 0, 0], np.int64).tobytes())
        return
    _write_all(answers, np.array([_READY, 0, 0], np.int64).tobytes())
    while True:
        try:
            request = requests.recv()
        except EOFError:
            return
        if request is None:
            break
        txn_id, chunk = request
        keys = np.frombuffer(requests.recv_bytes(), ">u8")
        try:
            txn = env.begin(db=blocks_db)
        except lmdb.Error:  # e.g. the writer grew the map past ours: answered as stale
            txn = None
        if txn is None or txn.id() != txn_id:
            _write_all(answers, np.array([_STALE, 0, 0], np.int64).tobytes())
            if txn is not None:
                txn.abort()
            continue
        try:
            cursor = txn.cursor()
            for start in range(0, len(keys), chunk):
                span = keys[start : start + chunk]
                raw = span.tobytes()  # big-endian (a numpy scalar's tobytes() is native)
                pairs = cursor.getmulti([raw[i : i + 8] for i in range(0, len(raw), 8)])
                found = np.frombuffer(b"".join([k for k, _ in pairs]), ">u8")
                where = start + np.searchsorted(span, found)
                size = np.fromiter(map(len, [v for _, v in pairs]), np.int64, len(pairs))
                data = b"".join([v for _, v in pairs])
                head = np.array([start, len(pairs), len(data)], np.int64)
                where = where.astype(np.int64)
                _write_all(answers, head.tobytes() + where.tobytes() + size.tobytes() + data)
        finally:
            txn.abort()
    env.close()


class StaleSnapshot(Exception):
    """The worker's snapshot is not the tier's: a flush committed in between."""


def check_processes(path, io_processes: object) -> None:
    """Refuses an ``io_processes`` that is not an int >= 0 (:class:`InvalidInputError`)."""
    from tierstore.errors import InvalidInputError  # here: a worker imports numpy and lmdb only

    if not isinstance(io_processes, int) or isinstance(io_processes, bool) or io_processes < 0:
        raise InvalidInputError(f"{path}: io_processes must be an int >= 0, got {io_processes!r}")


class ReaderPool:
    """``processes`` reader processes for the LMDB environment at ``path`` (started by
    :meth:`start`, used once :meth:`ready`, stopped by :meth:`close`)."""

    def __init__(self, path: str, map_size: int, processes: int) -> None:
        self.path, self.map_size, self.processes = path, map_size, processes
        self._conns: list[tuple[Connection, int]] = []  # (requests, answers' fd) per worker
        self._procs: list[subprocess.Popen] = []
        self._ready = [False] * processes
        self._locks = [threading.Lock() for _ in range(processes)]
        self.closed = False
        self.started = False
        # Set when an exchange failed half-way (a pipe out of step): the tier closes the pool.
        self.broken = False

    def start(self) -> None:
        """Starts the workers (does not wait for them to open the table)."""
        if self.started or self.closed:
            return
        self.started = True
        atexit.register(self.close)
        # Not the script's directory on the worker's sys.path (PYTHONSAFEPATH): tierstore's
        # modules must not shadow the standard library's (``trace``).
        env = dict(os.environ, PYTHONSAFEPATH="1")
        try:
            for _ in range(self.processes):
                req_r, req_w = os.pipe()
                ans_r, ans_w = os.pipe()
                _widen(ans_r)
                try:
                    proc = subprocess.Popen(
                        [sys.executable, __file__, str(req_r), str(ans_w), self.path,
                         str(self.map_size)],
                        pass_fds=(req_r, ans_w), env=env, stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                finally:
                    os.close(req_r)
                    os.close(ans_w)
                self._procs.append(proc)
                self._conns.append((Connection(req_w, readable=False), ans_r))
        except BaseException:
            self.close()
            raise

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether every worker has opened the environment (waits up to ``timeout`` seconds
        for each). A worker that failed to start closes the pool."""
        if self.closed or self.broken or not self.started:
            return False
        try:
            for i, (_, fd) in enumerate(self._conns):
                if not self._ready[i]:
                    if not select.select([fd], [], [], timeout)[0]:
                        return False
                    if np.frombuffer(_read_exact(fd, 24), np.int64)[0] != _READY:
                        raise RuntimeError("a reader process could not open the table")
                    self._ready[i] = True
        except (OSError, EOFError, RuntimeError):
            self.close()
            return False
        return True

    def send(self, worker: int, txn_id: int, keys: np.ndarray, chunk: int) -> None:
        """Asks ``worker`` for the values of ``keys`` ((m,) big-endian uint64, sorted) in the
        snapshot ``txn_id``, answered ``chunk`` keys at a time (:meth:`answers`)."""
        self._locks[worker].acquire()  # released by release() once its answers are read
        try:
            conn = self._conns[worker][0]
            conn.send((txn_id, chunk))
            conn.send_bytes(np.ascontiguousarray(keys, ">u8").tobytes())
        except BaseException:
            self._locks[worker].release()
            raise

    def answers(
        self, worker: int, count: int, chunk: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The answers of ``worker`` to a request of ``count`` keys: per chunk, ``(start,
        where (n,) int64, size (n,) int64, data (sum(size),) uint8)``, ``where`` indexing
        the request's keys. Raises :class:`StaleSnapshot` for a snapshot not the tier's."""
        fd = self._conns[worker][1]
        for _ in range(-(-count // chunk)):
            start, n, nbytes = (int(x) for x in _read_exact(fd, 24).view(np.int64))
            if start == _STALE:
                raise StaleSnapshot
            if start < 0 or n < 0 or nbytes < 0:
                raise RuntimeError("a reader process sent a malformed answer")
            body = _read_exact(fd, 16 * n + nbytes)
            where, size = body[: 16 * n].view(np.int64).reshape(2, n)
            # Indices of this chunk's keys, ascending; sizes that add up.
            ordered = n == 0 or (
                where[0] >= start and where[-1] < min(start + chunk, count)
                and bool((where[1:] > where[:-1]).all()) and bool((size >= 0).all())
            )  # fmt: skip
            if not ordered or int(size.sum()) != nbytes:
                raise RuntimeError("a reader process sent a malformed answer")
            yield start, where, size, body[16 * n :]

    def release(self, worker: int) -> None:
        """Ends an exchange with ``worker`` (its answers all read, or the pool broken)."""
        self._locks[worker].release()

    def close(self) -> None:
        """Stops the workers (terminating those that do not exit in a few seconds).
        Idempotent; the pool cannot be started again."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        for conn, _ in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            try:
                proc.wait(_JOIN_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_JOIN_SECONDS)
        for conn, fd in self._conns:
            conn.close()
            os.close(fd)
        self._conns, self._procs = [], []

    def pids(self) -> list[int]:
        """The workers' process ids (for tests)."""
        return [p.pid for p in self._procs]


if __name__ == "__main__":  # a worker: request fd, answer fd, table path, map size
    _serve(sys.argv[3], int(sys.argv[4]), Connection(int(sys.argv[1]), writable=False),
           int(sys.argv[2]))  # fmt: skip
