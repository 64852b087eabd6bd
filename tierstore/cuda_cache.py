"""The CUDA L1 cache: :class:`~tierstore.cache.SetAssociativeCache`'s state in HBM and its step
as kernels (kernels/lookup.cu, kernels/insert.cu, kernels/sketch.cu).

Shapes: ``U`` unique rows, ``S`` sets of ``W`` ways.
"""

from __future__ import annotations

import warnings

import torch

from . import stats as st
from .cache import EMPTY, Lookup, SetAssociativeCache
from .cuda_launch import cuda_device, int64_on, run_kernel
from .errors import FallbackWarning, InvalidInputError
from .hashing import tag_digest


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
    set, the victims and the fill list (insert.cu), and for LFU the sketch (sketch.cu): the
    kernels instantiated with the score functor the policy declares (``policy.cuda_functor``).
    A policy that declares none (with a :class:`~tierstore.errors.FallbackWarning`), and
    ``strict`` lookups, use the torch version.
    """

    def __init__(self, rows: int, ways: int, policy, device: torch.device | str):
        if min(ways, rows) > MAX_WAYS:  # the probe keeps a set's matches in a 64-bit mask
            raise InvalidInputError(
                f"the CUDA kernels take at most {MAX_WAYS} ways, got {ways} (for {rows} rows); "
                "wider sets run on the CPU backend"
            )
        super().__init__(rows, ways, policy, cuda_device(device))
        # the policy's score functor (kernels/policy.cuh), which picks the step's kernels
        self.functor = self.policy.cuda_functor
        if self.functor is None:
            warnings.warn(
                f"the policy {getattr(self.policy, 'name', type(self.policy).__name__)!r} "
                "declares no cuda_functor: the CUDA cache steps it as torch ops, which read the "
                "device (no CUDA graph)",
                FallbackWarning,
                stacklevel=2,
            )
        # whether lookup can take the unique count as a device tensor (kernels for the policy)
        self.sync_free = self.functor is not None
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
        self.writebacks = WritebackWatch(self.counters)

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
        ids = int64_on(ids, self.device)
        slots = torch.empty_like(ids)
        args = (ids, ids.numel(), self.way_state, self.digests, self.sets, self.ways, slots)
        run_kernel("lookup.cu", "find_slots", self.device, ids.numel(), args, per_warp=False)
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
        if strict or self.functor is None:
            if count is not None:
                u = int(count[0])
                ids, counts = ids[:u], counts[:u]
            found = super().lookup(ids, counts, strict)
            sets, ways = found.fill_slots // self.ways, found.fill_slots % self.ways
            self.digests[sets, ways] = tag_digest(found.fill_ids)
            self.next_step.fill_(self.step + 1)
            return found
        dev = self.device
        ids, counts = int64_on(ids, dev), int64_on(counts, dev)
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
            run_kernel("sketch.cu", "sketch_add", dev, n, args, per_warp=False)
        else:
            sk_args = (None, None, None, 0, 1, 0)
        # bits of this step's hits per set, where the step holds no locks
        hit_mask = None if hold else torch.zeros(self.sets, dtype=i64, device=dev)
        args = (ids, counts, n, count, self.way_state, self.digests, self.sets, self.ways,
                self.next_step, *sk_args, slots, score, self._set_misses, touched[0],
                meta[0:1], self.counters, hit_mask)  # fmt: skip
        run_kernel("lookup.cu", f"probe_{self.functor.suffix}", dev, n, args, per_warp=False)
        args = (touched[0], meta[0:1], self._set_misses, meta[1:2], self._seg_start,
                touched[1], touched[2])  # fmt: skip
        run_kernel("insert.cu", "reserve_segments", dev, (n + 31) // 32, args, per_warp=True)
        args = (ids, slots, n, count, self.sets, self._set_misses, self._seg_start, segments)
        run_kernel("insert.cu", "scatter_misses", dev, n, args, per_warp=False)
        args = (touched[0], meta[0:1], touched[1], touched[2], segments, ids, score,
                self.way_state, self.digests, self.ways, slots, filled,
                victim_by_pos, victim_dirty_by_pos, self.counters, hit_mask)  # fmt: skip
        run_kernel(
            "insert.cu", f"choose_victims_{self.functor.suffix}", dev, min(n, self.sets), args, True
        )
        # the fills in ascending id order: a prefix sum over the batch, then a compaction
        rank = torch.cumsum(filled, 0, dtype=i32)
        fill_index = torch.empty(n, dtype=i64, device=dev)
        fill_slots = torch.empty(n, dtype=i64, device=dev)
        victim_ids = torch.empty(n, dtype=i64, device=dev)
        victim_dirty = torch.empty(n, dtype=torch.bool, device=dev)
        args = (filled, rank, n, slots, victim_by_pos, victim_dirty_by_pos, fill_index,
                fill_slots, victim_ids, victim_dirty, self.next_step)  # fmt: skip
        run_kernel("insert.cu", "compact_fills", dev, n, args, per_warp=False)  # advances next_step
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
        run_kernel(
            "sketch.cu", f"sketch_age_{self.functor.suffix}", dev, items, args, per_warp=False
        )
        args = (sk.additions, sk.sample_size, None)
        run_kernel("sketch.cu", "sketch_age_reset", dev, 1, args, per_warp=False)

    def release(self, slots: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """Unlocks the slots a finished batch held (-1 entries are ignored; with ``count``, a
        device scalar, only the first ``count`` entries are the batch's)."""
        slots = int64_on(slots, self.device)
        args = (slots, slots.numel(), count, self.way_state)
        run_kernel("lookup.cu", "release_slots", self.device, slots.numel(), args, per_warp=False)

    def mark_dirty(self, slots: torch.Tensor) -> None:
        """Marks slots as written (-1 entries are ignored)."""
        slots = int64_on(slots, self.device)
        args = (slots, slots.numel(), self.way_state)
        run_kernel(
            "lookup.cu", "mark_dirty_slots", self.device, slots.numel(), args, per_warp=False
        )


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


class WritebackWatch:
    """Whether a CUDA cache wrote dirty victims back lately, known on the host without a wait.

    Each eager call queues a copy of the cache's writeback counter (``stats`` ``WRITEBACKS``,
    counted by the cache step's kernel) to page-locked memory and reads the last copy that has
    landed (an event's query, never a wait). The row moves sort their writebacks by L2 address
    (``cuda_rows.victim_order``: a radix sort and its masks, 15 launches) only while the
    counter moves: a step of all hits, or of fills into empty ways, has nothing to sort and
    the eager step is bound by the host's launches. The order changes only the speed of the
    writes (any order writes the same rows), so a reading one or two steps old is safe. A CUDA
    graph being captured always sorts (its replays cost no launches)."""

    def __init__(self, counters: torch.Tensor):
        self._counter = counters[st.WRITEBACKS : st.WRITEBACKS + 1]  # (1,) int64, device
        self._copy = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._landed: torch.cuda.Event | None = None
        self._seen = 0  # the counter at the last reading
        self._moving = True  # whether it moved between the last two readings (True until one)

    def lately(self) -> bool:
        """Whether the writeback counter moved between the last two readings of it."""
        if torch.cuda.is_current_stream_capturing():
            return True
        if self._landed is not None and self._landed.query():
            count = int(self._copy[0])
            self._moving, self._seen = count != self._seen, count
            self._landed = None
        if self._landed is None:  # the next reading
            self._copy.copy_(self._counter, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record()
        return self._moving
