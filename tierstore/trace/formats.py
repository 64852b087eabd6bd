"""Trace formats and their readers: streams of embedding row ids, one stream per table.

A trace is a sequence of row ids for each of one or more tables (each table its own id space).
Readers stream it as :class:`TraceChunk` s: ``(table, ids)`` with ``ids`` a 1-D ``int64``
array, at most ``chunk_size`` ids (or rows, for row formats) at a time, so that a trace far
larger than memory can be converted or scanned. :func:`read_trace` picks the reader from the
file's magic bytes or its extension; :func:`load_trace` gathers a whole trace in memory;
:mod:`tierstore.trace.writers` writes every writable format.

Formats (``fmt`` names):

``tst``      this module's binary format (below), read with ``np.memmap``; ``.tst``.
``tst.zst``  the same bytes compressed with zstd, read through a zstd stream reader in chunks
             (never decompressed whole); ``.tst.zst``.
``csv``      CSV or TSV with a header or not: ``id_col`` names the id column (a header name or
             a 0-based index; default: the column named ``id``, else column 0), ``table_col``
             optionally the table column (any text; tables are numbered in order of first
             appearance), ``sort_col`` optionally a numeric column to order the requests by (a
             stable sort, e.g. a timestamp; this one reads the whole file into memory, 16
             bytes per row); ``delimiter`` defaults to a tab for ``.tsv``, else a comma;
             ``header`` defaults to "the first row is a header if its id field is not an
             integer". ``.csv``, ``.tsv``.
``criteo``   Criteo's TSV: a label, 13 integer features, 26 categorical features as hex
             strings (up to 16 hex digits). Each categorical column is a table (``C1`` ..
             ``C26``); an empty field is a missing value and is skipped. A ``.txt`` file whose
             first line has 40 tab-separated fields is read as Criteo.
``text``     one decimal id per line (blank lines are skipped); ``.txt``, ``.ids``.
``npy``      a NumPy ``.npy`` integer array: 1-D is one table, 2-D ``(requests, tables)``
             holds a table per column.

Ids are 64-bit words. ``uint64`` ids above ``2**63 - 1`` (and hex ids of 16 digits) are kept
as the ``int64`` with the same bits, the way the engine takes hashed row ids.

The binary format, version 1 (every integer little-endian)::

    offset      size  field
    0           8     magic: the bytes  54 53 54 52 41 43 45 00  (b"TSTRACE\\0")
    8           2     version, uint16: 1
    10          1     dtype code, uint8: 1 = int32, 2 = int64, 3 = uint64
    11          1     reserved, uint8: 0
    12          4     T, the number of tables, uint32 (at least 1)
    16          8     D, the data offset, uint64: where the first id starts (a multiple of 64)
    24          8*T   the number of ids of each table, uint64 each: n_0, n_1, ..., n_{T-1}
    24+8T       ...   the table names: for each table, a uint16 byte length L then L bytes
                      of UTF-8 (L may be 0)
    ...         ...   zero bytes up to D
    D           ...   the ids, table after table: n_0 ids of table 0, then n_1 of table 1, ...
                      each id ``itemsize`` bytes (4 or 8) in the dtype above

so table ``t`` starts at byte ``D + itemsize * (n_0 + ... + n_{t-1})`` and
``np.memmap(path, dtype, "r", offset, (n_t,))`` reads it; the file is exactly
``D + itemsize * sum(n)`` bytes long. Within a table the ids are in request order; the order
between tables is not kept (each table is replayed against its own cache). The ``.tst.zst``
variant is this very byte stream as one or more zstd frames.

Malformed input raises :class:`TraceFormatError` (a ``ValueError``) naming the file and the
line or byte offset at fault; a damaged length field is checked against the header's bounds
before anything is read, and reads are never larger than what the file holds, so no damaged
file makes a reader allocate what its header claims. A ``.tst.zst`` header longer than
``MAX_STREAM_HEADER`` bytes (64 MiB) is refused.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from ..errors import InvalidInputError
from ..validate import as_id_array

MAGIC = b"TSTRACE\x00"
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NPY_MAGIC = b"\x93NUMPY"
DTYPE_CODES: dict[str, int] = {"int32": 1, "int64": 2, "uint64": 3}
_CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
_FIXED = struct.Struct("<8sHBBIQ")  # magic, version, dtype code, reserved, T, D
DEFAULT_CHUNK = 1 << 20
# Bytes read per call: a damaged length field cannot make a read allocate more than this
# beyond what the file really holds.
_READ_PIECE = 1 << 20
# The largest header (the data offset) read from a stream (``.tst.zst``), whose length is not
# known ahead: a damaged header cannot make the reader decompress gigabytes of it. The
# writer's headers take 8 bytes per table plus the names.
MAX_STREAM_HEADER = 1 << 26
FORMATS = ("tst", "tst.zst", "csv", "criteo", "text", "npy")
WRITABLE = ("tst", "tst.zst", "csv", "text", "npy")
CRITEO_FIELDS = 40  # label, I1..I13, C1..C26
CRITEO_FIRST_CAT = 14


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


@dataclass
class Trace:
    """A whole trace in memory: one int64 id array per table, and the tables' names."""

    tables: list[np.ndarray]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = [as_id_array(t, "trace table") for t in self.tables]
        if not self.names:
            self.names = [str(i) for i in range(len(self.tables))]
        if len(self.names) != len(self.tables):
            raise InvalidInputError(
                f"Trace has {len(self.tables)} tables but {len(self.names)} names"
            )

    @property
    def requests(self) -> int:
        """Ids over all tables."""
        return sum(int(t.size) for t in self.tables)

    def chunks(self, chunk_size: int = DEFAULT_CHUNK) -> Iterator[TraceChunk]:
        """The trace as a chunk stream, table after table."""
        for t, ids in enumerate(self.tables):
            for a in range(0, ids.size, chunk_size):
                yield TraceChunk(t, ids[a : a + chunk_size])


