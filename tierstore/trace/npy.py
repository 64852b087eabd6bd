"""The ``npy`` format: a NumPy ``.npy`` integer array, read memory-mapped: reader and writer.

A 1-D array is one table; a 2-D ``(requests, tables)`` array holds a table per column, the
column index being the table, and its rows are the request order (row by row, column by
column).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..validate import as_id_array
from .base import (
    DEFAULT_CHUNK,
    RequestChunk,
    TableSource,
    TraceFormatError,
    TraceReader,
    WriteOptions,
)

NPY_MAGIC = b"\x93NUMPY"


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

    def requests(self) -> Iterator[RequestChunk]:
        a = self.array
        width = len(self.table_names)
        for start in range(0, a.shape[0], self.chunk_size):
            block = np.asarray(a[start : start + self.chunk_size])
            ids = as_id_array(block.reshape(-1), "")  # row-major: the request order
            yield RequestChunk(np.tile(np.arange(width, dtype=np.int64), block.shape[0]), ids)


def write(path: Path, src: TableSource, options: WriteOptions) -> None:
    """Writes the one table of ``src`` as a 1-D int64 array, chunk by chunk through a memmap."""
    src.one_table(path, "npy")
    if src.counts[0] == 0:
        np.save(path, np.empty(0, np.int64))
        return
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(src.counts[0],))
    a = 0
    for ids in src.table_chunks(0):
        mm[a : a + ids.size] = ids
        a += ids.size
    mm.flush()
    del mm
