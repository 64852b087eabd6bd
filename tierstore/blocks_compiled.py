"""Compiled decode of stored blocks straight into the rows a read asks for, off the GIL.

:class:`tierstore.blocks.BlockCodec` decodes a batch with numpy and python-zstandard, but a
random read of the SSD tier decodes one small block per row, and that path spends most of
its time per block in Python (two ``zlib.crc32`` calls, a zstd frame object, fancy indexing)
while holding the GIL, so more I/O threads do not make it faster. Here one compiled loop
(:func:`tierstore.compiled.compiled`: numba, ``nogil``) does, per block, what the codec does:
checks the CRC-32 trailer (zlib's ``crc32``), decompresses the zstd frame (libzstd's
``ZSTD_decompressDCtx``: the same library python-zstandard wraps, called through ctypes),
checks the layout, and writes the requested rows, unshuffled, into the caller's output.
Slices of a batch's blocks run on several threads at once.

:data:`AVAILABLE` says whether this path exists (numba, and ``libz``/``libzstd`` as shared
libraries). Where it does not, :mod:`tierstore.ssd_blockdb` uses the codec; both refuse the
same damage with the same problems (:data:`PROBLEMS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

from tierstore.blocks import BadBlock
from tierstore.compiled import COMPILED, compiled

# crc32(key + value) of a value whose trailer is the CRC-32 of its key and body (blocks.py).
_CRC_RESIDUE = 0x2144DF1C

# libzstd's results above this are errors (ZSTD_isError); -70 is dstSize_tooSmall.
_ZSTD_MAX_SIZE = np.uint64(2**64 - 121)
_DST_TOO_SMALL = np.uint64(2**64 - 70)

# What kernel status codes mean (0: all blocks good), as the codec words them.
PROBLEMS = {
    1: "value shorter than its checksum",
    2: "checksum mismatch (the block or its key was damaged)",
    3: "value shorter than its header",
    4: "frame length past the end of the value",
    5: "decompressed length does not match the layout",
    6: "bad zstd frame (libzstd refused it)",
    7: "row offsets out of order or range",
}


def _bind() -> tuple[object, object, object, object] | None:
    """ctypes bindings of zlib's crc32 and libzstd's decompression, or None where missing."""
    # find_library needs ldconfig's cache; the sonames are the fallback where it has none.
    names = [ctypes.util.find_library(n) or f"lib{n}.so.1" for n in ("z", "zstd")]
    try:
        libz, libzstd = (ctypes.CDLL(name) for name in names)
        crc32, decompress = libz.crc32, libzstd.ZSTD_decompressDCtx
        create, free = libzstd.ZSTD_createDCtx, libzstd.ZSTD_freeDCtx
    except (OSError, AttributeError):
        return None
    crc32.argtypes = [ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
    crc32.restype = ctypes.c_ulong
    size_t, ptr = ctypes.c_size_t, ctypes.c_void_p
    decompress.argtypes = [ptr, ptr, size_t, ptr, size_t]
    decompress.restype = size_t
    create.restype = ptr
    free.argtypes = [ptr]
    return crc32, decompress, create, free


_LIBS = _bind() if COMPILED else None
# Whether the compiled path can run here (else the codec's path serves every read).
AVAILABLE = _LIBS is not None


def _decode_into(
    crc32, decompress, dctx: int, values: np.ndarray, base: np.ndarray, size: np.ndarray,
    keys: np.ndarray, want_start: np.ndarray, want_count: np.ndarray, want_offset: np.ndarray,
    dest: np.ndarray, out: np.ndarray, hit: np.ndarray, lo: int, hi: int, row_width: int,
    block_rows: int, level: int,
) -> tuple[int, int]:  # fmt: skip
    """Blocks ``lo..hi`` of a batch: (status, index of the first bad block), status 0 if all
    check. Block ``i`` is ``values[base[i]:base[i] + size[i]]`` stored under the 8-byte key
    ``keys[8i:8i + 8]``; its requested rows are entries ``want_start[i] +
    range(want_count[i])`` of ``want_offset`` (offsets in the block, ascending) and ``dest``
    (rows of ``out``, a (rows, 4 * row_width) uint8 view). A present row is copied to its
    ``dest`` row and its ``hit`` entry set to 1. Every block is checked before any row of it
    is written; a bad block stops the slice."""
    w = row_width
    head_cap = block_rows * (2 + w) if level != 0 else 1
    head = np.empty(head_cap, np.uint8)
    vptr, hptr, kptr = values.ctypes.data, head.ctypes.data, keys.ctypes.data
    for i in range(lo, hi):
        v0, n = base[i], size[i]
        if n < 4:
            return 1, i
        if crc32(crc32(0, kptr + 8 * i, 8), vptr + v0, n) != _CRC_RESIDUE:
            return 2, i
        body = n - 4
        if level == 0:
            count = body // (2 + 4 * w)
            if count * (2 + 4 * w) != body or count < 1 or count > block_rows:
                return 5, i
            offsets = values[v0 : v0 + 2 * count]
            rows_at = v0 + 2 * count
        else:
            if body < 4:
                return 3, i
            frame = np.int64(0)
            for b in range(4):  # the little-endian uint32 frame length
                frame |= np.int64(values[v0 + b]) << (8 * b)
            if frame > body - 4:
                return 4, i
            rest = body - 4 - frame
            count = rest // (3 * w)
            if count * 3 * w != rest or count < 1 or count > block_rows:
                return 5, i
            got = decompress(dctx, hptr, count * (2 + w), vptr + v0 + 4, frame)
            if got == _DST_TOO_SMALL:  # more rows in the frame than the value holds
                return 5, i
            if got > _ZSTD_MAX_SIZE:  # ZSTD_isError
                return 6, i
            if got != count * (2 + w):
                return 5, i
            offsets = head[: 2 * count]
            rows_at = v0 + 4 + frame  # the three raw mantissa planes
        previous = -1
        for j in range(count):
            offset = offsets[2 * j] | (np.int64(offsets[2 * j + 1]) << 8)
            if offset >= block_rows or offset <= previous:
                return 7, i
            previous = offset
        # Merge the requested offsets with the block's entries (both ascending).
        j, s, end = 0, want_start[i], want_start[i] + want_count[i]
        while s < end and j < count:
            want = want_offset[s]
            have = offsets[2 * j] | (np.int64(offsets[2 * j + 1]) << 8)
            if have < want:
                j += 1
                continue
            if have == want:
                row = out[dest[s]]
                if level == 0:
                    row[:] = values[rows_at + 4 * w * j : rows_at + 4 * w * (j + 1)]
                else:
                    plane0 = 2 * count + w * j
                    tail = rows_at + w * j
                    for c in range(w):
                        row[4 * c + 3] = head[plane0 + c]  # sign and exponent
                        row[4 * c + 2] = values[tail + c]
                        row[4 * c + 1] = values[tail + count * w + c]
                        row[4 * c] = values[tail + 2 * count * w + c]
                hit[s] = 1
            s += 1
    return 0, -1


_decode_compiled = compiled(_decode_into) if AVAILABLE else None


class _DecompressionContext:
    """A libzstd decompression context, freed with its owner (one per thread: not shared)."""

    def __init__(self) -> None:
        self.ptr = _LIBS[2]()
        if not self.ptr:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if _LIBS is not None and getattr(self, "ptr", None):
            _LIBS[3](self.ptr)


_local = threading.local()


def decode_into(
    values: np.ndarray,
    base: np.ndarray,
    size: np.ndarray,
    keys: np.ndarray,
    want_start: np.ndarray,
    want_count: np.ndarray,
    want_offset: np.ndarray,
    dest: np.ndarray,
    out: np.ndarray,
    hit: np.ndarray,
    span: tuple[int, int],
    row_width: int,
    block_rows: int,
    level: int,
) -> None:
    """Checks and decodes blocks ``span[0]..span[1]`` of a batch into ``out`` (see
    :func:`_decode_into` for the arrays); raises :class:`BadBlock` for the first bad one.
    Runs without the GIL: call it from several threads on disjoint spans."""
    if level != 0 and not hasattr(_local, "dctx"):
        _local.dctx = _DecompressionContext()
    dctx = _local.dctx.ptr if level != 0 else 0
    crc32, decompress = _LIBS[0], _LIBS[1]
    status, bad = _decode_compiled(
        crc32, decompress, dctx, values, base, size, keys, want_start, want_count,
        want_offset, dest, out, hit, span[0], span[1], row_width, block_rows, level,
    )  # fmt: skip
    if status:
        raise BadBlock(int(bad), PROBLEMS[int(status)])
