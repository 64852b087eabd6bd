"""The ``csv`` format: CSV or TSV with a column map (``.csv``, ``.tsv``): reader and writer.

``id_col`` names the id column (a header name or a 0-based index; default: the column named
``id``, else column 0), ``table_col`` optionally the table column (any text; tables are
numbered in order of first appearance), ``sort_col`` optionally a numeric column to order the
requests by (a stable sort, e.g. a timestamp; this one reads the whole file into memory, 16
bytes per row); ``delimiter`` defaults to a tab for ``.tsv``, else a comma; ``header`` defaults
to "the first row is a header if its id field is not an integer". The rows (sorted, with
``sort_col``) are the request order. The writer writes a ``table,id`` header, then each table's
ids in turn.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from .base import (
    DEFAULT_CHUNK,
    RequestChunk,
    TableSource,
    TraceFormatError,
    TraceReader,
    WriteOptions,
)


def parse_int_column(values: list[str], path, lines: list[int], what: str) -> np.ndarray:
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
                ids = parse_int_column(
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

    def requests(self) -> Iterator[RequestChunk]:
        if self.spec["sort"] is None:
            for ids, tables, _ in self._batches():
                yield RequestChunk(_or_zeros(tables, ids.size), ids)
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
        tables = _or_zeros(tables, ids.size)[order]
        for a in range(0, ids.size, self.chunk_size):
            yield RequestChunk(tables[a : a + self.chunk_size], ids[a : a + self.chunk_size])


def _or_zeros(tables: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if tables is None else tables


def write(path: Path, src: TableSource, options: WriteOptions) -> None:
    """Writes ``table,id`` rows (tab-separated for ``.tsv``), table after table."""
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delim, lineterminator="\n")
        w.writerow(["table", "id"])
        for t, name in enumerate(src.names):
            for ids in src.table_chunks(t):
                w.writerows((name, v) for v in ids.tolist())
