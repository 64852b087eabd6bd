"""What every trace format shares: the record types, the in-memory trace, the reader base.

A trace is a sequence of row ids for each of one or more tables (each table its own id space).
Readers stream it two ways:

- :class:`TraceChunk` s, ``(table, ids)`` with ``ids`` a 1-D ``int64`` array of one table, in
  that table's request order (what converting and per-table statistics need);
- :class:`RequestChunk` s, ``(tables, ids)``: requests of any tables in the order they were
  made, ``ids[i]`` a row of table ``tables[i]`` (the table is the column index in Criteo and
  2-D ``.npy`` files, the table column's value numbered by first appearance in CSV). A shared
  cache keyed by (table, id) needs this order; a format that does not keep it (``.tst``
  holds table after table) says so with ``keeps_order = False``.

Both come at most ``chunk_size`` ids (or rows, for row formats) at a time, so that a trace far
larger than memory can be converted or scanned. The formats themselves (one module each,
reader and writer together) are listed in :mod:`tierstore.trace.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from ..errors import InvalidInputError
from ..progress import progress
from ..validate import as_id_array

DEFAULT_CHUNK = 1 << 20
# Bytes read per call: a damaged length field cannot make a read allocate more than this
# beyond what the file really holds.
_READ_PIECE = 1 << 20


class TraceFormatError(InvalidInputError):
    """A trace file that cannot be read: the message names the file and the line or byte."""

    def __init__(self, path: str | os.PathLike, what: str, *, line=None, offset=None):
        where = f"line {line}: " if line is not None else ""
        where += f"byte {offset}: " if offset is not None else ""
        super().__init__(f"{os.fspath(path)}: {where}{what}")
        self.path = os.fspath(path)
        self.line = line
        self.offset = offset


class TraceChunk(NamedTuple):
    """A piece of one table's id stream, in request order."""

    table: int
    ids: np.ndarray  # 1-D int64


class RequestChunk(NamedTuple):
    """A piece of the whole request stream, in request order across tables."""

    tables: np.ndarray  # (n,) int64: the table index of each request
    ids: np.ndarray  # (n,) int64: its row id in that table


def _small_int(n: int) -> np.dtype:
    """The narrowest signed dtype that holds table indices below ``n``."""
    return np.dtype(np.int16 if n <= 1 << 15 else np.int32)


@dataclass
class Trace:
    """A whole trace in memory: one int64 id array per table, the tables' names and, where
    the format keeps it, ``order``: the table index of every request, in request order
    (``(requests,)``, a small int dtype; ``None``: the order between tables is unknown)."""

    tables: list[np.ndarray]
    names: list[str] = field(default_factory=list)
    order: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.tables = [as_id_array(t, "trace table") for t in self.tables]
        if not self.names:
            self.names = [str(i) for i in range(len(self.tables))]
        if len(self.names) != len(self.tables):
            raise InvalidInputError(
                f"Trace has {len(self.tables)} tables but {len(self.names)} names"
            )
        if self.order is not None:
            order = np.asarray(self.order)
            n = len(self.tables)
            fits = order.ndim == 1 and (order.size == 0 or 0 <= order.min() <= order.max() < n)
            if not fits or np.bincount(order.astype(np.int64), minlength=n).tolist() != [
                t.size for t in self.tables
            ]:
                raise InvalidInputError(
                    "Trace order must name each table once per id it holds, in request order"
                )
            self.order = order.astype(_small_int(len(self.tables)), copy=False)

    @classmethod
    def from_requests(cls, tables: np.ndarray, ids: np.ndarray, names: list[str]) -> Trace:
        """The trace of a request stream (``tables``, ``ids``: ``(n,)`` each, see
        :class:`RequestChunk`), keeping its order; ``names`` has one entry per table."""
        tables = np.asarray(tables, dtype=np.int64)
        perm = np.argsort(tables, kind="stable")  # each table's ids, in request order
        ends = np.cumsum(np.bincount(tables, minlength=len(names)))
        grouped = np.split(as_id_array(ids)[perm], ends[:-1]) if names else []
        return cls(grouped, list(names), tables)

    def select(self, keep: list[int]) -> Trace:
        """The trace of tables ``keep`` (indices, in this order), with their order kept."""
        order = None
        if self.order is not None:
            remap = np.full(len(self.tables), -1, np.int64)
            remap[keep] = np.arange(len(keep))
            order = remap[self.order]
            order = order[order >= 0]
        return Trace([self.tables[i] for i in keep], [self.names[i] for i in keep], order)

    @property
    def requests(self) -> int:
        """Ids over all tables."""
        return sum(int(t.size) for t in self.tables)

    def chunks(self, chunk_size: int = DEFAULT_CHUNK) -> Iterator[TraceChunk]:
        """The trace as a chunk stream, table after table."""
        for t, ids in enumerate(self.tables):
            for a in range(0, ids.size, chunk_size):
                yield TraceChunk(t, ids[a : a + chunk_size])

    def interleaved(self) -> RequestChunk:
        """Every request in request order across tables, as one :class:`RequestChunk`.

        Without ``order`` (a ``.tst`` trace, or tables given as arrays), the tables are merged
        in proportion: the ``j``-th of table ``t``'s ``n_t`` ids comes at time
        ``(j + 1/2) / n_t``, ties in table order; tables of equal length so interleave row by
        row, as Criteo's columns or a 2-D ``.npy`` array do."""
        ids = np.concatenate(self.tables) if self.tables else np.empty(0, np.int64)
        if self.order is not None:
            out = np.empty_like(ids)
            out[np.argsort(self.order, kind="stable")] = ids
            return RequestChunk(self.order.astype(np.int64), out)
        counts = [t.size for t in self.tables]
        tables = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        if len(counts) < 2:
            return RequestChunk(tables, ids)
        times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
        perm = np.argsort(times, kind="stable")
        return RequestChunk(tables[perm], ids[perm])


