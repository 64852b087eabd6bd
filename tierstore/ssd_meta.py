"""The SSD tier's metadata: two sealed values in the ``meta`` database of the table's LMDB
environment, ``meta`` (the table's JSON metadata) and ``flush_count`` (flushes committed).

Sealed as blocks are (:func:`tierstore.blocks.seal`): a value ends with the CRC-32 of its key
and body, so a damaged metadata value is refused (:class:`CorruptBlockError`), never read.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tierstore.blocks import BadBlock, check, seal
from tierstore.errors import CorruptBlockError, TableMismatchError

META_KEY = b"meta"
FLUSH_KEY = b"flush_count"


def seal_value(key: bytes, body: bytes) -> bytes:
    """A metadata value: its body and the CRC-32 of key and body (the block trailer)."""
    return seal([key], [body])[0]


def unseal(path: pathlib.Path, key: bytes, value: bytes | None) -> bytes:
    """The body of a sealed metadata value; CorruptBlockError if it is missing or damaged."""
    if value is None:
        raise CorruptBlockError(f"{path}: the stored metadata has no {key.decode()!r} entry")
    try:
        check([value], [key])
    except BadBlock as bad:
        raise CorruptBlockError(
            f"{path}: damaged metadata entry {key.decode()!r}: {bad.problem}"
        ) from None
    return value[:-4]


def check_meta(path: pathlib.Path, meta: Any, count: bytes, version: int) -> int:
    """Validates the stored metadata's SSD keys by type and range; returns the flush count."""

    def bad(what: str) -> CorruptBlockError:
        return CorruptBlockError(f"{path}: stored metadata is invalid: {what}")

    if not isinstance(meta, dict):
        raise bad(f"a JSON {type(meta).__name__}, expected an object")
    if meta.get("format_version") != version:
        raise TableMismatchError(
            f"{path}: table has format_version={meta.get('format_version')!r}, this code "
            f"reads {version}"
        )

    def integer(key: str, lo: int, hi: int) -> int:
        value = meta.get(key)
        if type(value) is not int or not lo <= value <= hi:
            raise bad(f"{key}={value!r}, expected an int in [{lo}, {hi}]")
        return value

    integer("row_width", 1, 1 << 24)
    block_rows = integer("block_rows", 1, 1 << 16)
    if block_rows & (block_rows - 1):
        raise bad(f"block_rows={block_rows}, expected a power of two")
    integer("compression_level", -7, 22)
    try:
        flushes = int(count.decode("ascii"))
    except ValueError:
        raise bad(f"flush count {count[:20]!r} is not an integer") from None
    if flushes < 0:
        raise bad(f"flush count {flushes} is negative")
    return flushes


def refuse_unsealed(path: pathlib.Path, raw: bytes, version: int) -> None:
    """For a ``meta`` value whose checksum fails: a table of another format version (version 1
    stored plain JSON) is refused as such (TableMismatchError); returns if it is damage."""
    try:
        stored = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        return
    if stored == version:
        return  # a current table whose checksum fails: damaged
    raise TableMismatchError(
        f"{path}: table has format_version={stored!r}, this code reads {version} (version 1 "
        "tables carry no checksums: read the rows with the tierstore that wrote them and "
        "write them into a new table)"
    )
