"""Replay through the engine's own set-associative cache code, batch by batch.

The set-associative LRU and LFU here are not models of the engine: they are the engine's
``SetAssociativeCache`` (CPU backend) or its CUDA kernels, stepped with the same unique ids
and counts that ``TieredEmbeddingBag`` would give them, so the counters equal ``stats()`` of
a training run on the same batches. With ``host_rows``, a second cache stands for L2 (inclusive
of L1, as in the engine) and every unique lookup is attributed to L1, L2 or L3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import cpu
from .. import stats as st
from ..cache import EMPTY, SetAssociativeCache
from ..cache_compiled import CompiledCache, Scored
from ..compiled import COMPILED, compiled
from ..errors import InvalidInputError
from .invariants import check_replay


@dataclass
class EngineResult:
    """Counters of one replay, as ``CacheStats`` counts them (per unique id in a batch)."""

    policy: str
    cache_rows: int
    requests: int = 0
    unique: int = 0
    hits: int = 0
    misses: int = 0
    conflicts: int = 0
    evictions: int = 0
    l2_hits: int = 0  # L1 misses found in L2 (two-level replay only)
    l3_reads: int = 0  # L1 misses that L2 did not hold either
    l2_conflicts: int = 0  # rows L2 could not place (the engine would raise CapacityError)
    seconds: float = 0.0

    @property
    def hit_ratio(self) -> float:
        """Requests whose row was in L1, ``1 - misses / requests`` (repeats within a batch
        count as hits; at batch 1, libCacheSim's hit ratio): ``CacheStats.hit_ratio``."""
        return (self.requests - self.misses) / self.requests if self.requests else 0.0

    @property
    def unique_hit_ratio(self) -> float:
        """L1 hits per unique id looked up: ``CacheStats.unique_hit_ratio``."""
        return self.hits / self.unique if self.unique else 0.0

    @property
    def request_hit_ratio(self) -> float:
        """Deprecated name of :attr:`hit_ratio`."""
        return self.hit_ratio


def _backend(device: str):
    if device == "cuda":
        from .. import cuda

        if not cuda.available():
            raise InvalidInputError("device cuda: no CUDA device with CuPy is usable here")
        return cuda
    return cpu


_INDEX_IDS = 1 << 26  # the most ids the CPU replay keeps a slot index for (512 MiB)


@compiled
def _runs(keys):
    """The distinct values of sorted ``keys`` (as int64) and how often each occurs."""
    n = keys.size
    uniq = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    m = min(n, 1)
    if n:
        uniq[0], starts[0] = keys[0], 0
    for i in range(1, n):  # no branch: each key is written, and kept if it starts a run
        key = np.int64(keys[i])
        uniq[m] = key
        starts[m] = i
        m += key != uniq[m - 1]
    starts[m] = n
    counts = np.empty(m, np.int64)
    for j in range(m):
        counts[j] = starts[j + 1] - starts[j]
    return uniq[:m], counts


def _unique(ids: np.ndarray, narrow: bool) -> tuple[np.ndarray, np.ndarray]:
    """A batch's unique ids (ascending, int64) and their counts. The replay needs no inverse
    (nor the transpose the training path builds): numpy's sort, then one compiled pass over
    the runs (without numba, numpy's unique: its bookkeeping around the same sort costs as
    much again); on 32-bit keys (ids known to be below 2**31) the sort is a third faster."""
    keys = ids.astype(np.int32) if narrow else ids
    if COMPILED:
        return _runs(np.sort(keys))
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq.astype(np.int64), counts


def _device_step(
    backend, l1, ids: torch.Tensor, num_rows: int | None, out_of_range: torch.Tensor | None
) -> None:
    """One cache step of a batch with the unique count left on the device (no host read);
    an id outside ``[0, num_rows)`` sets the device flag ``out_of_range``."""
    uniq, counts, count = backend.unique_counts(ids, num_rows, out_of_range)
    l1.release(backend.lookup(l1, uniq, counts, count).slots, count)


class _CapturedStep:
    """One sync-free cache step for batches of exactly ``n`` ids, captured once as a CUDA graph
    and replayed per batch: the step's ~20 launches cost one (the replay of small batches is
    bound by launch overhead otherwise). The kernels keep the step clock on the device
    (``CudaCache.next_step``), so replays advance it; ``step`` on the host is advanced here.
    The cache's kernels must have run once before (capture cannot load a module)."""

    def __init__(
        self, backend, l1, n: int, num_rows: int | None, out_of_range: torch.Tensor | None
    ):
        self.l1 = l1
        self.ids = torch.zeros(n, dtype=torch.int64, device=l1.device)  # refilled per replay
        self.graph = torch.cuda.CUDAGraph()
        # Captured on a side stream, as torch.cuda.graph does, but without its gc.collect() and
        # empty_cache(): they cost milliseconds, a tenth of a 10 M-request replay.
        main, side = torch.cuda.current_stream(l1.device), torch.cuda.Stream(l1.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.graph.capture_begin()
            try:
                _device_step(backend, l1, self.ids, num_rows, out_of_range)
            finally:
                self.graph.capture_end()
        main.wait_stream(side)
        l1.step -= 1  # the capture ran nothing

    def __call__(self, ids: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.graph.replay()
        self.l1.step += 1


def _cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Called with each batch's unique ids (U,) and whether each was cached before the step (U,)
Observer = Callable[[torch.Tensor, torch.Tensor], None]


def _scored_ahead(
    l1: SetAssociativeCache, batches: Iterator, narrow: bool, observe: Observer | None = None
) -> bool:
    """Steps ``l1`` (a CPU cache, stepped once already) with the rest of ``batches`` on two
    threads: a worker takes each batch's unique step and the sketch's part of its cache step
    (``CompiledCache.score``) while this thread places the batch before it and releases it
    (``CompiledCache.place``, which never touches the sketch). Both sides are compiled code
    that releases the GIL, so on two cores they overlap (for Zipf 0.8 and LFU, the worker's
    part is nearly half of a step). The same state as stepping batch after batch. Returns
    False, having stepped nothing, where the compiled step does not apply to ``l1`` or one
    core is all there is. ``observe``: as :func:`replay_engine`'s."""
    probe = torch.zeros(0, dtype=torch.int64)
    if not (isinstance(l1, CompiledCache) and l1.supports(probe, probe)) or _cores() < 2:
        return False

    def score(batch) -> Scored:
        ids = torch.as_tensor(batch, dtype=torch.int64).cpu().numpy()
        return l1.score(*_unique(ids, narrow))

    def place(ready: Scored) -> None:
        out = l1.place(ready)
        if observe is not None:
            observe(torch.from_numpy(ready.ids), out[-1])  # the last is ``hit``
        l1.release(out[0])

    with ThreadPoolExecutor(1, thread_name_prefix="replay-score") as worker:
        pending = None
        for batch in batches:
            # the previous batch's scores first: an error there stops the replay before
            # this batch reaches the sketch
            ready = pending.result() if pending is not None else None
            pending = worker.submit(score, batch)
            if ready is not None:
                place(ready)
        if pending is not None:
            place(pending.result())
    return True


def replay_engine(
    batches: Iterable[np.ndarray | torch.Tensor],
    cache_rows: int,
    policy: str = "lru",
    ways: int = 32,
    host_rows: int | None = None,
    device: str = "cpu",
    num_rows: int | None = None,
    observe: Observer | None = None,
) -> EngineResult:
    """Steps the engine's cache with each batch of ids (one training step each) and counts.

    Args:
        batches: id arrays, one per step (``--batch`` ids each); on the device for speed.
        cache_rows, ways, policy: the L1 cache, as ``TieredEmbeddingBag`` takes them.
        host_rows: size of an L2 cache in front of L3 (``None``: L2 holds everything).
        device: ``"cpu"`` (torch) or ``"cuda"`` (the engine's kernels).
        num_rows: every id is known to lie in ``[0, num_rows)``: on the CPU the cache then
            keeps a slot index per id (up to 2**26 ids), and the CUDA unique step counts the
            ids in a histogram of ``num_rows`` entries (where that is at most 32 times the
            batch: ``cuda.unique_counts``) or sorts 32-bit keys; ``None``: any int64 id.
    """
    import time

    backend = _backend(device)
    dev = torch.device(device)
    if backend.name == "cpu":  # ids known to be few: find by a per-id slot index
        bound = num_rows if num_rows is not None and num_rows <= _INDEX_IDS else None
        l1 = cpu.new_cache(cache_rows, ways, policy, dev, id_bound=bound)
    else:
        l1 = backend.new_cache(cache_rows, ways, policy, dev)
    l2 = cpu.new_cache(host_rows, 32, policy, "cpu") if host_rows else None
    home = torch.full((l1.capacity,), -1, dtype=torch.int64)  # L2 slot of each L1 slot
    res = EngineResult(policy, l1.capacity)
    # One level on the kernels: the training path's sync-free step, the unique count never
    # read by the host, so that the batches queue up on the device back to back.
    sync_free = l2 is None and observe is None and getattr(l1, "sync_free", False)
    narrow = num_rows is not None and num_rows <= 1 << 31
    captured: _CapturedStep | None = None
    # set on the device by a step that meets an id outside [0, num_rows); read once, at the end
    out_of_range = None
    if sync_free and num_rows is not None:
        out_of_range = torch.zeros(1, dtype=torch.int32, device=dev)
    # One level on the CPU: once the first batch has compiled the step, the rest are stepped
    # on two threads (_scored_ahead)
    ahead = l2 is None and backend.name == "cpu"
    batches = iter(batches)
    t0 = time.perf_counter()
    for batch in batches:
        ids = torch.as_tensor(batch, dtype=torch.int64).to(dev)
        if sync_free:
            if captured is not None and ids.numel() == captured.ids.numel():
                captured(ids)
                continue
            _device_step(backend, l1, ids, num_rows, out_of_range)
            if captured is None and ids.numel():  # every kernel has run once: capture
                captured = _CapturedStep(backend, l1, ids.numel(), num_rows, out_of_range)
            continue
        if ids.device.type == "cpu":  # numpy's sort is several times as fast as torch's
            uniq, counts = map(torch.from_numpy, _unique(ids.numpy(), narrow))
        else:
            uniq, counts = torch.unique(ids, return_counts=True)
        if l2 is not None:
            cpu_uniq = uniq.cpu()
            before = l2.counters.clone()
            found2 = l2.lookup(cpu_uniq, torch.ones_like(cpu_uniq))
            l2_slots = found2.slots
            res.l2_conflicts += int(l2.counters[st.CONFLICTS] - before[st.CONFLICTS])
        found = backend.lookup(l1, uniq, counts)
        if observe is not None:
            observe(uniq, found.hit)
        if l2 is not None:
            fill_slots = found.fill_slots.cpu()
            evicted = (found.victim_ids != EMPTY).cpu()
            missed = ~found.hit.cpu()  # conflict misses included
            in_l2 = found2.hit[missed]  # L1 misses that L2 already held
            res.l2_hits += int(in_l2.sum())
            res.l3_reads += int((~in_l2).sum())
            # inclusion, as in the engine: rows in L1 stay pinned in L2
            old = home[fill_slots[evicted]]
            l2.locks.view(-1)[old[old >= 0]] -= 1
            new = l2_slots[found.fill_index.cpu()]
            l2.locks.view(-1)[new[new >= 0]] += 1
            home[fill_slots] = new
            l2.release(l2_slots)
        l1.release(found.slots)
        if ahead and _scored_ahead(l1, batches, narrow, observe):
            break
        ahead = False
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    res.seconds = time.perf_counter() - t0
    if out_of_range is not None and int(out_of_range):  # as the CPU replay's IndexError
        raise IndexError(f"ids must lie in [0, {num_rows}) (num_rows): the replay is void")
    c = l1.counters.tolist()
    res.requests, res.unique, res.hits = c[st.REQUESTS], c[st.UNIQUE], c[st.HITS]
    res.misses, res.conflicts, res.evictions = c[st.MISSES], c[st.CONFLICTS], c[st.EVICTIONS]
    check_replay(res, l1, l2, home)  # locks zero, counters consistent: else InternalError
    return res
