"""The CUDA backend's unique step (kernels/sort.cu, kernels/unique.cu): a batch's unique ids,
their counts and the sparse transpose that its backward reuses, without a host read.

Shapes: ``n`` indices, ``U`` unique rows.
"""

from __future__ import annotations

import torch

from .cuda_launch import cuda_device, int64_on, run_kernel

# The unique step as sort + two kernels, its sort reused as the backward's transpose; False
# gives torch.unique and a second sort in backward (the benchmark's same-run comparison).
FAST_UNIQUE = True


class Transpose:
    """A batch's sparse transpose, a by-product of its unique step (kernels/unique.cu): its
    sorted entries, what backward would get by sorting the inverse stably, split into the
    indices whose row no other index reads and the sorted list of the others.

    The multi list's buffers have ``n`` entries of which the first ``list_length`` (a (1,)
    int32 device tensor) are used. ``order`` and ``rank`` are the sort and its prefix sum, from
    which the batch's places (``places``, :func:`~tierstore.cuda_bags._places`, once its rows
    are placed) and, if asked, its inverse are written."""

    def __init__(
        self,
        start: torch.Tensor,
        order: torch.Tensor,
        rank: torch.Tensor,
        multi_u: torch.Tensor,
        multi_index: torch.Tensor,
        multi_first: torch.Tensor,
        list_length: torch.Tensor,
    ):
        self.start = start  # (U + 1,) int64: first sorted entry of each row; start[U] = n
        self.order = order  # (n,) int32 or int64: the index of each sorted entry
        self.rank = rank  # (n,) int64: kernels/unique.cu SortedEntry
        self.multi_u = multi_u  # (n,) int32: row of each entry of a row read more than once
        self.multi_index = multi_index  # (n,) int32: index of each such entry
        self.multi_first = multi_first  # (n,) int32: where row u begins in that list
        self.list_length = list_length  # (1,) int32 device tensor
        self.places: torch.Tensor | None = None  # (n,) int64, once written (cuda_bags._places)

    def inverse(self) -> torch.Tensor:
        """(n,) int64: each index's unique row, ``torch.unique``'s inverse. The training step
        never asks for it (its places stand in), so it is made here on demand."""
        inverse = torch.empty(self.order.numel(), dtype=torch.int64, device=self.order.device)
        inverse[self.order.long()] = (self.rank & 0xFFFFFFFF) - 1
        return inverse


_RADIX_TILE = 4096  # entries per tile of kernels/sort.cu (TS_RADIX_TILE)


