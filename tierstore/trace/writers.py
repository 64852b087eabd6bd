"""Writing traces in any writable format (``tierstore trace convert`` and ``generate``).

:func:`write_trace` gathers the source's tables and hands them to the format's writer (each in
its format's module, listed in :data:`tierstore.trace.formats.WRITERS`). A source is a :class:`~tierstore.trace.formats.Trace`, a reader, or per-table arrays; a stream
whose tables interleave is spooled through per-table temporary files, so a trace larger than
memory converts in chunks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InvalidInputError
from .base import DEFAULT_CHUNK, TableSource, Trace, TraceChunk, WriteOptions
from .formats import DTYPE_CODES, WRITABLE, WRITERS, format_for_output


class _Spool:
    """Per-table temporary files that collect an interleaved chunk stream, in order."""

    def __init__(self, directory: Path):
        self.dir = tempfile.TemporaryDirectory(prefix=".tstrace-", dir=directory)
        self.files: list[BinaryIO] = []
        self.counts: list[int] = []
        self.lo, self.hi = 0, 0

    def add(self, table: int, ids: np.ndarray) -> None:
        while len(self.files) <= table:
            self.files.append(open(Path(self.dir.name) / f"{len(self.files)}.bin", "w+b"))
            self.counts.append(0)
        if ids.size:
            if sum(self.counts) == 0:
                self.lo, self.hi = int(ids.min()), int(ids.max())
            else:
                self.lo, self.hi = min(self.lo, int(ids.min())), max(self.hi, int(ids.max()))
        self.files[table].write(ids.astype("<i8", copy=False).tobytes())
        self.counts[table] += ids.size

    def table_chunks(self, t: int, chunk: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
        f = self.files[t]
        f.seek(0)
        while True:
            raw = f.read(8 * chunk)
            if not raw:
                return
            yield np.frombuffer(raw, "<i8").astype(np.int64)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.dir.cleanup()


def write_trace(
    path: str | os.PathLike,
    source: Trace | Iterable[TraceChunk] | np.ndarray | Sequence[np.ndarray],
    fmt: str | None = None,
    *,
    names: Sequence[str] | None = None,
    dtype: str = "auto",
    level: int = 3,
) -> list[int]:
    """Writes a trace and returns the number of ids written per table.

    Args:
        path: the output file; its extension picks the format unless ``fmt`` is given.
        source: a :class:`Trace`, a reader (streamed, so a huge trace never sits in memory),
            one id array (a single table) or a list of id arrays (a table each).
        names: table names (default: the source's, else ``"0"``, ``"1"`` ...).
        dtype: ``tst`` formats only: ``int32``, ``int64``, ``uint64`` or ``auto`` (int32 when
            every id fits, else int64).
        level: zstd level for ``tst.zst``.
    """
    path = Path(path)
    fmt = fmt or format_for_output(path)
    if fmt not in WRITABLE:
        raise InvalidInputError(f"cannot write format {fmt!r}; writable: {WRITABLE}")
    if dtype != "auto" and dtype not in DTYPE_CODES:
        raise InvalidInputError(f"dtype must be auto, int32, int64 or uint64, got {dtype!r}")
    if isinstance(source, np.ndarray):
        source = Trace([source], list(names) if names else [])
    elif isinstance(source, (list, tuple)):
        source = Trace(list(source), list(names) if names else [])
    if isinstance(source, Trace):
        tables = source.tables
        tnames = list(names) if names else list(source.names)
        counts = [t.size for t in tables]
        nonempty = [t for t in tables if t.size]
        lo = min((int(t.min()) for t in nonempty), default=0)
        hi = max((int(t.max()) for t in nonempty), default=0)
        spool = None

        def table_chunks(t: int) -> Iterator[np.ndarray]:
            ids = tables[t]
            for a in range(0, ids.size, DEFAULT_CHUNK):
                yield ids[a : a + DEFAULT_CHUNK]
    else:
        spool = _Spool(path.parent if str(path.parent) else Path("."))
        try:
            for chunk in source:
                spool.add(chunk.table, chunk.ids)
        except BaseException:
            spool.close()
            raise
        seen = getattr(source, "table_names", None) or []
        tnames = list(names) if names else list(seen)
        tnames += [str(t) for t in range(len(tnames), len(spool.counts))]
        while len(spool.counts) < len(tnames):
            spool.add(len(spool.counts), np.empty(0, np.int64))
        counts, lo, hi = spool.counts, spool.lo, spool.hi
        table_chunks = spool.table_chunks
    try:
        if not counts:
            counts, tnames = [0], tnames or ["0"]
        if len(tnames) != len(counts):
            raise InvalidInputError(f"{len(counts)} tables but {len(tnames)} names")
        tables_out = TableSource(tnames, list(counts), lo, hi, table_chunks)
        WRITERS[fmt](path, tables_out, WriteOptions(dtype, level))
    finally:
        if spool is not None:
            spool.close()
    return list(counts)
