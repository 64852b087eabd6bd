"""The ``tst`` format (and ``tst.zst``, the same bytes through zstd): reader and writer.

``tst`` is tierstore's binary trace, read with ``np.memmap`` (no copy of the file in memory);
``tst.zst`` is the same byte stream as one or more zstd frames, read through a zstd stream
reader in chunks (never decompressed whole). Ids are 64-bit words: ``uint64`` ids above
``2**63 - 1`` are kept as the ``int64`` with the same bits, the way the engine takes hashed row
ids.

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
between tables is not kept (a replay through one cache shared by the tables merges them in
proportion: :meth:`~tierstore.trace.base.Trace.interleaved`). The ``.tst.zst``
variant is this very byte stream as one or more zstd frames.

Malformed input raises :class:`TraceFormatError` (a ``ValueError``) naming the file and the
line or byte offset at fault; a damaged length field is checked against the header's bounds
before anything is read, and reads are never larger than what the file holds, so no damaged
file makes a reader allocate what its header claims. A ``.tst.zst`` header longer than
``MAX_STREAM_HEADER`` bytes (64 MiB) is refused.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InvalidInputError
from .base import (
    DEFAULT_CHUNK,
    TableSource,
    TraceChunk,
    TraceFormatError,
    TraceReader,
    WriteOptions,
    read_exact,
    to_int64,
)

MAGIC = b"TSTRACE\x00"
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DTYPE_CODES: dict[str, int] = {"int32": 1, "int64": 2, "uint64": 3}
_CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
_FIXED = struct.Struct("<8sHBBIQ")  # magic, version, dtype code, reserved, T, D
# The largest header (the data offset) read from a stream (``.tst.zst``), whose length is not
# known ahead: a damaged header cannot make the reader decompress gigabytes of it. The
# writer's headers take 8 bytes per table plus the names.
MAX_STREAM_HEADER = 1 << 26


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
        fixed = read_exact(f, _FIXED.size, path, 0, "the header")
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
        raw = read_exact(f, 8 * ntab, path, pos, "the table counts")
        counts = list(struct.unpack(f"<{ntab}Q", raw))
        pos += 8 * ntab
        names = []
        for _ in range(ntab):
            (length,) = struct.unpack("<H", read_exact(f, 2, path, pos, "a table name"))
            if pos + 2 + length > offset:
                raise TraceFormatError(
                    path, f"a table name of {length} bytes runs past the data offset {offset}",
                    offset=pos,
                )  # fmt: skip
            raw = read_exact(f, length, path, pos + 2, "a table name")
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise TraceFormatError(path, "a table name is not UTF-8", offset=pos + 2) from e
            pos += 2 + length
        if offset < pos:
            raise TraceFormatError(
                path, f"data offset {offset} lies inside the header ({pos} bytes)", offset=16
            )
        read_exact(f, offset - pos, path, pos, "the header padding")
        return cls(_CODE_DTYPES[code], counts, names, offset)


def _ids_from_bytes(raw: bytes, dtype: str) -> np.ndarray:
    return to_int64(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")))


class BinaryReader(TraceReader):
    """The ``.tst`` format through ``np.memmap`` (no copy of the file in memory)."""

    fmt = "tst"
    keeps_order = False  # table after table

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
                yield TraceChunk(t, to_int64(np.asarray(mm[a : a + self.chunk_size])))


class ZstdBinaryReader(TraceReader):
    """The ``.tst.zst`` format, decompressed as a stream, ``chunk_size`` ids at a time."""

    fmt = "tst.zst"
    keeps_order = False

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
                    raw = read_exact(s, k * h.itemsize, self.path, pos, "the ids (decompressed)")
                    pos += len(raw)
                    left -= k
                    yield TraceChunk(t, _ids_from_bytes(raw, h.dtype))
            if s.read(1):
                raise TraceFormatError(self.path, "data after the last id", offset=pos)


def _choose_dtype(lo: int, hi: int) -> str:
    return "int32" if -(1 << 31) <= lo and hi < (1 << 31) else "int64"


def _write_binary(out: BinaryIO, src: TableSource, dtype: str) -> None:
    out.write(BinaryHeader(dtype, list(src.counts), list(src.names)).pack())
    target = np.dtype(dtype).newbyteorder("<")
    for t in range(len(src.counts)):
        for ids in src.table_chunks(t):
            if dtype == "uint64":
                out.write(ids.view(np.uint64).astype(target).tobytes())
            else:
                out.write(ids.astype(target).tobytes())


def _dtype_for(src: TableSource, dtype: str) -> str:
    if dtype == "auto":
        return _choose_dtype(src.lo, src.hi)
    if dtype == "int32" and _choose_dtype(src.lo, src.hi) != "int32":
        raise InvalidInputError(f"ids in [{src.lo}, {src.hi}] do not fit int32")
    return dtype


def write(path: Path, src: TableSource, options: WriteOptions) -> None:
    """Writes ``src`` as a ``.tst`` file in ``options.dtype``."""
    dtype = _dtype_for(src, options.dtype)
    with open(path, "wb") as f:
        _write_binary(f, src, dtype)


def write_zst(path: Path, src: TableSource, options: WriteOptions) -> None:
    """Writes ``src`` as a ``.tst.zst`` file: the ``.tst`` bytes through zstd at
    ``options.level``, streamed."""
    import zstandard

    dtype = _dtype_for(src, options.dtype)
    with open(path, "wb") as raw:
        with zstandard.ZstdCompressor(level=options.level).stream_writer(raw, closefd=False) as z:
            _write_binary(z, src, dtype)
