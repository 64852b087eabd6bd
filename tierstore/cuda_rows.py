"""Moving rows between the tiers on the device (kernels/insert.cu, kernels/rows.cu): fills and
write-backs of a cache step, and a batch's rows gathered and scattered where they live. L2's
rows are read and written in pinned host memory directly over PCIe (zero-copy).

Shapes: ``U`` unique rows, ``D`` embedding dim, rows of ``width`` floats.
"""

from __future__ import annotations

import torch

from . import cpu
from .cuda_cache import DeviceLookup
from .cuda_launch import int64_on, run_kernel
from .cuda_unique import radix_sort

_MOVE_ROWS = {True: 8, False: 4}  # rows per warp of move_rows_vec4 / move_rows_scalar


def kernel_l2(store):
    """The device address of L2's rows (pinned host memory), or None if the device can't reach
    them (``TieredStore.l2_address``)."""
    return store.l2_address


def kernel_l1(store) -> tuple:
    """L1's rows as the kernels take them (common.cuh ``Tiers``): the weights, the state and
    the state's pitch in floats (8 where it lives in the way records: ``CudaCache.row_state``;
    0 where rows have no state)."""
    pitch = store.l1.state.stride(0) if store.layout.state_width else 0
    return store.l1.weights, store.l1.state, pitch


def mark_written(store, batch) -> None:
    """Marks the batch's conflict misses, updated in L2, in L2's map of written rows (if any)."""
    if store.l2_written:
        n = batch.ids.numel()
        args = (batch.slots, int64_on(batch.addresses, store.device), n, batch.count,
                store.l2_written)  # fmt: skip
        run_kernel("rows.cu", "mark_written", store.device, n, args, per_warp=False)


def refresh_conflicts(store, batch, l2) -> None:
    """A conflict miss of ``batch`` was updated in L2; if a prefetched batch has filled it into
    L1 since (from the L2 row as it was then), copy the updated row over that L1 copy, as the
    CPU backend's ``scatter`` does. No host read: the kernel finds the rows itself."""
    dev = store.device
    n = batch.ids.numel()
    l1 = store.l1
    args = (batch.ids, batch.slots, int64_on(batch.addresses, dev), n, batch.count, l1.way_state,
            l1.digests, l1.sets, l1.ways, *kernel_l1(store), l2, store.layout.dim,
            store.layout.width)  # fmt: skip
    run_kernel("rows.cu", "refresh_conflict_rows", dev, (n + 31) // 32, args, per_warp=True)


def victim_order(store, found) -> torch.Tensor:
    """``(U,)`` int32 whose first ``n_fill`` entries are the fill positions ascending by the L2
    address their dirty victim goes back to, clean victims after them; the entries past
    ``n_fill`` are unused (garbage on CUDA, where the sort stops at the count the device holds:
    a step of all hits sorts nothing). A kernel's writes over PCIe run 2.3x faster with the
    host addresses ascending than in random order (bench/exp/pcie_moves.py)."""
    n = found.fill_slots_buffer.numel()
    dev = store.device
    bits = max(store.host.data.shape[0], 1).bit_length()  # (1 << bits) - 1: past every row
    if dev.type == "cuda" and bits <= 31:  # one kernel for the keys, sorted over their bits
        keys = torch.empty(n, dtype=torch.int64, device=dev)  # the first n_fill written
        args = (found.fill_slots_buffer, found.victim_dirty_buffer, found.n_fill, store.l1.home,
                n, (1 << bits) - 1, keys)  # fmt: skip
        run_kernel("insert.cu", "victim_keys", dev, n, args, per_warp=False)
        return radix_sort(keys, bits, count=found.n_fill)[1]
    used = torch.arange(n, device=dev) < found.n_fill  # the fills' count stays on the device
    dirty = found.victim_dirty_buffer & used
    slots = found.fill_slots_buffer.clamp(0, store.l1.home.numel() - 1)  # unused: garbage
    keys = torch.where(dirty, store.l1.home[slots], (1 << bits) - 1)
    return torch.sort(keys, stable=True).indices.to(torch.int32)


def move_rows(store, found, addresses: torch.Tensor) -> None:
    """Writes dirty victims back to their L2 address (ascending), then copies the filled rows
    in from L2 (ascending ids) and records their L2 address: two launches of kernels/insert.cu
    ``move_rows``, zero-copy over PCIe."""
    l2 = kernel_l2(store)
    if not isinstance(found, DeviceLookup) or l2 is None:
        found = found.trimmed() if isinstance(found, DeviceLookup) else found
        return cpu.move_rows(store, found, addresses)
    dev = store.device
    n = found.ids.numel()
    dim, width = store.layout.dim, store.layout.width
    l1 = kernel_l1(store)
    vec4 = width % 4 == 0 and dim % 4 == 0 and l1[2] % 4 == 0  # every part 16-byte aligned
    # null: no dirty victim lately, the writebacks (if any) go in fill order without a sort
    order = victim_order(store, found) if store.l1.writebacks.lately() else None
    # a never-written row's fill is computed from its id where L2 maps its written rows
    rows = _MOVE_ROWS[vec4]
    fn = "move_rows_vec4" if vec4 else "move_rows_scalar"
    fills = (found.fill_index_buffer, found.fill_slots_buffer, found.victim_dirty_buffer,
             found.n_fill, order)  # fmt: skip
    seeds = store.row_seeds
    init = (*seeds, seeds.starts.numel(), float(store.layout.initial_state))
    rest = (int64_on(addresses, dev), *l1, store.l1.home, l2, dim, width, store.l2_written, *init)
    for writes_back in (True, False):  # every writeback before the first fill
        args = (*fills, writes_back, *rest)
        run_kernel("insert.cu", fn, dev, (n + rows - 1) // rows, args, per_warp=True)


def gather(store, batch, cols: int | None = None) -> torch.Tensor:
    """Rows ``(U, cols)`` of a batch from where they live: L1 slots, else L2 addresses."""
    cols = store.layout.width if cols is None else cols
    batch = batch.trimmed()
    l2 = kernel_l2(store)
    if l2 is None:
        return cpu.gather(store, batch, cols)
    dev = store.device
    n = batch.ids.numel()
    out = torch.empty((n, cols), device=dev)
    args = (batch.slots, int64_on(batch.addresses, dev), n, *kernel_l1(store), l2, store.layout.dim,
            store.layout.width, cols, out)  # fmt: skip
    run_kernel("rows.cu", "gather_rows", dev, n, args, per_warp=True)
    return out


def scatter(store, batch, rows: torch.Tensor) -> None:
    """Stores updated rows where they live; cached ones become dirty."""
    batch = batch.trimmed()
    l2 = kernel_l2(store)
    if l2 is None:
        return cpu.scatter(store, batch, rows)
    dev = store.device
    n = batch.ids.numel()
    rows = rows.to(dev, torch.float32).contiguous()
    args = (batch.slots, int64_on(batch.addresses, dev), n, *kernel_l1(store), l2, store.l1.way_state,
            store.layout.dim, store.layout.width, rows)  # fmt: skip
    run_kernel("rows.cu", "scatter_rows", dev, n, args, per_warp=True)
    mark_written(store, batch)
    refresh_conflicts(store, batch, l2)
    store.conflicts_updated(batch)
