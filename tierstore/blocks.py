"""The SSD tier's block format: rows of consecutive ids, byte-shuffled, zstd on one plane.

A block stores only the rows that were written (``n`` of them)::

    level 0:   n x uint16 offsets of the rows in the block, ascending | the n rows, raw | C
    level > 0: uint32 len(F) | F = zstd(offsets + plane 0) | planes 1, 2, 3, raw | C

where plane ``p`` holds byte ``3 - p`` of every float of the block's rows (sign/exponent byte
first). Only plane 0 goes through zstd: for trained fp32 rows it is the only plane that
compresses (its entropy is ~2.7 bits a byte, the mantissa planes' ~8), zstd builds one Huffman
table per block so mixing the planes in one frame loses most of the gain, and each extra frame
costs microseconds; raw planes are also gathered straight from the value without a copy.
``C`` (format version 2) is 4 bytes: the little-endian CRC-32 (``zlib.crc32``) of the block's
8-byte key followed by the value before it. A flipped byte anywhere in a value, or a value
found under another key, fails the check on read (:class:`BadBlock`): nothing is decoded
from a value that does not check.
:class:`BlockCodec` encodes and decodes whole batches of blocks with numpy and
zstandard's multi-frame calls: no Python code runs per row. ``tierstore/ssd.py`` stores the
blocks in LMDB.
"""

from __future__ import annotations

import operator
import os
import threading
import zlib

import numpy as np
import zstandard

# Flipping the sign bit maps signed ids onto unsigned ones in the same order.
SIGN = np.uint64(1 << 63)

# crc32(data + le32(crc32(data))) is this constant for any data: a whole value, trailer
# included, checks in one call per block (in C, through map), with no slicing.
_CRC_RESIDUE = 0x2144DF1C
TRAILER_BYTES = 4

# Below this many frames, zstandard's worker threads cost more than they save.
_MIN_FRAMES_FOR_THREADS = 64


class BadBlock(Exception):
    """Raised by the codec for the ``index``-th block of a batch; the tier names the path."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index
        self.problem = problem


def _windows(buf: np.ndarray, width: int) -> np.ndarray:
    """All ``width``-byte windows of ``buf`` as rows of a 2-D view (no copy): indexing it with
    start offsets gathers (or, assigned to, scatters) many byte runs in one numpy call."""
    return np.lib.stride_tricks.as_strided(buf, (len(buf) - width + 1, width), (1, 1))


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of ``counts`` items: each item's group and its index inside the group."""
    total = int(counts.sum())
    group = np.repeat(np.arange(len(counts)), counts)
    firsts = np.cumsum(counts) - counts
    return group, np.arange(total) - firsts[group]


class DecodedBlocks:
    """The entries (present rows) of a batch of decoded blocks; rows are unshuffled on demand.

    ``heads`` holds, per block, its offsets and then its first plane (level 0: the rows);
    ``tails`` (level > 0 only) holds its three raw mantissa planes.
    """

    def __init__(
        self,
        codec: BlockCodec,
        count: np.ndarray,
        heads: np.ndarray,
        head_base: np.ndarray,
        tails: np.ndarray | None = None,
        tail_base: np.ndarray | None = None,
    ) -> None:
        self.codec, self.count = codec, count
        self.heads, self.head_base = heads, head_base
        self.tails, self.tail_base = tails, tail_base
        self.block, self.slot = _ragged(count)  # per entry: its block, its index in the block
        pos = head_base[self.block] + 2 * self.slot
        self.offset = heads[pos].astype(np.int64) | (heads[pos + 1].astype(np.int64) << 8)
        # Entries sorted by (block, offset): the key that lookups search.
        self.key = self.block * codec.block_rows + self.offset
        bad = self.offset >= codec.block_rows
        bad[1:] |= (self.key[1:] <= self.key[:-1]) & (self.block[1:] == self.block[:-1])
        if bad.any():
            raise BadBlock(int(self.block[np.argmax(bad)]), "row offsets out of order or range")

    def rows(self, entries: np.ndarray) -> np.ndarray:
        """The rows of the given entries, (len(entries), row_width) float32."""
        w = self.codec.row_width
        block, slot = self.block[entries], self.slot[entries]
        n = self.count[block]
        first = self.head_base[block] + 2 * n  # where the block's first plane (or rows) begins
        if self.tails is None:
            runs = _windows(self.heads, 4 * w)[first + slot * 4 * w]
            return runs.view(np.float32).reshape(len(entries), w)
        out = np.empty((len(entries), w, 4), np.uint8)
        out[:, :, 3] = _windows(self.heads, w)[first + slot * w]
        tails = _windows(self.tails, w)
        for plane in (1, 2, 3):
            out[:, :, 3 - plane] = tails[self.tail_base[block] + ((plane - 1) * n + slot) * w]
        return out.view(np.float32).reshape(len(entries), w)


