"""One flush of the SSD tier: the handle that :meth:`tierstore.ssd.SSDTier.flush_begin`
returns, over a single LMDB write transaction."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable
from typing import Any

import lmdb
import torch

# merge(txn, ids, rows): adds rows to the transaction; finish(txn, commit): ends it.
Merge = Callable[[lmdb.Transaction, torch.Tensor, torch.Tensor], None]
Finish = Callable[[lmdb.Transaction, bool], None]


class FlushWriter:
    """One flush: a single LMDB write transaction that first merges the staged rows, then the
    dirty rows sent with :meth:`write`, and becomes durable on :meth:`commit`.

    Use it from the thread that called :meth:`SSDTier.flush_begin` (LMDB write transactions
    belong to their thread). As a context manager it commits on normal exit, aborts on error.
    """

    def __init__(
        self, path: pathlib.Path, txn: lmdb.Transaction, merge: Merge, finish: Finish
    ) -> None:
        self._path, self._merge, self._finish = path, merge, finish
        self._thread = threading.get_ident()
        self._txn: lmdb.Transaction | None = txn

    def on_this_thread(self) -> bool:
        """Whether the calling thread is the one that began this flush."""
        return threading.get_ident() == self._thread

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Adds a chunk of dirty rows (ids sorted ascending, unique) to the flush."""
        self._check_open()
        try:
            self._merge(self._txn, ids, rows)
        except BaseException:
            self._end(commit=False)  # LMDB needs the failed transaction aborted
            raise

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
            raise RuntimeError(f"{self._path}: this flush was already committed or aborted")
        if not self.on_this_thread():
            raise RuntimeError(f"{self._path}: a flush must be used by the thread that began it")

    def _end(self, commit: bool) -> None:
        txn, self._txn = self._txn, None
        self._finish(txn, commit)
