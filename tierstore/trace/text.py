"""The ``text`` format: one decimal id per line, one table (``.txt``, ``.ids``): reader and
writer. Blank lines are skipped."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import (
    DEFAULT_CHUNK,
    TableSource,
    TraceChunk,
    TraceFormatError,
    TraceReader,
    WriteOptions,
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


def write(path: Path, src: TableSource, options: WriteOptions) -> None:
    """Writes the one table of ``src``, an id a line."""
    src.one_table(path, "text")
    with open(path, "w", encoding="utf-8") as f:
        for ids in src.table_chunks(0):
            if ids.size:
                f.write("\n".join(map(str, ids.tolist())) + "\n")