# ---------------------------------------------------------------------------------------------
# The binary header


@dataclass
class BinaryHeader:
    """The header of a ``.tst`` trace (see the module docstring for the byte layout)."""

    dtype: str
    counts: list[int]
    names: list[str]
    data_offset: int = 0

    @property
    def itemsize(self) -> int:
        """Bytes per id."""
        return np.dtype(self.dtype).itemsize

    @property
    def data_bytes(self) -> int:
        """Bytes of ids after the header."""
        return self.itemsize * sum(self.counts)

    def pack(self) -> bytes:
        """The header bytes, padded with zeros to the data offset (which it sets)."""
        if len(self.counts) != len(self.names) or not self.counts:
            raise InvalidInputError("a trace needs at least one table and one name per table")
        body = bytearray()
        for n in self.counts:
            body += struct.pack("<Q", n)
        for name in self.names:
            raw = name.encode("utf-8")
            if len(raw) > 0xFFFF:
                raise InvalidInputError(f"table name of {len(raw)} bytes (at most 65535)")
            body += struct.pack("<H", len(raw)) + raw
        end = _FIXED.size + len(body)
        self.data_offset = -(-end // 64) * 64
        fixed = _FIXED.pack(
            MAGIC, VERSION, DTYPE_CODES[self.dtype], 0, len(self.counts), self.data_offset
        )
        return fixed + bytes(body) + bytes(self.data_offset - end)

    @classmethod
    def read(cls, f: BinaryIO, path, stream: bool = False) -> BinaryHeader:
        """Parses a header from the start of ``f`` and leaves ``f`` at the first id. Every
        length is checked against the data offset, and ``stream`` (a decompressed stream, of
        no known length) refuses a data offset above ``MAX_STREAM_HEADER``."""
        fixed = _read_exact(f, _FIXED.size, path, 0, "the header")
        magic, version, code, _, ntab, offset = _FIXED.unpack(fixed)
        if magic != MAGIC:
            raise TraceFormatError(
                path, f"bad magic {magic!r}, expected {MAGIC!r} (not a .tst trace)", offset=0
            )
        if version != VERSION:
            raise TraceFormatError(path, f"format version {version}, this reads 1", offset=8)
        if code not in _CODE_DTYPES:
            raise TraceFormatError(path, f"unknown dtype code {code} (1, 2 or 3)", offset=10)
        if ntab == 0:
            raise TraceFormatError(path, "table count is 0", offset=12)
        if stream and offset > MAX_STREAM_HEADER:
            raise TraceFormatError(
                path,
                f"data offset {offset} is beyond the largest header read from a stream "
                f"({MAX_STREAM_HEADER} bytes)",
                offset=16,
            )
        if _FIXED.size + 8 * ntab > offset:
            raise TraceFormatError(
                path,
                f"{ntab} tables need {_FIXED.size + 8 * ntab} bytes of header, past the data "
                f"offset {offset}",
                offset=12,
            )
        pos = _FIXED.size
        raw = _read_exact(f, 8 * ntab, path, pos, "the table counts")
        counts = list(struct.unpack(f"<{ntab}Q", raw))
        pos += 8 * ntab
        names = []
        for _ in range(ntab):
            (length,) = struct.unpack("<H", _read_exact(f, 2, path, pos, "a table name"))
            if pos + 2 + length > offset:
                raise TraceFormatError(
                    path, f"a table name of {length} bytes runs past the data offset {offset}",
                    offset=pos,
                )  # fmt: skip
            raw = _read_exact(f, length, path, pos + 2, "a table name")
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise TraceFormatError(path, "a table name is not UTF-8", offset=pos + 2) from e
            pos += 2 + length
        if offset < pos:
            raise TraceFormatError(
                path, f"data offset {offset} lies inside the header ({pos} bytes)", offset=16
            )
        _read_exact(f, offset - pos, path, pos, "the header padding")
        return cls(_CODE_DTYPES[code], counts, names, offset)


def _read_exact(f: BinaryIO, n: int, path, offset: int, what: str) -> bytes:
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


def _to_int64(a: np.ndarray) -> np.ndarray:
    """A fresh int64 copy; uint64 keeps its bits (ids above 2**63 - 1 turn negative)."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 8:
        return a.view(np.dtype(a.dtype.byteorder + "i8")).astype(np.int64)
    return a.astype(np.int64)


def _ids_from_bytes(raw: bytes, dtype: str) -> np.ndarray:
    return _to_int64(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")))


# ---------------------------------------------------------------------------------------------
# Readers


class TraceReader:
    """A re-iterable stream of :class:`TraceChunk` s read from one file.

    ``table_names`` lists the tables seen so far (all of them once iteration has ended; at once
    for formats that declare them up front).
    """

    fmt = ""

    def __init__(self, path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK):
        self.path = Path(path)
        if chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.table_names: list[str] = []

    def __iter__(self) -> Iterator[TraceChunk]:
        raise NotImplementedError

    def load(self) -> Trace:
        """Reads everything into a :class:`Trace`."""
        parts: dict[int, list[np.ndarray]] = {}
        for chunk in self:
            parts.setdefault(chunk.table, []).append(chunk.ids)
        tables = [
            np.concatenate(parts[t]) if t in parts else np.empty(0, np.int64)
            for t in range(len(self.table_names))
        ]
        return Trace(tables, list(self.table_names))


class BinaryReader(TraceReader):
    """The ``.tst`` format through ``np.memmap`` (no copy of the file in memory)."""

    fmt = "tst"

    def __init__(self, path, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(path, chunk_size)
        with open(self.path, "rb") as f:
            self.header = BinaryHeader.read(f, self.path)
        self.table_names = list(self.header.names)
        size = self.path.stat().st_size
        want = self.header.data_offset + self.header.data_bytes
        if size < want:
            raise TraceFormatError(
                self.path,
                f"truncated: the header promises {sum(self.header.counts)} ids "
                f"({want} bytes in all), the file ends early",
                offset=size,
            )
        if size > want:
            raise TraceFormatError(self.path, f"{size - want} bytes after the last id", offset=want)

    def table(self, t: int) -> np.ndarray:
        """Table ``t``'s ids as a read-only memmap in the stored dtype (no copy)."""
        h = self.header
        n = h.counts[t]
        if n == 0:
            return np.empty(0, np.dtype(h.dtype))
        start = h.data_offset + h.itemsize * sum(h.counts[:t])
        dt = np.dtype(h.dtype).newbyteorder("<")
        return np.memmap(self.path, dtype=dt, mode="r", offset=start, shape=(n,))

    def __iter__(self) -> Iterator[TraceChunk]:
        for t in range(len(self.header.counts)):
            mm = self.table(t)
            for a in range(0, mm.size, self.chunk_size):
                yield TraceChunk(t, _to_int64(np.asarray(mm[a : a + self.chunk_size])))


class ZstdBinaryReader(TraceReader):
    """The ``.tst.zst`` format, decompressed as a stream, ``chunk_size`` ids at a time."""

    fmt = "tst.zst"

    def __init__(self, path, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(path, chunk_size)
        with self._stream() as s:
            self.header = BinaryHeader.read(s, self.path, stream=True)
        self.table_names = list(self.header.names)

    @contextlib.contextmanager
    def _stream(self) -> Iterator[BinaryIO]:
        """The decompressed byte stream; zstd errors become a TraceFormatError."""
        import zstandard

        with open(self.path, "rb") as raw:
            try:
                # closefd=False: raw stays open for the error's position
                with zstandard.ZstdDecompressor().stream_reader(
                    raw, read_across_frames=True, closefd=False
                ) as s:
                    yield s
            except zstandard.ZstdError as e:
                raise TraceFormatError(
                    self.path,
                    f"zstd data does not decode (compressed position): {e}",
                    offset=raw.tell(),
                ) from e

    def __iter__(self) -> Iterator[TraceChunk]:
        h = self.header
        with self._stream() as s:
            BinaryHeader.read(s, self.path, stream=True)
            pos = h.data_offset  # offset in the decompressed stream
            for t, n in enumerate(h.counts):
                left = n
                while left:
                    k = min(left, self.chunk_size)
                    raw = _read_exact(s, k * h.itemsize, self.path, pos, "the ids (decompressed)")
                    pos += len(raw)
                    left -= k
                    yield TraceChunk(t, _ids_from_bytes(raw, h.dtype))
            if s.read(1):
                raise TraceFormatError(self.path, "data after the last id", offset=pos)


class NpyReader(TraceReader):
    """A ``.npy`` integer array (memory-mapped): 1-D one table, 2-D a table per column."""

    fmt = "npy"

    def __init__(self, path, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(path, chunk_size)
        try:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy's header parser raises many kinds (SyntaxError, ...)
            raise TraceFormatError(
                self.path, f"not a readable .npy array: {type(e).__name__}: {e}", offset=0
            ) from e
        a = self.array
        if a.ndim not in (1, 2) or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise TraceFormatError(
                self.path, f"need a 1-D or 2-D integer array, got {a.dtype} {a.shape}"
            )
        self.table_names = [str(i) for i in range(1 if a.ndim == 1 else a.shape[1])]

    def __iter__(self) -> Iterator[TraceChunk]:
        a = self.array
        cols = [a] if a.ndim == 1 else [a[:, j] for j in range(a.shape[1])]
        for start in range(0, a.shape[0], self.chunk_size):
            for t, col in enumerate(cols):
                yield TraceChunk(
                    t, as_id_array(np.asarray(col[start : start + self.chunk_size]), "")
                )


class TextReader(TraceReader):
    """One decimal id per line; blank lines are skipped."""

    fmt = "text"
    _BLOCK = 1 << 24  # bytes parsed per numpy call

    def __init__(self, path, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(path, chunk_size)
        self.table_names = ["0"]

    def __iter__(self) -> Iterator[TraceChunk]:
        line = 1  # number of the first line of the block
        pending: list[np.ndarray] = []
        have = 0
        with open(self.path, "rb") as f:
            tail = b""
            while True:
                block = f.read(self._BLOCK)
                data = tail + block
                if not block:
                    body, tail = data, b""
                else:
                    cut = data.rfind(b"\n") + 1
                    body, tail = data[:cut], data[cut:]
                if body:
                    ids = self._parse(body, line)
                    line += body.count(b"\n")
                    pending.append(ids)
                    have += ids.size
                    while have >= self.chunk_size:
                        allids = np.concatenate(pending)
                        yield TraceChunk(0, allids[: self.chunk_size])
                        rest = allids[self.chunk_size :]
                        pending, have = [rest], rest.size
                if not block:
                    break
        if have:
            yield TraceChunk(0, np.concatenate(pending))

    def _parse(self, body: bytes, first_line: int) -> np.ndarray:
        if not body.strip():
            return np.empty(0, np.int64)
        try:
            ids = np.loadtxt(io.BytesIO(body), dtype=np.int64, comments=None, ndmin=1)
            if ids.ndim == 1:
                return ids
        except ValueError:
            pass
        # Slow path, only to name the line at fault.
        for k, raw in enumerate(body.split(b"\n")):
            text = raw.strip()
            if not text:
                continue
            try:
                v = int(text)
                if not -(1 << 63) <= v < (1 << 63):
                    raise ValueError
            except ValueError:
                shown = text[:40].decode("utf-8", "replace")
                raise TraceFormatError(
                    self.path, f"not an int64 id: {shown!r}", line=first_line + k
                ) from None
        raise TraceFormatError(self.path, "unreadable block", line=first_line)


def _parse_int_column(values: list[str], path, lines: list[int], what: str) -> np.ndarray:
    """Decimal strings to int64; on failure, names the first bad value's line."""
    try:
        return np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, OverflowError):
        pass
    for v, ln in zip(values, lines):
        try:
            x = int(v)
            if not -(1 << 63) <= x < (1 << 63):
                raise ValueError
        except ValueError:
            raise TraceFormatError(path, f"{what} {v[:40]!r} is not an int64", line=ln) from None
    raise AssertionError("unreachable")


class CsvReader(TraceReader):
    """CSV/TSV with a column map: the id column, and optionally a table and a sort column."""

    fmt = "csv"

    def __init__(
        self,
        path,
        chunk_size: int = DEFAULT_CHUNK,
        *,
        id_col: str | int | None = None,
        table_col: str | int | None = None,
        sort_col: str | int | None = None,
        delimiter: str | None = None,
        header: bool | None = None,
    ):
        super().__init__(path, chunk_size)
        if delimiter is None:
            delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        self.delimiter = delimiter
        self.spec = {"id": id_col, "table": table_col, "sort": sort_col}
        self.header = header
        self._tables: dict[str, int] = {}
        if table_col is None:
            self.table_names = ["0"]

    def _rows(self, f):
        return csv.reader(f, delimiter=self.delimiter)

    def _looks_like_header(self, first: list[str]) -> bool:
        spec = self.spec["id"]
        if isinstance(spec, str) and not spec.isdigit():
            return True  # columns named, so there must be a header
        if spec is None and "id" in first:
            return True
        probe = 0 if spec is None else int(spec)
        try:
            int(first[probe])
        except (ValueError, IndexError):
            return True
        return False

    def _columns(self, first: list[str]) -> tuple[dict[str, int | None], bool]:
        """Resolves the column map against the first row; says whether that row is a header."""
        header = self._looks_like_header(first) if self.header is None else self.header
        cols: dict[str, int | None] = {}
        for role, spec in self.spec.items():
            if spec is None:
                cols[role] = None
            elif isinstance(spec, int):
                cols[role] = spec
            elif header and spec in first:
                cols[role] = first.index(spec)
            elif spec.isdigit():  # an index given as text, e.g. on the command line
                cols[role] = int(spec)
            elif not header:
                raise TraceFormatError(
                    self.path,
                    f"{role} column {spec!r} named, but the file has no header",
                    line=1,
                )
            else:
                raise TraceFormatError(
                    self.path, f"no {role} column {spec!r}; the header has {first}", line=1
                )
        if cols["id"] is None:
            cols["id"] = first.index("id") if header and "id" in first else 0
        return cols, header

    def _table_index(self, name: str) -> int:
        t = self._tables.get(name)
        if t is None:
            t = self._tables[name] = len(self._tables)
            self.table_names.append(name)
        return t

    def _batches(self) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """(ids, table index per id or None, sort key per id or None), chunk_size rows each."""
        self._tables = {}
        if self.spec["table"] is not None:
            self.table_names = []
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = self._rows(f)
            try:
                first = next(rows)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise TraceFormatError(self.path, str(e), line=1) from e
            cols, is_header = self._columns(first)
            need = max(c for c in cols.values() if c is not None)
            pending = [] if is_header else [(first, 1)]
            while True:
                try:
                    for row in islice(rows, self.chunk_size - len(pending)):
                        pending.append((row, rows.line_num))
                except (csv.Error, UnicodeDecodeError) as e:
                    raise TraceFormatError(self.path, str(e), line=rows.line_num + 1) from e
                pending = [(r, ln) for r, ln in pending if r]  # blank lines
                if not pending:
                    return
                lines = [ln for _, ln in pending]
                for r, ln in pending:
                    if len(r) <= need:
                        names = {c: role for role, c in cols.items() if c is not None}
                        missing = [f"{names[c]} (column {c})" for c in names if c >= len(r)]
                        raise TraceFormatError(
                            self.path,
                            f"row has {len(r)} fields; missing {', '.join(missing)}",
                            line=ln,
                        )
                ids = _parse_int_column(
                    [r[cols["id"]].strip() for r, _ in pending], self.path, lines, "id"
                )
                tables = None
                if cols["table"] is not None:
                    tables = np.fromiter(
                        (self._table_index(r[cols["table"]]) for r, _ in pending),
                        dtype=np.int64,
                        count=len(pending),
                    )
                keys = None
                if cols["sort"] is not None:
                    keys = self._sort_keys([r[cols["sort"]] for r, _ in pending], lines)
                yield ids, tables, keys
                pending = []

    def _sort_keys(self, values: list[str], lines: list[int]) -> np.ndarray:
        try:
            return np.array(values, dtype=np.float64)
        except ValueError:
            for v, ln in zip(values, lines):
                try:
                    float(v)
                except ValueError:
                    raise TraceFormatError(
                        self.path, f"sort key {v[:40]!r} is not a number", line=ln
                    ) from None
            raise

    def __iter__(self) -> Iterator[TraceChunk]:
        if self.spec["sort"] is None:
            for ids, tables, _ in self._batches():
                yield from _split_tables(ids, tables)
            return
        # A sort needs every row: gather ids, tables and keys, sort stably, then stream out.
        parts = list(self._batches())
        if not parts:
            return
        ids = np.concatenate([p[0] for p in parts])
        keys = np.concatenate([p[2] for p in parts])
        tables = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        order = np.argsort(keys, kind="stable")
        ids = ids[order]
        tables = None if tables is None else tables[order]
        for a in range(0, ids.size, self.chunk_size):
            sl = slice(a, a + self.chunk_size)
            yield from _split_tables(ids[sl], None if tables is None else tables[sl])


def _split_tables(ids: np.ndarray, tables: np.ndarray | None) -> Iterator[TraceChunk]:
    if tables is None:
        yield TraceChunk(0, ids)
        return
    for t in np.unique(tables).tolist():
        yield TraceChunk(int(t), ids[tables == t])


_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def parse_hex(values: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """Hex strings (up to 16 digits) to int64 ids, vectorised.

    Returns ``(ids, present, bad)``: ``ids`` for the non-empty values, ``present`` a bool per
    value (empty means missing), and the index of the first invalid value or -1.
    """
    arr = np.array(values, dtype="S")
    n = arr.size
    width = arr.dtype.itemsize
    if n == 0 or width == 0:
        return np.empty(0, np.int64), np.zeros(n, bool), -1
    if width > 16:
        lens = np.char.str_len(arr)
        return np.empty(0, np.int64), lens > 0, int(np.argmax(lens > 16))
    u8 = arr.view(np.uint8).reshape(n, width)
    nib = _HEX[u8]
    length = np.count_nonzero(u8, axis=1)
    pos = np.arange(width)
    inside = pos[None, :] < length[:, None]
    bad_rows = np.flatnonzero(((nib == 255) & inside).any(axis=1))
    if bad_rows.size:
        return np.empty(0, np.int64), length > 0, int(bad_rows[0])
    shift = (4 * (length[:, None] - 1 - pos[None, :])).clip(min=0).astype(np.uint64)
    vals = np.where(inside, nib.astype(np.uint64) << shift, np.uint64(0)).sum(
        axis=1, dtype=np.uint64
    )
    present = length > 0
    return vals[present].view(np.int64), present, -1


class CriteoReader(TraceReader):
    """Criteo TSV: each of the 26 categorical hex columns is a table; empty fields skipped.
    A row may stop early (trailing empty fields stripped, as some copies of the dataset are):
    the missing fields are empty; a row without even one categorical field is refused."""

    fmt = "criteo"

    def __init__(self, path, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(path, chunk_size)
        self.table_names = [f"C{k + 1}" for k in range(CRITEO_FIELDS - CRITEO_FIRST_CAT)]

    def __iter__(self) -> Iterator[TraceChunk]:
        first_line = 1
        with open(self.path, "rb") as f:
            while True:
                lines = list(islice(f, self.chunk_size))
                if not lines:
                    return
                rows = [ln.rstrip(b"\r\n").split(b"\t") for ln in lines]
                for k, r in enumerate(rows):
                    if not CRITEO_FIRST_CAT < len(r) <= CRITEO_FIELDS:
                        raise TraceFormatError(
                            self.path,
                            f"{len(r)} tab-separated fields, Criteo rows have {CRITEO_FIELDS} "
                            f"(at least {CRITEO_FIRST_CAT + 1} where trailing empty ones are cut)",
                            line=first_line + k,
                        )
                    if len(r) < CRITEO_FIELDS:  # trailing empty fields stripped
                        r += [b""] * (CRITEO_FIELDS - len(r))
                columns = list(zip(*rows))[CRITEO_FIRST_CAT:]
                for t, col in enumerate(columns):
                    ids, _, bad = parse_hex(col)
                    if bad >= 0:
                        raise TraceFormatError(
                            self.path,
                            f"column C{t + 1}: {col[bad][:40]!r} is not a hex id "
                            "(at most 16 hex digits)",
                            line=first_line + bad,
                        )
                    if ids.size:
                        yield TraceChunk(t, ids)
                first_line += len(lines)


READERS: dict[str, type[TraceReader]] = {
    "tst": BinaryReader,
    "tst.zst": ZstdBinaryReader,
    "csv": CsvReader,
    "criteo": CriteoReader,
    "text": TextReader,
    "npy": NpyReader,
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in (".tst.zst", ".tst", ".npy", ".csv", ".tsv", ".txt", ".ids", ".zst"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing file, from its magic bytes, then its extension and content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0)
            first = f.readline(1 << 16)
    except OSError as e:
        raise TraceFormatError(path, f"cannot open: {e.strerror}") from e
    if head.startswith(MAGIC):
        return "tst"
    if head.startswith(ZSTD_MAGIC):
        return "tst.zst"
    if head.startswith(NPY_MAGIC):
        return "npy"
    ext = _suffix(path)
    if ext in (".tst", ".tst.zst", ".npy"):
        raise TraceFormatError(path, f"bad magic {head!r} for a {ext} file", offset=0)
    if first.count(b"\t") == CRITEO_FIELDS - 1 and first.split(b"\t", 1)[0] in (b"0", b"1"):
        return "criteo"
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".txt", ".ids", "") or first.strip().lstrip(b"-+").isdigit():
        return "text"
    raise TraceFormatError(
        path, f"cannot tell the trace format (extension {ext!r}); pass fmt= one of {FORMATS}"
    )


def format_for_output(path: str | os.PathLike) -> str:
    """The format a new file gets from its extension."""
    ext = _suffix(Path(path))
    fmt = {
        ".tst": "tst",
        ".tst.zst": "tst.zst",
        ".zst": "tst.zst",
        ".npy": "npy",
        ".csv": "csv",
        ".tsv": "csv",
        ".txt": "text",
        ".ids": "text",
    }.get(ext)
    if fmt is None:
        raise InvalidInputError(
            f"{os.fspath(path)}: cannot tell the output format from extension {ext!r}; "
            f"use one of .tst .tst.zst .npy .csv .tsv .txt, or pass fmt= one of {WRITABLE}"
        )
    return fmt


def read_trace(
    path: str | os.PathLike, fmt: str | None = None, *, chunk_size: int = DEFAULT_CHUNK, **opts
) -> TraceReader:
    """A chunked reader of the trace at ``path`` (format detected when ``fmt`` is None).

    ``opts`` are the format's options (``csv``: ``id_col``, ``table_col``, ``sort_col``,
    ``delimiter``, ``header``). Iterating the reader yields :class:`TraceChunk` s.
    """
    if not Path(path).exists():
        raise TraceFormatError(path, "no such file")
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise InvalidInputError(f"unknown trace format {fmt!r}; known: {FORMATS}")
    if opts and fmt != "csv":
        raise InvalidInputError(f"format {fmt!r} takes no options, got {sorted(opts)}")
    return READERS[fmt](path, chunk_size, **opts)


def load_trace(path: str | os.PathLike, fmt: str | None = None, **opts) -> Trace:
    """The whole trace at ``path`` in memory (see :func:`read_trace`)."""
    return read_trace(path, fmt, **opts).load()
