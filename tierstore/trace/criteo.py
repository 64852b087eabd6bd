"""The ``criteo`` format: Criteo's TSV (read only).

A row holds a label, 13 integer features and 26 categorical features as hex strings (up to 16
hex digits). Each categorical column is a table (``C1`` .. ``C26``, table index 0 .. 25); an
empty field is a missing value and is skipped. The rows are the request order (row by row,
column by column). A ``.txt`` file whose first line has 40 tab-separated fields is read as
Criteo.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np

from .base import DEFAULT_CHUNK, RequestChunk, TraceFormatError, TraceReader

CRITEO_FIELDS = 40  # label, I1..I13, C1..C26
CRITEO_FIRST_CAT = 14


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

    def requests(self) -> Iterator[RequestChunk]:
        first_line = 1
        width = CRITEO_FIELDS - CRITEO_FIRST_CAT
        with open(self.path, "rb") as f:
            while True:
                lines = list(islice(f, self.chunk_size))
                if not lines:
                    return
                values: list[bytes] = []  # the categorical fields, row by row
                for k, ln in enumerate(lines):
                    r = ln.rstrip(b"\r\n").split(b"\t")
                    if not CRITEO_FIRST_CAT < len(r) <= CRITEO_FIELDS:
                        raise TraceFormatError(
                            self.path,
                            f"{len(r)} tab-separated fields, Criteo rows have {CRITEO_FIELDS} "
                            f"(at least {CRITEO_FIRST_CAT + 1} where trailing empty ones are cut)",
                            line=first_line + k,
                        )
                    values += r[CRITEO_FIRST_CAT:]
                    values += [b""] * (CRITEO_FIELDS - len(r))  # trailing empty fields cut
                ids, present, bad = parse_hex(values)
                if bad >= 0:
                    raise TraceFormatError(
                        self.path,
                        f"column C{bad % width + 1}: {values[bad][:40]!r} is not a hex id "
                        "(at most 16 hex digits)",
                        line=first_line + bad // width,
                    )
                tables = np.tile(np.arange(width, dtype=np.int64), len(lines))[present]
                if ids.size:
                    yield RequestChunk(tables, ids)
                first_line += len(lines)