def to_int64(a: np.ndarray) -> np.ndarray:
    """A fresh int64 copy; uint64 keeps its bits (ids above 2**63 - 1 turn negative)."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 8:
        return a.view(np.dtype(a.dtype.byteorder + "i8")).astype(np.int64)
    return a.astype(np.int64)


def read_exact(f: BinaryIO, n: int, path, offset: int, what: str) -> bytes:
    """Reads exactly ``n`` bytes (stream readers may return less per call) or fails clearly;
    in pieces, so that a damaged ``n`` allocates no more than the file holds."""
    parts = []
    got = 0
    while got < n:
        b = f.read(min(n - got, _READ_PIECE))
        if not b:
            raise TraceFormatError(
                path,
                f"file ends inside {what} ({got} of {n} bytes there)",
                offset=offset + got,
            )
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def split_tables(ids: np.ndarray, tables: np.ndarray | None) -> Iterator[TraceChunk]:
    """A request chunk as one :class:`TraceChunk` per table present (``None``: table 0)."""
    if tables is None:
        yield TraceChunk(0, ids)
        return
    order = np.argsort(tables, kind="stable")  # one pass, however many tables
    present, starts = np.unique(tables[order], return_index=True)
    for t, part in zip(present.tolist(), np.split(ids[order], starts[1:])):
        yield TraceChunk(int(t), part)


class TraceReader:
    """A re-iterable stream of :class:`TraceChunk` s read from one file.

    ``table_names`` lists the tables seen so far (all of them once iteration has ended; at once
    for formats that declare them up front). A format either reads per table (overrides
    ``__iter__``; ``keeps_order`` False where it may hold several tables) or in request order
    (overrides :meth:`requests`, from which ``__iter__`` follows).
    """

    fmt = ""
    keeps_order = True

    def __init__(self, path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK):
        self.path = Path(path)
        if chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.table_names: list[str] = []

    def requests(self) -> Iterator[RequestChunk]:
        """The requests in the order they were made, across tables."""
        raise NotImplementedError(f"{type(self).__name__} reads table by table")

    def __iter__(self) -> Iterator[TraceChunk]:
        for chunk in self.requests():
            yield from split_tables(chunk.ids, chunk.tables)

    def load(self, desc: str | None = None) -> Trace:
        """Reads everything into a :class:`Trace` (with its ``order`` where the format keeps
        it and holds several tables); ``desc``: show a progress bar so named on a terminal."""
        if self.keeps_order and type(self).requests is not TraceReader.requests:
            parts = list(progress(self.requests(), desc or "", enabled=desc is not None))
            if len(self.table_names) > 1:
                tables = [p.tables for p in parts] or [np.empty(0, np.int64)]
                ids = [p.ids for p in parts] or [np.empty(0, np.int64)]
                return Trace.from_requests(
                    np.concatenate(tables), np.concatenate(ids), list(self.table_names)
                )
            chunks = (c for p in parts for c in split_tables(p.ids, p.tables))
        else:
            chunks = progress(self, desc or "", enabled=desc is not None)
        per_table: dict[int, list[np.ndarray]] = {}
        for chunk in chunks:
            per_table.setdefault(chunk.table, []).append(chunk.ids)
        empty = np.empty(0, np.int64)
        n = len(self.table_names)
        return Trace(
            [np.concatenate(per_table[t]) if t in per_table else empty for t in range(n)],
            list(self.table_names),
        )


@dataclass
class TableSource:
    """What a format's writer is given: the tables' names and id counts, the least and the
    greatest id over all tables, and ``table_chunks(t)``: table ``t``'s ids in order, in
    chunks (each a 1-D int64 array)."""

    names: list[str]
    counts: list[int]
    lo: int
    hi: int
    table_chunks: Callable[[int], Iterable[np.ndarray]]

    def one_table(self, path: Path, fmt: str) -> None:
        """Refuses a source of several tables for a format that holds one."""
        if len(self.counts) != 1:
            raise InvalidInputError(
                f"{os.fspath(path)}: format {fmt!r} holds one table; this trace has "
                f"{len(self.counts)} (write .tst, .tst.zst or .csv)"
            )


@dataclass
class WriteOptions:
    """Options of the writers; a format ignores those that are not its own.

    Attributes:
        dtype: ``tst`` formats: the id width, ``int32``, ``int64``, ``uint64`` or ``auto``
            (int32 when every id fits, else int64).
        level: ``tst.zst``: the zstd level.
    """

    dtype: str = "auto"
    level: int = 3