class BlockCodec:
    """Turns sorted (id, row) batches into block keys and values and back, in bulk."""

    def __init__(self, row_width: int, block_rows: int, level: int, threads: int) -> None:
        self.row_width = row_width
        self.block_rows = block_rows
        self.shift = np.uint64(block_rows.bit_length() - 1)
        self.level = level
        self.threads = min(threads, os.cpu_count() or 1)
        self._compressor = zstandard.ZstdCompressor(level=level) if level else None
        self._local = threading.local()  # a decompressor per thread: they are not thread-safe

    def _zstd_threads(self, frames: int) -> int:
        return self.threads if frames >= _MIN_FRAMES_FOR_THREADS and self.threads > 1 else 0

    def blocks(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block numbers of sorted unsigned ids ``u``: (first index of each block, block number)."""
        blk = u >> self.shift
        first = np.flatnonzero(np.concatenate(([True], blk[1:] != blk[:-1])))
        return first, blk[first]

    def first_id(self, block: int) -> int:
        """The signed id of the first row of a block."""
        u = np.uint64(block) << self.shift
        return int(np.array([u ^ SIGN], np.uint64).view(np.int64)[0])

    @staticmethod
    def keys(blocks: np.ndarray) -> list[bytes]:
        """LMDB keys of block numbers: big-endian, so that byte order is numeric order."""
        return blocks.astype(">u8").view("V8").tolist()

    def encode(self, u: np.ndarray, rows: np.ndarray) -> tuple[list[bytes], list[bytes], int]:
        """Blocks holding exactly the rows ``rows`` of sorted unique ``u``: keys, values, bytes."""
        w = self.row_width
        first, blocks = self.blocks(u)
        count = np.diff(np.append(first, len(u)))
        block, slot = _ragged(count)
        n = count[block]
        as_bytes = rows.view(np.uint8).reshape(-1, w, 4)
        # Heads: offsets, then level 0: the rows; level > 0: the sign/exponent plane.
        head_size = count * (2 + (4 * w if self.level == 0 else w))
        head_base = np.cumsum(head_size) - head_size
        heads = np.empty(int(head_size.sum()), np.uint8)
        pos = head_base[block] + 2 * slot
        offset = u & np.uint64(self.block_rows - 1)
        heads[pos], heads[pos + 1] = offset & np.uint64(0xFF), offset >> np.uint64(8)
        first_row = pos + 2 * (n - slot)  # where the block's rows (or first plane) begin
        if self.level == 0:
            _windows(heads, 4 * w)[first_row + slot * 4 * w] = as_bytes.reshape(-1, 4 * w)
            keys = self.keys(blocks)
            values = seal(keys, _slices(heads, head_base, head_size))
            return keys, values, len(heads) + TRAILER_BYTES * len(keys)
        _windows(heads, w)[first_row + slot * w] = as_bytes[:, :, 3]
        segments = np.stack((head_base, head_size), axis=1).astype(np.uint64)
        frames = self._compressor.multi_compress_to_buffer(
            zstandard.BufferWithSegments(heads, segments.tobytes()),
            threads=self._zstd_threads(len(blocks)),
        )
        frame_len = np.fromiter(map(len, frames), np.int64, len(frames))
        # Value: uint32 frame length | frame | mantissa planes, raw (they do not compress).
        value_size = 4 + frame_len + 3 * w * count
        value_base = np.cumsum(value_size) - value_size
        values = np.empty(int(value_size.sum()), np.uint8)
        header = frame_len.astype("<u4").view(np.uint8).reshape(-1, 4)
        values[value_base[:, None] + np.arange(4)] = header
        frame_block, frame_pos = _ragged(frame_len)
        compressed = np.frombuffer(b"".join(frames), np.uint8)
        values[value_base[frame_block] + 4 + frame_pos] = compressed
        tails = _windows(values, w)
        tail_base = value_base + 4 + frame_len
        for plane in (1, 2, 3):
            tails[tail_base[block] + ((plane - 1) * n + slot) * w] = as_bytes[:, :, 3 - plane]
        keys = self.keys(blocks)
        sealed = seal(keys, _slices(values, value_base, value_size))
        return keys, sealed, len(values) + TRAILER_BYTES * len(keys)

    def decode(self, values: list[bytes], keys: list[bytes]) -> DecodedBlocks:
        """Decodes stored block values (any order) found under ``keys``; raises BadBlock for
        the first one whose checksum fails or whose content does not fit the layout."""
        w = self.row_width
        check(values, keys)
        joined = np.frombuffer(b"".join(values), np.uint8)
        stored_size = np.fromiter(map(len, values), np.int64, len(values))
        value_base = np.cumsum(stored_size) - stored_size
        value_size = stored_size - TRAILER_BYTES  # the trailer is checked: leave it out
        if self.level == 0:
            count = value_size // (2 + 4 * w)
            self._check_counts(count, value_size == count * (2 + 4 * w))
            return DecodedBlocks(self, count, joined, value_base)
        short = value_size < 4
        if short.any():
            raise BadBlock(int(np.argmax(short)), "value shorter than its header")
        frame_len = joined[value_base[:, None] + np.arange(4)].view("<u4")[:, 0].astype(np.int64)
        over = frame_len > value_size - 4
        if over.any():
            raise BadBlock(int(np.argmax(over)), "frame length past the end of the value")
        segments = np.stack((value_base + 4, frame_len), axis=1).astype(np.uint64)
        try:
            frames = self._decompressor().multi_decompress_to_buffer(
                zstandard.BufferWithSegments(joined, segments.tobytes()),
                threads=self._zstd_threads(len(values)),
            )
        except (zstandard.ZstdError, ValueError) as exc:
            raise self._find_bad_frame(joined, segments, exc) from exc
        head_size = np.fromiter(map(len, frames), np.int64, len(frames))
        count = head_size // (2 + w)
        ok = (head_size == count * (2 + w)) & (value_size == 4 + frame_len + 3 * w * count)
        self._check_counts(count, ok)
        heads = np.frombuffer(b"".join(frames), np.uint8)
        head_base = np.cumsum(head_size) - head_size
        return DecodedBlocks(self, count, heads, head_base, joined, value_base + 4 + frame_len)

    def _check_counts(self, count: np.ndarray, ok: np.ndarray) -> None:
        ok = ok & (count >= 1) & (count <= self.block_rows)
        if not ok.all():
            raise BadBlock(int(np.argmin(ok)), "decompressed length does not match the layout")

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self._local, "d"):
            self._local.d = zstandard.ZstdDecompressor()
        return self._local.d

    @staticmethod
    def _find_bad_frame(joined: np.ndarray, segments: np.ndarray, exc: Exception) -> BadBlock:
        """Error path only: decompresses frame by frame to name the block that fails."""
        d = zstandard.ZstdDecompressor()
        for i, (start, length) in enumerate(segments.tolist()):
            try:
                d.decompress(joined[start : start + length])
            except (zstandard.ZstdError, ValueError) as frame_exc:
                return BadBlock(i, f"bad zstd frame ({frame_exc})")
        return BadBlock(0, f"bad zstd frame ({exc})")


def seal(keys: list[bytes], bodies: list[bytes]) -> list[bytes]:
    """Each body followed by its trailer, the CRC-32 of its key and then the body."""
    crcs = np.fromiter(map(zlib.crc32, bodies, map(zlib.crc32, keys)), np.uint32, len(keys))
    trailers = crcs.astype("<u4").view("V4").tolist()
    return list(map(operator.add, bodies, trailers))


def check(values: list[bytes], keys: list[bytes]) -> None:
    """Raises BadBlock for the first value whose trailer does not match its key and body."""
    residue = np.fromiter(map(zlib.crc32, values, map(zlib.crc32, keys)), np.uint32, len(keys))
    bad = residue != _CRC_RESIDUE
    if bad.any():
        first = int(np.argmax(bad))
        problem = (
            "value shorter than its checksum"
            if len(values[first]) < TRAILER_BYTES
            else ("checksum mismatch (the block or its key was damaged)")
        )
        raise BadBlock(first, problem)


def _slices(buf: np.ndarray, base: np.ndarray, size: np.ndarray) -> list[bytes]:
    """Consecutive byte ranges of ``buf`` as bytes. Not memoryviews: the garbage collector
    tracks those, and tens of thousands of them trigger full collections (5x slower)."""
    data = buf.tobytes()
    return [data[s:e] for s, e in zip(base.tolist(), (base + size).tolist())]