def radix_sort(
    keys: torch.Tensor, bits: int, count: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted, order)``: ``torch.sort(keys, stable=True)`` for int64 ``keys`` in
    ``[0, 2**bits)``, ``bits <= 31``, both as int32 (kernels/sort.cu): one 8-bit pass per byte
    of ``bits``, where torch sorts all 32 bits and carries int64 positions. Keys outside that
    range sort as garbage (by their low bits), but ``order`` is still a permutation.

    ``count``, a ``(1,)`` int32 device tensor, sorts only the first ``count`` keys, without the
    host reading it: the first ``count`` entries of both outputs are those keys' sort, the rest
    are garbage, and the passes skip the tiles past it (a step's partly used buffer)."""
    n = keys.numel()
    dev = cuda_device(keys.device)
    keys = int64_on(keys, dev)
    tiles = -(-n // _RADIX_TILE)
    cells = 256 * tiles + 1  # (digit, tile) counts after a leading zero
    work = torch.empty(4 * n + 2 * cells, dtype=torch.int32, device=dev)  # one allocation
    buffers = work[: 4 * n].view(2, 2, n)  # (keys, order), for even and odd passes
    counts, starts = work[4 * n :].view(2, cells)
    source, values = keys, None
    for k, shift in enumerate(range(0, max(bits, 1), 8)):
        suffix = "i64" if k == 0 else "u32"
        args = (source, n, count, shift, tiles, counts)
        run_kernel("sort.cu", f"radix_counts_{suffix}", dev, tiles * 256, args, per_warp=False)
        torch.cumsum(counts, 0, dtype=torch.int32, out=starts)  # where each (digit, tile) begins
        out_keys, out_values = buffers[k % 2]
        args = (source, values, n, count, shift, tiles, starts, out_keys, out_values)
        run_kernel("sort.cu", f"radix_scatter_{suffix}", dev, tiles * 256, args, per_warp=False)
        source, values = out_keys, out_values
    return source, values


def scan_sorted(sorted_keys: torch.Tensor, order: torch.Tensor, transpose: bool):
    """What a stable sort of a batch's keys gives (kernels/unique.cu): ``(ids, inverse, start,
    unique_count, transpose)``, ``ids`` and ``start`` n-long buffers of which the first ``U`` /
    ``U + 1`` are used, ``unique_count`` ``U`` as a (1,) int32 device tensor, and, if asked, the
    batch's :class:`Transpose` in place of the inverse (``None``: :meth:`Transpose.inverse`
    makes it). Positions are int32: ``n < 2**31``."""
    n = sorted_keys.numel()
    dev = cuda_device(sorted_keys.device)
    suffix = "i32" if sorted_keys.dtype == torch.int32 else "i64"
    flags = torch.empty(n, dtype=torch.int64, device=dev)
    run_kernel(
        "unique.cu", f"unique_flags_{suffix}", dev, n, (sorted_keys, n, flags), per_warp=False
    )
    rank = torch.cumsum(flags, 0)  # low words: rows begun; high words: multi list entries
    ids = torch.empty(n, dtype=torch.int64, device=dev)
    start = torch.empty(n + 1, dtype=torch.int64, device=dev)
    halves = rank[-1:].view(torch.int32)  # little-endian: (U, list length)
    if transpose:
        inverse = None
        multi = torch.empty((3, n), dtype=torch.int32, device=dev)
        tr = Transpose(start, order, rank, multi[0], multi[1], multi[2], halves[1:])
        outputs = (multi[0], multi[1], multi[2])
    else:
        inverse = torch.empty(n, dtype=torch.int64, device=dev)
        tr, outputs = None, (None, None, None)
    args = (sorted_keys, order, rank, n, ids, inverse, start, *outputs)
    run_kernel("unique.cu", f"unique_scatter_{suffix}", dev, n, args, per_warp=False)
    return ids, inverse, start, halves[:1], tr


def unique(
    indices: torch.Tensor, num_rows: int | None, padded: bool = False, transpose: bool = True
):
    """``torch.unique(indices, sorted=True, return_inverse=True, return_counts=True)`` plus the
    batch's :class:`Transpose` (``None`` when torch.unique was used) and the unique count: one
    stable sort of the ids (:func:`radix_sort`, over the ids' bits alone, when the table has at
    most 2**31 rows; else ``torch.sort`` of int64 keys), a flag kernel, a prefix sum and a
    scatter kernel.

    Returns ``(ids, inverse, counts, transpose, count)``. Where a transpose is made, it stands in
    for the inverse, which is ``None`` (:meth:`Transpose.inverse` makes it on demand). Without
    ``padded`` the host reads the unique count ``U`` (the one device read) and ``ids``/``counts``
    have ``U`` entries; ``count`` is ``None``. With ``padded`` nothing is read: ``ids`` and
    ``counts`` are buffers of ``n`` entries of which the first ``U`` are used, and ``count`` is
    ``U`` as a (1,) int32 device tensor, which the cache kernels read themselves (a sync-free
    step).

    Without ``transpose`` (a batch that no backward will follow) no transpose is made and, with
    ids known to lie below a ``num_rows`` at most ``_DENSE_UNIQUE_SPAN`` times the batch, a
    histogram of the id space replaces the sort. Ids outside ``[0, num_rows)`` give garbage
    but no access out of bounds; the caller's checks reject them before any use."""
    n = indices.numel()
    dev = indices.device
    if not transpose and FAST_UNIQUE and dev.type == "cuda" and _dense_eligible(n, num_rows):
        ids, counts, count, inverse = _dense_unique(indices, num_rows, want_inverse=True)
        if padded:
            return ids, inverse, counts, None, count
        u = int(count[0])  # the one read, as below
        return ids[:u], inverse, counts[:u], None, None
    if not FAST_UNIQUE or dev.type != "cuda" or n == 0 or n >= 1 << 31:
        ids, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
        return ids, inverse, counts, None, None
    # ids in [0, num_rows) (bad ones, checked before any result is used, sort as garbage)
    if num_rows is not None and num_rows <= 1 << 31:  # int32 keys over the ids' bits alone
        sorted_keys, order = radix_sort(indices, max(num_rows - 1, 1).bit_length())
    else:
        sorted_keys, order = torch.sort(indices.to(torch.int64), stable=True)
    ids, inverse, start, count, tr = scan_sorted(sorted_keys, order, transpose)
    if padded:  # start[U] = n; the entries past it are never read
        counts = start[1:] - start[:-1]
        return ids, inverse, counts, tr, count
    u = int(count[0])  # the one read: the unique count sizes everything after
    ids, start = ids[:u], start[: u + 1]
    counts = start[1:] - start[:-1]
    if tr is not None:
        tr.start = start
    return ids, inverse, counts, tr, None


# A histogram of the id space beats a sort of the batch where the space is at most this many
# times the batch (kernels/unique.cu, "the dense unique step")
_DENSE_UNIQUE_SPAN = 32
_DENSE_TILE = 4096  # histogram entries per block of the dense kernels (unique.cu)


def _dense_eligible(n: int, num_rows: int | None) -> bool:
    """Whether a histogram of ``num_rows`` entries is the cheaper unique step for ``n`` ids."""
    return num_rows is not None and 0 < n < 1 << 31 and num_rows <= _DENSE_UNIQUE_SPAN * n


def _dense_unique(
    ids: torch.Tensor,
    num_rows: int,
    want_inverse: bool,
    out_of_range: torch.Tensor | None = None,
):
    """The unique step as a histogram of the id space (kernels/unique.cu, "the dense unique
    step"): ``(ids, counts, count, inverse)`` with ``ids``/``counts`` n-long buffers of which
    the first ``count`` (a (1,) int32 device tensor) are used; ``inverse`` if asked. Ids
    outside ``[0, num_rows)`` are left out and set the ``out_of_range`` flag if given."""
    n = ids.numel()
    dev = cuda_device(ids.device)
    ids = int64_on(ids, dev)
    hist = torch.zeros(num_rows, dtype=torch.int32, device=dev)
    args = (ids, n, num_rows, hist, out_of_range)
    run_kernel("unique.cu", "dense_count", dev, (n + 31) // 32, args, per_warp=True)
    tiles = -(-num_rows // _DENSE_TILE)
    tile_counts = torch.empty(tiles, dtype=torch.int32, device=dev)
    threads = tiles * 256  # a 256-thread block per tile
    run_kernel("unique.cu", "dense_tile_counts", dev, threads, (hist, num_rows, tile_counts), False)
    tile_ends = torch.cumsum(tile_counts, 0, dtype=torch.int32)
    uniq = torch.empty(n, dtype=torch.int64, device=dev)
    counts = torch.empty(n, dtype=torch.int64, device=dev)
    args = (hist, num_rows, tile_counts, tile_ends, uniq, counts)
    run_kernel("unique.cu", "dense_emit", dev, threads, args, False)  # hist: positions from here
    inverse = None
    if want_inverse:
        inverse = torch.empty(n, dtype=torch.int64, device=dev)
        run_kernel("unique.cu", "dense_inverse", dev, n, (ids, n, num_rows, hist, inverse), False)
    return uniq, counts, tile_ends[-1:], inverse


def unique_counts(
    ids: torch.Tensor, num_rows: int | None, out_of_range: torch.Tensor | None = None
):
    """A batch's unique ids (ascending) and their counts, without the inverse and transpose
    that training needs (the trace replay's step), sync-free: ``(ids, counts, count)`` as
    :func:`unique` returns them with ``padded``. Where every id is known to lie below
    ``num_rows`` and ``num_rows`` is at most ``_DENSE_UNIQUE_SPAN`` times the batch, a
    histogram of the id space replaces the sort. ``out_of_range``, a (1,) int32 device flag,
    is set where an id lies outside ``[0, num_rows)`` (the results are then wrong), so that
    the caller can check a whole replay with one read at its end."""
    if not _dense_eligible(ids.numel(), num_rows):
        if out_of_range is not None and num_rows is not None and ids.numel():
            low, high = torch.aminmax(ids)
            bad = (low < 0) | (high >= num_rows)
            out_of_range.bitwise_or_(bad.to(torch.int32))  # in place: a graph may capture it
        uniq, _, counts, _, count = unique(ids, num_rows, padded=True, transpose=False)
        return uniq, counts, count
    uniq, counts, count, _ = _dense_unique(ids, num_rows, False, out_of_range)
    return uniq, counts, count
