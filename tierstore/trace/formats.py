"""The trace formats: their registry, format detection, and :func:`read_trace` /
:func:`load_trace`. Each format is one module, reader and writer together:

``tst``      :mod:`~tierstore.trace.binary`, this project's binary format (documented there byte
             by byte), read with ``np.memmap``; ``.tst``.
``tst.zst``  :mod:`~tierstore.trace.binary`, the same bytes compressed with zstd, streamed;
             ``.tst.zst``.
``csv``      :mod:`~tierstore.trace.csv_trace`, CSV or TSV with a column map (id, table, sort
             column); ``.csv``, ``.tsv``.
``criteo``   :mod:`~tierstore.trace.criteo`, Criteo's TSV: each of the 26 categorical columns
             is a table (read only).
``text``     :mod:`~tierstore.trace.text`, one decimal id per line; ``.txt``, ``.ids``.
``npy``      :mod:`~tierstore.trace.npy`, a NumPy integer array: 1-D one table, 2-D a table
             per column.

What they share (the record types, :class:`Trace`, the reader base) is in
:mod:`~tierstore.trace.base`; :func:`tierstore.trace.writers.write_trace` writes every writable
format. Adding a format is adding its module and a line in :data:`READERS` (and
:data:`WRITERS`), and its magic or extension in :func:`detect_format`.

Malformed input raises :class:`TraceFormatError` (a ``ValueError``) naming the file and the
line or byte offset at fault; a damaged length field is checked against the header's bounds
before anything is read, and reads are never larger than what the file holds, so no damaged
file makes a reader allocate what its header claims.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidInputError
from . import binary, csv_trace, npy, text
from .base import (
    DEFAULT_CHUNK,
    RequestChunk,
    TableSource,
    Trace,
    TraceChunk,
    TraceFormatError,
    TraceReader,
    WriteOptions,
)
from .binary import (
    DTYPE_CODES,
    MAGIC,
    MAX_STREAM_HEADER,
    VERSION,
    ZSTD_MAGIC,
    BinaryHeader,
    BinaryReader,
    ZstdBinaryReader,
)
from .criteo import CRITEO_FIELDS, CRITEO_FIRST_CAT, CriteoReader, parse_hex
from .csv_trace import CsvReader
from .npy import NPY_MAGIC, NpyReader
from .text import TextReader

READERS: dict[str, type[TraceReader]] = {
    "tst": BinaryReader,
    "tst.zst": ZstdBinaryReader,
    "csv": CsvReader,
    "criteo": CriteoReader,
    "text": TextReader,
    "npy": NpyReader,
}
Writer = Callable[[Path, TableSource, WriteOptions], None]
WRITERS: dict[str, Writer] = {
    "tst": binary.write,
    "tst.zst": binary.write_zst,
    "csv": csv_trace.write,
    "text": text.write,
    "npy": npy.write,
}
FORMATS = tuple(READERS)
WRITABLE = tuple(WRITERS)


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


__all__ = [  # the names this module held before the formats had a module each, and the registry
    "CRITEO_FIELDS", "CRITEO_FIRST_CAT", "DEFAULT_CHUNK", "DTYPE_CODES", "FORMATS", "MAGIC",
    "MAX_STREAM_HEADER", "NPY_MAGIC", "READERS", "VERSION", "WRITABLE", "WRITERS", "ZSTD_MAGIC",
    "BinaryHeader", "BinaryReader", "CriteoReader", "CsvReader", "NpyReader", "RequestChunk",
    "TextReader", "Trace", "TraceChunk", "TraceFormatError", "TraceReader", "ZstdBinaryReader",
    "detect_format", "format_for_output", "load_trace", "parse_hex", "read_trace",
]  # fmt: skip
