"""The CUDA backend: the engine's steps as CuPy raw kernels (``kernels/*.cu``).

The same functions as :mod:`tierstore.cpu`, with the same meaning, and the same cache state
(tags, stamps, dirty bits, locks, counters, sketch) kept in HBM. Every kernel runs on torch's
current stream on torch tensors passed by pointer (:mod:`tierstore.interop`); L2 rows are read
and written in pinned host memory directly over PCIe (zero-copy). The step adds no host
synchronisation of its own: counts that decide the work (the batch's unique rows, misses,
touched sets, fills) stay on the device and the kernels loop over them; launches are sized by
the batch's length, an upper bound of its unique count.

Shapes: ``n`` indices, ``B`` bags, ``U`` unique rows, ``D`` embedding dim, rows of ``width``
floats, ``C`` L1 slots, ``S`` sets of ``W`` ways.
"""

from __future__ import annotations

import functools

import torch

from . import cpu, interop, kernel_loader
from .cache import EMPTY, Lookup, SetAssociativeCache
from .errors import InvalidInputError
from .hashing import seed_key, tag_digest
from .host import HostTable
from .optim import Optimizer

name = "cuda"

_KERNEL_POLICIES = ("lru", "lfu")  # policies with score functors in kernels/policy.cuh
_KERNEL_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")  # functors in kernels/backward.cu
_REGISTER_COLUMNS = (1, 2, 4, 8, 16)  # backward kernels hold G * K weights of a row per G lanes
_MOVE_ROWS = {True: 8, False: 4}  # fills per warp of move_rows_vec4 / move_rows_scalar
# The unique step as sort + two kernels, its sort reused as the backward's transpose; False
# gives torch.unique and a second sort in backward (the benchmark's same-run comparison).
FAST_UNIQUE = True


def available() -> bool:
    """Whether the kernels can run: a CUDA device that torch and CuPy both see."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _run(file: str, function: str, device: torch.device, items: int, args, per_warp: bool):
    kernel = kernel_loader.kernel(file, function, device.index)
    interop.launch(kernel, device, items, args, per_warp)


def _i64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int64).contiguous()


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream of ``device``, for kernels that run beside the current stream's."""
    return torch.cuda.Stream(device)


# ---------------------------------------------------------------------------- the unique step
class Transpose:
    """A batch's sparse transpose, a by-product of its unique step (kernels/unique.cu): its
    sorted entries, what backward would get by sorting the inverse stably, split into the
    indices whose row no other index reads and the sorted list of the others.

    The multi list's buffers have ``n`` entries of which the first ``list_length`` (a (1,)
    int32 device tensor) are used. ``order`` and ``rank`` are the sort and its prefix sum, from
    which the batch's places (:func:`_places`) and, if asked, its inverse are written."""

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

    def inverse(self) -> torch.Tensor:
        """(n,) int64: each index's unique row, ``torch.unique``'s inverse. The training step
        never asks for it (its places stand in), so it is made here on demand."""
        inverse = torch.empty(self.order.numel(), dtype=torch.int64, device=self.order.device)
        inverse[self.order.long()] = (self.rank & 0xFFFFFFFF) - 1
        return inverse


_RADIX_TILE = 4096  # entries per tile of kernels/sort.cu (TS_RADIX_TILE)


