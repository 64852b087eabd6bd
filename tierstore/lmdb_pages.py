"""Lookups of 8-byte keys in one LMDB snapshot, read from the mapped ``data.mdb``, off the GIL.

py-lmdb's ``getmulti`` costs about a microsecond a key on one thread, and threads cannot share
that work: it drops and retakes the GIL around every key, so two threads running it take
longer than one. A random read of the SSD tier looks up one key per row, so ``getmulti`` alone
held it under 1 M rows/s. Here a compiled loop (numba, ``nogil``) walks the B-tree of the
``blocks`` database in a read-only ``mmap`` of ``data.mdb`` and returns, for every key, where
its value lies in the file, so that several threads look keys up at once and the decoder
reads the values in place, without a copy.

Only reads of the snapshot of a read transaction that py-lmdb holds open: LMDB never reuses a
page of a snapshot that a reader still uses, so the pages walked stay as they were. The
snapshot's root is the one in the meta page whose transaction id is the transaction's. What
is read is checked: every page number is inside the file, every page has the expected kind
and bounds, every node lies inside its page; a check that fails, an on-disk format other than
LMDB 0.9's (``mm_version`` 1, little-endian, 64-bit), or a snapshot whose meta page was
already rewritten makes :meth:`MappedTree.lookup` return None, and the caller falls back to
``getmulti``. Values themselves are checked by their CRC-32 trailers (:mod:`tierstore.blocks`).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

import numpy as np

from tierstore.compiled import COMPILED, compiled

_PAGE_HEADER = 16  # page number (8), pad (2), flags (2), lower and upper bounds (2 + 2)
_BRANCH, _LEAF, _OVERFLOW, _META = 0x01, 0x02, 0x04, 0x08
_BIGDATA = 0x01  # a leaf node whose value lives on overflow pages
# The meta page after its header: magic, version, map address and size, the free and main
# databases' records (48 bytes each: pad, flags, depth, 4 page counts and entries, root),
# the last page number and the transaction id.
_META = struct.Struct("<II8x8x48x4xHH8x8x8x8xQQQ")
_MAGIC, _DATA_VERSION = 0xBEEFC0DE, 1
_NO_PAGE = 2**64 - 1  # the root of an empty database


@compiled
def _u16(page: np.ndarray, at: int) -> int:
    """The little-endian uint16 at ``page[at]``."""
    return np.int64(page[at]) | (np.int64(page[at + 1]) << 8)


def _lookup_keys(
    data: np.ndarray, psize: int, last_page: int, root: int, depth: int, keys: np.ndarray,
    klen: int, where: np.ndarray, size: np.ndarray, lo: int, hi: int,
) -> int:  # fmt: skip
    """Looks keys ``lo..hi`` (``keys``: ``klen`` bytes each) up in the B-tree of root page
    ``root`` (``depth`` levels of branch pages above the leaves):
    ``where[i]``/``size[i]`` is the file offset and length of key i's value, ``-1``/0 if the
    key is absent. Returns 0, or 1 at the first structure that does not check."""
    n_pages = last_page + 1
    for i in range(lo, hi):
        key = keys[klen * i : klen * (i + 1)]
        page_no = root
        where[i], size[i] = -1, 0
        for level in range(depth + 1):
            if page_no < 2 or page_no >= n_pages or (page_no + 1) * psize > len(data):
                return 1
            base = page_no * psize
            stored = np.int64(0)
            for b in range(8):
                stored |= np.int64(data[base + b]) << (8 * b)
            if stored != page_no:
                return 1
            flags = _u16(data, base + 10)
            lower, upper = _u16(data, base + 12), _u16(data, base + 14)
            if lower < _PAGE_HEADER or lower > upper or upper > psize or lower & 1:
                return 1
            count = (lower - _PAGE_HEADER) >> 1
            if count == 0:
                return 1 if flags & _BRANCH else 0  # an empty leaf: only an empty tree's root
            # The first node whose key is >= key: binary search over the node pointers.
            low, high = 0, count
            exact = False
            while low < high:
                mid = (low + high) >> 1
                node = base + _u16(data, base + _PAGE_HEADER + 2 * mid)
                if node < base + upper or node + 8 > base + psize:
                    return 1
                ksize = _u16(data, node + 6)
                if node + 8 + ksize > base + psize:
                    return 1
                order = 0
                if flags & _BRANCH and mid == 0:
                    order = -1  # a branch page's first key is implicitly lower than all
                else:
                    for b in range(min(ksize, klen)):
                        x, y = data[node + 8 + b], key[b]
                        if x != y:
                            order = -1 if x < y else 1
                            break
                    if order == 0 and ksize != klen:
                        order = -1 if ksize < klen else 1
                if order < 0:
                    low = mid + 1
                else:
                    high = mid
                    exact = order == 0
            if flags & _BRANCH:
                if level == depth:
                    return 1
                child = low if exact and low < count else low - 1
                node = base + _u16(data, base + _PAGE_HEADER + 2 * child)
                page_no = (
                    _u16(data, node) | (_u16(data, node + 2) << 16) | (_u16(data, node + 4) << 32)
                )
                continue
            if not flags & _LEAF or level != depth:
                return 1
            if not exact or low >= count:
                break  # absent
            node = base + _u16(data, base + _PAGE_HEADER + 2 * low)
            length = _u16(data, node) | (_u16(data, node + 2) << 16)
            start = node + 8 + klen
            if _u16(data, node + 4) & _BIGDATA:
                first = np.int64(0)
                for b in range(8):
                    first |= np.int64(data[start + b]) << (8 * b)
                if first < 2 or first >= n_pages or not _u16(data, first * psize + 10) & _OVERFLOW:
                    return 1
                start = first * psize + _PAGE_HEADER
                if start + length > n_pages * psize or start + length > len(data):
                    return 1
            elif start + length > base + psize:
                return 1
            where[i], size[i] = start, length
            break
    return 0


_lookup_compiled = compiled(_lookup_keys) if COMPILED else None
AVAILABLE = COMPILED and os.name == "posix"


class MappedTree:
    """``data.mdb`` of one LMDB environment mapped read-only, for :meth:`lookup`."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._data = np.empty(0, np.uint8)

    def close(self) -> None:
        """Drops the mapping (arrays already returned keep it alive)."""
        with self._lock:
            self._data, self._map = np.empty(0, np.uint8), None

    def _mapped(self, needed: int) -> np.ndarray | None:
        """The file mapped, at least ``needed`` bytes of it (remapped when it grew)."""
        with self._lock:
            if len(self._data) < needed:
                with open(self._path, "rb") as f:
                    length = os.fstat(f.fileno()).st_size
                    if length < needed:
                        return None
                    self._map = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ)
                self._data = np.frombuffer(self._map, np.uint8)
            return self._data

    def snapshot(self, txn_id: int, name: bytes) -> tuple | None:
        """(data, page size, last page, root, depth) of the database named ``name`` in
        the snapshot of transaction ``txn_id``, or None where that cannot be read safely."""
        data = self._mapped(2 * 4096)
        if data is None:
            return None
        psize = int(data[40:44].view("<u4")[0])  # the free database's pad holds the page size
        if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
            return None
        for page in (0, 1):
            fields = _META.unpack_from(data, page * psize + _PAGE_HEADER)
            magic, version, _flags, main_depth, main_root, last_page, txn = fields
            if magic != _MAGIC or version != _DATA_VERSION or txn != txn_id:
                continue
            data = self._mapped((last_page + 1) * psize)
            if data is None:
                return None
            found = _find_name(data, psize, last_page, main_root, main_depth - 1, name)
            again = _META.unpack_from(data, page * psize + _PAGE_HEADER)[-1]
            if found is None or again != txn_id:  # rewritten while read: not this snapshot
                return None
            return data, psize, last_page, found[0], found[1]
        return None

    def lookup(self, snapshot: tuple, keys: np.ndarray, span: tuple[int, int],
               where: np.ndarray, size: np.ndarray) -> bool:  # fmt: skip
        """Looks keys ``span[0]..span[1]`` up (see :func:`_lookup_keys`); False if a structure
        did not check (then use ``getmulti``). Runs without the GIL."""
        data, psize, last_page, root, depth = snapshot
        if root < 0:  # an empty database
            where[span[0] : span[1]], size[span[0] : span[1]] = -1, 0
            return True
        return not _lookup_compiled(
            data, psize, last_page, root, depth, keys, 8, where, size, span[0], span[1]
        )


def _find_name(data, psize, last_page, root, depth, name: bytes) -> tuple[int, int] | None:
    """(root, depth) of the database ``name`` from its record in the main database's tree;
    root -1 for an empty one."""
    if root == _NO_PAGE:
        return None
    key = np.frombuffer(name, np.uint8).copy()  # writable: the same compiled signature
    where, size = np.empty(1, np.int64), np.empty(1, np.int64)
    if _lookup_compiled(data, psize, last_page, root, depth, key, len(name), where, size, 0, 1):
        return None
    if where[0] < 0 or size[0] != 48:
        return None
    db_depth, db_root = struct.unpack_from("<6xH32xQ", data, int(where[0]))
    return (-1, 0) if db_root == _NO_PAGE else (db_root, db_depth - 1)