def radix_sort(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted, order)``: ``torch.sort(keys, stable=True)`` for int64 ``keys`` in
    ``[0, 2**bits)``, ``bits <= 31``, both as int32 (kernels/sort.cu): one 8-bit pass per byte
    of ``bits``, where torch sorts all 32 bits and carries int64 positions. Keys outside that
    range sort as garbage (by their low bits), but ``order`` is still a permutation."""
    n = keys.numel()
    dev = _device(keys.device)
    keys = _i64(keys, dev)
    tiles = -(-n // _RADIX_TILE)
    cells = 256 * tiles + 1  # (digit, tile) counts after a leading zero
    work = torch.empty(4 * n + 2 * cells, dtype=torch.int32, device=dev)  # one allocation
    buffers = work[: 4 * n].view(2, 2, n)  # (keys, order), for even and odd passes
    counts, starts = work[4 * n :].view(2, cells)
    source, values = keys, None
    for k, shift in enumerate(range(0, max(bits, 1), 8)):
        suffix = "i64" if k == 0 else "u32"
        args = (source, n, shift, tiles, counts)
        _run("sort.cu", f"radix_counts_{suffix}", dev, tiles * 256, args, per_warp=False)
        torch.cumsum(counts, 0, dtype=torch.int32, out=starts)  # where each (digit, tile) begins
        out_keys, out_values = buffers[k % 2]
        args = (source, values, n, shift, tiles, starts, out_keys, out_values)
        _run("sort.cu", f"radix_scatter_{suffix}", dev, tiles * 256, args, per_warp=False)
        source, values = out_keys, out_values
    return source, values


def _scan_sorted(sorted_keys: torch.Tensor, order: torch.Tensor, transpose: bool):
    """What a stable sort of a batch's keys gives (kernels/unique.cu): ``(ids, inverse, start,
    unique_count, transpose)``, ``ids`` and ``start`` n-long buffers of which the first ``U`` /
    ``U + 1`` are used, ``unique_count`` ``U`` as a (1,) int32 device tensor, and, if asked, the
    batch's :class:`Transpose` in place of the inverse (``None``: :meth:`Transpose.inverse`
    makes it). Positions are int32: ``n < 2**31``."""
    n = sorted_keys.numel()
    dev = _device(sorted_keys.device)
    suffix = "i32" if sorted_keys.dtype == torch.int32 else "i64"
    flags = torch.empty(n, dtype=torch.int64, device=dev)
    _run("unique.cu", f"unique_flags_{suffix}", dev, n, (sorted_keys, n, flags), per_warp=False)
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
    _run("unique.cu", f"unique_scatter_{suffix}", dev, n, args, per_warp=False)
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
    ids, inverse, start, count, tr = _scan_sorted(sorted_keys, order, transpose)
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
    dev = _device(ids.device)
    ids = _i64(ids, dev)
    hist = torch.zeros(num_rows, dtype=torch.int32, device=dev)
    args = (ids, n, num_rows, hist, out_of_range)
    _run("unique.cu", "dense_count", dev, (n + 31) // 32, args, per_warp=True)
    tiles = -(-num_rows // _DENSE_TILE)
    tile_counts = torch.empty(tiles, dtype=torch.int32, device=dev)
    threads = tiles * 256  # a 256-thread block per tile
    _run("unique.cu", "dense_tile_counts", dev, threads, (hist, num_rows, tile_counts), False)
    tile_ends = torch.cumsum(tile_counts, 0, dtype=torch.int32)
    uniq = torch.empty(n, dtype=torch.int64, device=dev)
    counts = torch.empty(n, dtype=torch.int64, device=dev)
    args = (hist, num_rows, tile_counts, tile_ends, uniq, counts)
    _run("unique.cu", "dense_emit", dev, threads, args, False)  # hist: positions from here
    inverse = None
    if want_inverse:
        inverse = torch.empty(n, dtype=torch.int64, device=dev)
        _run("unique.cu", "dense_inverse", dev, n, (ids, n, num_rows, hist, inverse), False)
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


# ---------------------------------------------------------------------------- the cache
class DeviceLookup:
    """What one step decided, as :class:`~tierstore.cache.Lookup`, but with the fill lists in
    buffers of which the first ``n_fill`` (a device scalar) are used, so that nobody waits for
    the count. In a sync-free step (``count`` given) ``ids``, ``slots`` and ``filled`` are
    buffers too, their first ``count`` entries used. The ``fill_*`` / ``victim_*`` properties
    return the trimmed lists (one device read); :meth:`trimmed` gives the whole ``Lookup``.
    """

    def __init__(
        self, ids, slots, filled, fill_index, fill_slots, victim_ids, victim_dirty, n_fill,
        count=None, holds=True,
    ):  # fmt: skip
        self.ids = ids  # (U,) int64, ascending
        self.slots = slots  # (U,) int64, -1 = conflict miss
        self.filled = filled  # (U,) int32, 1 where the id was inserted this step
        self.fill_index_buffer = fill_index  # (U,) int64, first n_fill used
        self.fill_slots_buffer = fill_slots  # (U,) int64
        self.victim_ids_buffer = victim_ids  # (U,) int64
        self.victim_dirty_buffer = victim_dirty  # (U,) bool
        self.n_fill = n_fill  # (1,) int32 on the device
        self.count = count  # (1,) int32 on the device: used entries of ids, or None (all)
        self.holds = holds  # the step locked its rows (False: nothing to release)
        self._trimmed: Lookup | None = None

    def trimmed(self) -> Lookup:
        """The step as a plain :class:`Lookup` (reads the counts from the device once)."""
        if self._trimmed is None:
            read = self.n_fill if self.count is None else torch.cat([self.n_fill, self.count])
            f, *rest = read.tolist()
            u = rest[0] if rest else self.ids.numel()
            self._trimmed = Lookup(
                self.ids[:u],
                self.slots[:u],
                self.fill_index_buffer[:f],
                self.fill_slots_buffer[:f],
                self.victim_ids_buffer[:f],
                self.victim_dirty_buffer[:f],
                ((self.slots >= 0) & (self.filled == 0))[:u],
            )
        return self._trimmed

    @property
    def hit(self) -> torch.Tensor:
        """(U,) bool: the id was cached before this step."""
        return self.trimmed().hit

    @property
    def fill_index(self) -> torch.Tensor:
        """(F,) positions in ``ids`` of the inserted rows, ascending."""
        return self.trimmed().fill_index

    @property
    def fill_slots(self) -> torch.Tensor:
        """(F,) slots of the inserted rows."""
        return self.trimmed().fill_slots

    @property
    def victim_ids(self) -> torch.Tensor:
        """(F,) rows evicted by the fills (``EMPTY`` where the way was empty)."""
        return self.trimmed().victim_ids

    @property
    def victim_dirty(self) -> torch.Tensor:
        """(F,) whether each victim was dirty (written back)."""
        return self.trimmed().victim_dirty

    @property
    def fill_ids(self) -> torch.Tensor:
        """Ids of the inserted rows, ascending."""
        return self.trimmed().fill_ids


MAX_WAYS = 64  # the widest set the kernels take (common.cuh ts_find_way: a 64-bit match mask)


class CudaCache(SetAssociativeCache):
    """:class:`~tierstore.cache.SetAssociativeCache` whose step runs as kernels.

    Same state, same results; the step is ``probe`` (lookup.cu), then the grouping of misses by
    set, the victims and the fill list (insert.cu), and for LFU the sketch (sketch.cu). A
    policy without a kernel functor, and ``strict`` lookups, use the torch version.
    """

    def __init__(self, rows: int, ways: int, policy, device: torch.device | str):
        if min(ways, rows) > MAX_WAYS:  # the probe keeps a set's matches in a 64-bit mask
            raise InvalidInputError(
                f"the CUDA kernels take at most {MAX_WAYS} ways, got {ways} (for {rows} rows); "
                "wider sets run on the CPU backend"
            )
        super().__init__(rows, ways, policy, _device(device))
        # whether lookup can take the unique count as a device tensor (kernels for the policy)
        self.sync_free = self.policy.name in _KERNEL_POLICIES
        # the next step's number, on the device: the kernels read and advance it themselves,
        # so a step captured in a CUDA graph replays correctly (``step`` mirrors it on the host)
        self.next_step = torch.ones(1, dtype=torch.int64, device=self.device)
        # misses per set during a step; the step leaves it at zero again
        self._set_misses = torch.zeros(self.sets, dtype=torch.int32, device=self.device)
        self._seg_start = torch.empty(self.sets, dtype=torch.int32, device=self.device)
        # a byte of each way's tag hash (hashing.tag_digest; anything where empty), ways padded
        # to 16 bytes a set (common.cuh ts_digest_stride): the probe compares a set's digests
        # as 16-byte vectors and reads a way's 8-byte tag only where its digest matches
        stride = -(-self.ways // 16) * 16
        self.digests = torch.zeros((self.sets, stride), dtype=torch.uint8, device=self.device)

    def _way_state(self, shape: tuple[int, int]):
        """Tags, stamps, locks and dirty bits as fields of one 32-byte record per way
        (``way_state``, the kernels' ``WayState``): a hit reads its tag and writes its score and
        lock in one memory sector, where three arrays cost three random sectors, and the
        backward marks a row dirty in the sector where it unlocks it. The views are what
        :class:`SetAssociativeCache` holds, so the torch code and the tests see the usual
        ``(S, W)`` tensors."""
        record = torch.zeros((*shape, 4), dtype=torch.int64, device=self.device)
        record[..., 0] = EMPTY
        self.way_state = record  # (S, W, 4): tag, stamp, lock (int32) and dirty (byte 20)
        dirty = record.view(torch.uint8)[..., 20].view(torch.bool)
        return record[..., 0], record[..., 1], record.view(torch.int32)[..., 4], dirty

    def row_state(self, width: int) -> torch.Tensor | None:
        """A one-float state (RowWiseAdagrad's) lives in the way's record, at byte 24 (the
        kernels' ``WayState.state``): the backward reads and writes it in the sector where it
        marks the row dirty and unlocks it, where an array of its own cost a random sector more
        per row (bench/RESULTS.md). Wider states get an array."""
        if width != 1:
            return None
        return self.way_state.view(torch.float32)[..., 6:7].view(-1, 1)

    def find(self, ids: torch.Tensor, sets: torch.Tensor | None = None) -> torch.Tensor:
        """Slot of each id, or -1 where it is not cached. Changes nothing. (``sets`` is
        accepted for the torch step's call and not needed: the kernel hashes the ids.)"""
        ids = _i64(ids, self.device)
        slots = torch.empty_like(ids)
        args = (ids, ids.numel(), self.way_state, self.digests, self.sets, self.ways, slots)
        _run("lookup.cu", "find_slots", self.device, ids.numel(), args, per_warp=False)
        return slots

    def lookup(
        self,
        ids: torch.Tensor,
        counts: torch.Tensor,
        strict: bool = False,
        count: torch.Tensor | None = None,
        hold: bool = True,
    ):
        """One step (see :meth:`SetAssociativeCache.lookup`); returns a :class:`DeviceLookup`.
        With ``count`` (a (1,) int32 device tensor) only the first ``count`` entries of ``ids``
        and ``counts`` are the batch's, and the host never reads how many (a sync-free step).

        ``hold=False`` is for a step whose rows are used and given back before any other step
        of this cache (an inference forward): its hits take no lock, a per-set mask of them
        keeps the step's own fills off them instead, and the fills take none either, so that
        the state is that of the step followed by its release, with no release to launch (a
        random read-modify-write per row). The result says so (``holds``); a policy without
        kernels, or ``strict``, locks as usual."""
        policy = self.policy.name
        if strict or policy not in _KERNEL_POLICIES:
            if count is not None:
                u = int(count[0])
                ids, counts = ids[:u], counts[:u]
            found = super().lookup(ids, counts, strict)
            sets, ways = found.fill_slots // self.ways, found.fill_slots % self.ways
            self.digests[sets, ways] = tag_digest(found.fill_ids)
            self.next_step.fill_(self.step + 1)
            return found
        dev = self.device
        ids, counts = _i64(ids, dev), _i64(counts, dev)
        n = ids.numel()
        self.step += 1
        i32, i64 = torch.int32, torch.int64
        slots = torch.empty(n, dtype=i64, device=dev)
        score = torch.empty(n, dtype=i64, device=dev)
        meta = torch.zeros(2, dtype=i32, device=dev)  # touched sets, segment cursor
        touched = torch.empty((3, n), dtype=i32, device=dev)  # set, misses, segment start
        segments = torch.empty(n, dtype=i32, device=dev)
        filled = torch.zeros(n, dtype=i32, device=dev)
        victim_by_pos = torch.empty(n, dtype=i64, device=dev)
        victim_dirty_by_pos = torch.empty(n, dtype=torch.uint8, device=dev)
        sk = self.sketch
        if sk is not None:
            sk_args = (sk.counters, sk.salts, sk.additions, sk.depth, sk.width, sk.sample_size)
            args = (ids, counts, n, count, *sk_args[:3], sk.depth, sk.width)
            _run("sketch.cu", "sketch_add", dev, n, args, per_warp=False)
        else:
            sk_args = (None, None, None, 0, 1, 0)
        # bits of this step's hits per set, where the step holds no locks
        hit_mask = None if hold else torch.zeros(self.sets, dtype=i64, device=dev)
        args = (ids, counts, n, count, self.way_state, self.digests, self.sets, self.ways,
                self.next_step, *sk_args, slots, score, self._set_misses, touched[0],
                meta[0:1], self.counters, hit_mask)  # fmt: skip
        _run("lookup.cu", f"probe_{policy}", dev, n, args, per_warp=False)
        args = (touched[0], meta[0:1], self._set_misses, meta[1:2], self._seg_start,
                touched[1], touched[2])  # fmt: skip
        _run("insert.cu", "reserve_segments", dev, (n + 31) // 32, args, per_warp=True)
        args = (ids, slots, n, count, self.sets, self._set_misses, self._seg_start, segments)
        _run("insert.cu", "scatter_misses", dev, n, args, per_warp=False)
        args = (touched[0], meta[0:1], touched[1], touched[2], segments, ids, score,
                self.way_state, self.digests, self.ways, slots, filled,
                victim_by_pos, victim_dirty_by_pos, self.counters, hit_mask)  # fmt: skip
        _run("insert.cu", f"choose_victims_{policy}", dev, min(n, self.sets), args, True)
        # the fills in ascending id order: a prefix sum over the batch, then a compaction
        rank = torch.cumsum(filled, 0, dtype=i32)
        fill_index = torch.empty(n, dtype=i64, device=dev)
        fill_slots = torch.empty(n, dtype=i64, device=dev)
        victim_ids = torch.empty(n, dtype=i64, device=dev)
        victim_dirty = torch.empty(n, dtype=torch.bool, device=dev)
        args = (filled, rank, n, slots, victim_by_pos, victim_dirty_by_pos, fill_index,
                fill_slots, victim_ids, victim_dirty, self.next_step)  # fmt: skip
        _run("insert.cu", "compact_fills", dev, n, args, per_warp=False)  # advances next_step
        if n == 0:  # nothing was launched, and an empty step is a step too
            self.next_step.add_(1)
        n_fill = rank[-1:] if n else torch.zeros(1, dtype=i32, device=dev)
        if sk is not None:
            self._age(sk)
        return DeviceLookup(
            ids, slots, filled, fill_index, fill_slots, victim_ids, victim_dirty, n_fill, count,
            hold,
        )  # fmt: skip

    def _age(self, sk) -> None:
        """Halves the sketch and the scores once ``sample_size`` additions have accumulated,
        deciding on the device (policy.FrequencySketch.age_if_due)."""
        dev = self.device
        items = max(sk.counters.numel(), self.stamps.numel())
        args = (sk.counters, sk.counters.numel(), sk.additions, sk.sample_size, self.way_state,
                self.stamps.numel())  # fmt: skip
        _run("sketch.cu", f"sketch_age_{self.policy.name}", dev, items, args, per_warp=False)
        args = (sk.additions, sk.sample_size, None)
        _run("sketch.cu", "sketch_age_reset", dev, 1, args, per_warp=False)

    def release(self, slots: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """Unlocks the slots a finished batch held (-1 entries are ignored; with ``count``, a
        device scalar, only the first ``count`` entries are the batch's)."""
        slots = _i64(slots, self.device)
        args = (slots, slots.numel(), count, self.way_state)
        _run("lookup.cu", "release_slots", self.device, slots.numel(), args, per_warp=False)

    def mark_dirty(self, slots: torch.Tensor) -> None:
        """Marks slots as written (-1 entries are ignored)."""
        slots = _i64(slots, self.device)
        args = (slots, slots.numel(), self.way_state)
        _run("lookup.cu", "mark_dirty_slots", self.device, slots.numel(), args, per_warp=False)


def new_cache(rows: int, ways: int, policy, device: torch.device) -> CudaCache:
    """The L1 cache state in HBM."""
    return CudaCache(rows, ways, policy, device)


def lookup(
    cache: CudaCache,
    ids: torch.Tensor,
    counts: torch.Tensor,
    count: torch.Tensor | None = None,
    hold: bool = True,
):
    """One cache step (see :meth:`SetAssociativeCache.lookup`); ``count`` and ``hold``: see
    :meth:`CudaCache.lookup`."""
    return cache.lookup(ids, counts, count=count, hold=hold)


# ------------------------------------------------------------------------------ moving rows
def _l2(store):
    """The device address of L2's rows (pinned host memory), or None if the device can't reach
    them (``TieredStore.l2_address``)."""
    return store.l2_address


def _l1(store) -> tuple:
    """L1's rows as the kernels take them (common.cuh ``Tiers``): the weights, the state and
    the state's pitch in floats (8 where it lives in the way records: ``CudaCache.row_state``;
    0 where rows have no state)."""
    pitch = store.l1_state.stride(0) if store.layout.state_width else 0
    return store.l1_weights, store.l1_state, pitch


def _l2_written(store, addresses: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Tells an L2 that tracks dirty rows (the SSD tier's host cache) that kernels wrote the rows
    at ``addresses[where]``; the full host table tracks nothing. (The CPU backend does this
    through ``host.write``.) Reads the addresses to the host: only on the SSD tier's path."""
    host = store.host
    if isinstance(host, HostTable):
        return
    if where is not None:
        addresses = addresses[where]
    host.mark_dirty(addresses)


def _mark_written(store, batch) -> None:
    """Marks the batch's conflict misses, updated in L2, in L2's map of written rows (if any)."""
    if store.l2_written:
        n = batch.ids.numel()
        args = (batch.slots, _i64(batch.addresses, store.device), n, batch.count,
                store.l2_written)  # fmt: skip
        _run("rows.cu", "mark_written", store.device, n, args, per_warp=False)


def _refresh_conflicts(store, batch, l2) -> None:
    """A conflict miss of ``batch`` was updated in L2; if a prefetched batch has filled it into
    L1 since (from the L2 row as it was then), copy the updated row over that L1 copy, as the
    CPU backend's ``scatter`` does. No host read: the kernel finds the rows itself."""
    dev = store.device
    n = batch.ids.numel()
    l1 = store.l1
    args = (batch.ids, batch.slots, _i64(batch.addresses, dev), n, batch.count, l1.way_state,
            l1.digests, l1.sets, l1.ways, *_l1(store), l2, store.layout.dim,
            store.layout.width)  # fmt: skip
    _run("rows.cu", "refresh_conflict_rows", dev, (n + 31) // 32, args, per_warp=True)


def move_rows(store, found, addresses: torch.Tensor) -> None:
    """Writes dirty victims back to their L2 address, then copies the filled rows in from L2
    (ascending ids) and records their L2 address; one kernel, zero-copy over PCIe."""
    l2 = _l2(store)
    if not isinstance(found, DeviceLookup) or l2 is None:
        found = found.trimmed() if isinstance(found, DeviceLookup) else found
        return cpu.move_rows(store, found, addresses)
    dev = store.device
    n = found.ids.numel()
    if not isinstance(store.host, HostTable):  # dirty victims dirty their L2 rows
        t = found.trimmed()
        _l2_written(store, store.l1_home[t.fill_slots[t.victim_dirty]])
    dim, width = store.layout.dim, store.layout.width
    l1 = _l1(store)
    vec4 = width % 4 == 0 and dim % 4 == 0 and l1[2] % 4 == 0  # every part 16-byte aligned
    # a never-written row's fill is computed from its id where L2 maps its written rows
    args = (found.fill_index_buffer, found.fill_slots_buffer, found.victim_dirty_buffer,
            found.n_fill, _i64(addresses, dev), *l1, store.l1_home, l2, dim, width,
            store.l2_written, seed_key(store.seed), float(store.init_scale),
            float(store.layout.initial_state))  # fmt: skip
    rows = _MOVE_ROWS[vec4]
    fn = "move_rows_vec4" if vec4 else "move_rows_scalar"
    _run("insert.cu", fn, dev, (n + rows - 1) // rows, args, per_warp=True)


def gather(store, batch, cols: int | None = None) -> torch.Tensor:
    """Rows ``(U, cols)`` of a batch from where they live: L1 slots, else L2 addresses."""
    cols = store.layout.width if cols is None else cols
    batch = batch.trimmed()
    l2 = _l2(store)
    if l2 is None:
        return cpu.gather(store, batch, cols)
    dev = store.device
    n = batch.ids.numel()
    out = torch.empty((n, cols), device=dev)
    args = (batch.slots, _i64(batch.addresses, dev), n, *_l1(store), l2, store.layout.dim,
            store.layout.width, cols, out)  # fmt: skip
    _run("rows.cu", "gather_rows", dev, n, args, per_warp=True)
    return out


def scatter(store, batch, rows: torch.Tensor) -> None:
    """Stores updated rows where they live; cached ones become dirty."""
    batch = batch.trimmed()
    l2 = _l2(store)
    if l2 is None:
        return cpu.scatter(store, batch, rows)
    dev = store.device
    n = batch.ids.numel()
    rows = rows.to(dev, torch.float32).contiguous()
    args = (batch.slots, _i64(batch.addresses, dev), n, *_l1(store), l2, store.l1.way_state,
            store.layout.dim, store.layout.width, rows)  # fmt: skip
    _run("rows.cu", "scatter_rows", dev, n, args, per_warp=True)
    _mark_written(store, batch)
    _refresh_conflicts(store, batch, l2)
    if n and not isinstance(store.host, HostTable):
        _l2_written(store, batch.addresses, batch.slots < 0)


# ------------------------------------------------------------------------ forward, backward
def _register_columns(dim: int) -> int | None:
    """Weights per lane of the backward kernels (a warp per row), None past 32 * 16 columns."""
    return next((k for k in _REGISTER_COLUMNS if 32 * k >= dim), None)


def graph_unsupported(store, optimizer: Optimizer | None) -> str | None:
    """Why a step of ``store`` cannot be captured in a CUDA graph, or None if it can: the
    step must run on the kernels from end to end with no host read (``graphs.py``)."""
    if store.inclusive_host or not getattr(store.l1, "sync_free", False):
        return "its step reads the device (an SSD tier, or a policy with no kernel)"
    if _l2(store) is None:
        return "its host table is not in pinned memory that the device can address"
    if _register_columns(store.layout.dim) is None:
        return (
            f"embedding_dim {store.layout.dim} is above the kernels' {32 * _REGISTER_COLUMNS[-1]}"
        )
    if optimizer is not None and optimizer.name not in _KERNEL_OPTIMIZERS:
        return f"the optimizer {optimizer.name!r} has no kernel"
    return None


def forward(
    store,
    batch,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Pooled bags ``(B, D)`` in one launch; ``offsets`` has ``B + 1`` entries, the last ``n``."""
    l2 = _l2(store)
    if l2 is None:
        return cpu.forward(store, batch.trimmed(), offsets, per_sample_weights, mode)
    dev = store.device
    dim, width = store.layout.dim, store.layout.width
    bags = offsets.numel() - 1
    out = torch.empty((max(bags, 0), dim), device=dev)
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.to(dev, torch.float32).contiguous()
    # float4 where rows are 16-byte aligned: L1's when dim % 4 == 0, L2's if width % 4 == 0 too
    fn = "forward_scalar" if dim % 4 else "forward_vec4" if width % 4 == 0 else "forward_vec4_l1"
    places, inverse = _index_rows(batch, dev)
    args = (_i64(offsets, dev), places, inverse, psw, batch.slots, _i64(batch.addresses, dev),
            store.l1_weights, l2, width, dim, bags, mode == "mean", out)  # fmt: skip
    _run("forward.cu", fn, dev, bags, args, True)
    return out


def _places(batch, dev: torch.device) -> torch.Tensor:
    """Each index's place (kernels/common.cuh ``ts_place``: its row's L1 slot, or the complement
    of its L2 address, and whether no other index reads the row), written from the batch's
    transpose once its rows are placed (kernels/unique.cu ``scatter_places``) and kept on it
    (``Batch.places``) for the forward and the backward."""
    if batch.places is None:
        tr = batch.transpose
        n = tr.order.numel()
        batch.places = torch.empty(n, dtype=torch.int64, device=dev)
        suffix = "i32" if tr.order.dtype == torch.int32 else "i64"
        args = (tr.order, tr.rank, n, batch.slots, _i64(batch.addresses, dev), batch.places)
        _run("unique.cu", f"scatter_places_{suffix}", dev, n, args, per_warp=False)
    return batch.places


def _index_rows(batch, dev: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(places, inverse)``, one of them None, for the kernels that reach each index's row
    (kernels/common.cuh ``ts_index_weights``). A batch with a transpose will see a backward: its
    places, written once for the forward and the backward; another batch: its inverse."""
    if batch.transpose is not None:
        return _places(batch, dev), None
    return None, _i64(batch.inverse, dev)


def _batch_length(batch) -> int:
    """The batch's number of indices, without making an inverse that its transpose stands for."""
    tr = batch.transpose
    return tr.order.numel() if tr is not None else batch.inverse.numel()


def backward(
    store,
    batch,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    mode: str,
    optimizer: Optimizer | None,
    want_weight_grad: bool,
) -> torch.Tensor | None:
    """Reduces the gradient per unique row (the batch's inverse sorted stably: index order
    within a row, deterministic), applies the fused optimizer where each row lives (marking L1
    rows dirty and, where the batch holds locks, unlocking them: its release then leaves L1
    alone), and returns the gradient of the per-sample weights if asked."""
    dim = store.layout.dim
    k = _register_columns(dim)
    group = 32  # lanes per chunk of sorted entries (kernels/backward.cu says why not 8)
    l2 = _l2(store)
    opt_name = optimizer.name if optimizer is not None else None
    if l2 is None or k is None or (optimizer is not None and opt_name not in _KERNEL_OPTIMIZERS):
        batch = batch.trimmed()
        return cpu.backward(
            store, batch, grad_out, offsets, per_sample_weights, mode, optimizer, want_weight_grad
        )
    dev = store.device
    n = _batch_length(batch)
    bags = offsets.numel() - 1
    width = store.layout.width
    offsets = _i64(offsets, dev)
    addresses = _i64(batch.addresses, dev)
    grad_out = grad_out.to(dev, torch.float32).contiguous()
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.to(dev, torch.float32).contiguous()
    mean = mode == "mean"
    weight_grad = None
    if want_weight_grad:
        weight_grad = torch.empty(n, device=dev)
        places, inverse = _index_rows(batch, dev)  # before a missing transpose is made below
        args = (offsets, places, inverse, grad_out, batch.slots, addresses, store.l1_weights,
                l2, width, dim, bags, mean, weight_grad)  # fmt: skip
        _run("backward.cu", "weight_grad", dev, bags, args, per_warp=True)
    if optimizer is not None and n:
        # the sparse transpose: the unique step's sort (kernels/unique.cu), else a sort of the
        # inverse read by the same kernels
        tr = getattr(batch, "transpose", None)
        if tr is None:
            sorted_u, order = radix_sort(batch.inverse, max(n - 1, 1).bit_length())
            tr = _scan_sorted(sorted_u, order, transpose=True)[-1]
            batch.transpose = tr  # a batch without one has no places yet: _places writes them
        bag = torch.empty(n, dtype=torch.int32, device=dev)  # the multi list's entries' bags
        _run("backward.cu", "bag_of_index", dev, bags, (offsets, bags, bag), per_warp=True)
        hyper = _hyper(store, optimizer, dev)  # (lr, eps) on the device: see load_hyper
        # each L1 row is marked dirty and, where the batch holds locks, unlocked by the kernel
        # that updates it, in its way record (kernels/backward.cu): the release leaves L1 alone
        # ... unless a later batch's lookup may be choosing victims on the prefetch stream beside
        # this update (pipeline.py): then the locks stay until it is done (the release below)
        unlock = batch.holds and not store.side_pending
        rows = (batch.slots, addresses, *_l1(store), l2, store.l1.way_state, unlock, width,
                dim)  # fmt: skip
        chunks = (n + group - 1) // group
        partial = torch.empty((chunks * 2, dim), device=dev)
        # The two kinds of rows are disjoint, so their kernels run at once: the multi list's
        # on a side stream (latency-bound: a few rows in flight per warp), beside the rows read
        # by one index, which keep HBM busy. A graph captures the fork and the join.
        main, side = torch.cuda.current_stream(dev), _side_stream(_device(dev))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            # the multi list by chunks (its length on the device: at most n) ...
            length = tr.list_length
            args = (tr.multi_u, tr.multi_index, length, bag, offsets, psw, grad_out, n, mean,
                    *rows, hyper, partial)  # fmt: skip
            fn = f"reduce_chunks_{opt_name}_g{group}_k{k}"
            _run("backward.cu", fn, dev, (chunks * group + 31) // 32, args, per_warp=True)
            # ... rows whose entries cross chunks: their partial sums, added in chunk order
            args = (tr.multi_u, tr.multi_first, tr.start, n, length, group, dim, partial)
            _run("backward.cu", f"sum_groups_k{k}", dev, chunks, args, per_warp=True)
            args = (tr.multi_u, tr.multi_first, tr.start, n, length, group, *rows, hyper,
                    partial)  # fmt: skip
            fn = f"finish_crossing_{opt_name}_k{k}"
            _run("backward.cu", fn, dev, chunks, args, per_warp=True)
        # rows read by one index, bag by bag (each bag's gradient read once)
        args = (offsets, bags, _places(batch, dev), psw, grad_out, mean, *rows, hyper)
        _run("backward.cu", f"update_singles_{opt_name}_k{k}", dev, bags, args, per_warp=True)
        main.wait_stream(side)  # partial and the batch's buffers are freed on main: after this
        store.join_side()  # later lookups' fills are done before the refresh reads L1's tags
        batch.l1_released = unlock
        _mark_written(store, batch)
        if store.l1.step != batch.lookup_number:  # another batch's fills may hold stale copies
            _refresh_conflicts(store, batch, l2)
        if batch.slots.numel() and not isinstance(store.host, HostTable):
            _l2_written(store, addresses, batch.slots < 0)
    return weight_grad


def _hyper(store, optimizer: Optimizer, dev: torch.device) -> torch.Tensor:
    """The ``(2,)`` float32 device tensor the update kernels read the rule's ``lr`` and ``eps``
    from (kernels/backward.cu ``hyper``), made once per table and brought up to date here,
    outside a capture (a captured step's :func:`load_hyper` runs before each replay)."""
    if getattr(store, "hyper", None) is None:  # empty: a fill made in a capture would replay
        store.hyper, store.hyper_values = torch.empty(2, device=dev), None
    if not torch.cuda.is_current_stream_capturing():
        load_hyper(store, optimizer)
    return store.hyper


def load_hyper(store, optimizer: Optimizer | None) -> None:
    """Writes ``optimizer``'s current ``lr`` and ``eps`` into the table's device scalars if they
    changed (a scheduler's new lr), on the current stream: the kernels of later steps, eager or
    replayed from a graph, read them; earlier ones have read theirs (stream order)."""
    if optimizer is None or getattr(store, "hyper", None) is None:
        return
    values = (float(optimizer.lr), float(getattr(optimizer, "eps", 0.0)))
    if values != store.hyper_values:
        store.hyper.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
        store.hyper_values = values


# ------------------------------------------------------------------ initial rows, hashing
def initial_rows(
    ids: torch.Tensor,
    dim: int,
    width: int,
    seed: int,
    scale: float,
    initial_state: float = 0.0,
) -> torch.Tensor:
    """Rows ``(n, width)`` of never-written ``ids`` on their (CUDA) device:
    ``hashing.initial_weights`` bit for bit, then the optimizer state at ``initial_state``."""
    dev = _device(ids.device)
    ids = _i64(ids, dev)
    out = torch.empty((ids.numel(), width), device=dev)
    args = (ids, ids.numel(), dim, width, seed_key(seed), float(scale), float(initial_state), out)
    _run("init.cu", "initial_rows", dev, ids.numel(), args, per_warp=True)
    return out


def hash_ids(ids: torch.Tensor, sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mix64(ids), set_index(ids, sets))`` computed by the kernels' ``common.cuh``."""
    dev = _device(ids.device)
    ids = _i64(ids, dev)
    mixed, set_of = torch.empty_like(ids), torch.empty_like(ids)
    args = (ids, ids.numel(), sets, mixed, set_of)
    _run("init.cu", "hash_ids", dev, ids.numel(), args, per_warp=False)
    return mixed, set_of


def sketch_add(sketch, ids: torch.Tensor, counts: torch.Tensor) -> None:
    """Adds ``counts`` accesses of (unique) ``ids`` to a device-resident
    :class:`~tierstore.policy.FrequencySketch` (its ``add`` without the estimates)."""
    dev = _device(sketch.counters.device)
    ids, counts = _i64(ids, dev), _i64(counts, dev)
    args = (ids, counts, ids.numel(), None, sketch.counters, sketch.salts, sketch.additions,
            sketch.depth, sketch.width)  # fmt: skip
    _run("sketch.cu", "sketch_add", dev, ids.numel(), args, per_warp=False)


def sketch_estimate(sketch, ids: torch.Tensor) -> torch.Tensor:
    """The sketch's estimates of ``ids`` (int32), as :meth:`FrequencySketch.estimate`."""
    dev = _device(sketch.counters.device)
    ids = _i64(ids, dev)
    out = torch.empty(ids.numel(), dtype=torch.int32, device=dev)
    args = (ids, ids.numel(), sketch.counters, sketch.salts, sketch.depth, sketch.width, out)
    _run("sketch.cu", "sketch_estimate", dev, ids.numel(), args, per_warp=False)
    return out


def sketch_age_if_due(sketch) -> torch.Tensor:
    """Halves the sketch once ``sample_size`` additions have accumulated, deciding on the
    device; returns a device flag (int32, 1 if it halved)."""
    dev = _device(sketch.counters.device)
    aged = torch.zeros(1, dtype=torch.int32, device=dev)
    n = sketch.counters.numel()
    args = (sketch.counters, n, sketch.additions, sketch.sample_size, None, 0)
    _run("sketch.cu", "sketch_age_lru", dev, n, args, per_warp=False)  # LRU: no scores to age
    _run(
        "sketch.cu", "sketch_age_reset", dev, 1, (sketch.additions, sketch.sample_size, aged), False
    )
    return aged
