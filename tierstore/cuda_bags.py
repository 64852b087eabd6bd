"""The CUDA bag kernels' launchers (kernels/forward.cu, kernels/backward.cu): the pooled forward
and the backward that reduces the gradient per unique row and applies the fused optimizer
where each row lives.

Shapes: ``n`` indices, ``B`` bags, ``U`` unique rows, ``D`` embedding dim, rows of ``width``
floats.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import cpu
from .cuda_launch import cuda_device, int64_on, run_kernel
from .cuda_rows import kernel_l1, kernel_l2, mark_written, refresh_conflicts
from .cuda_unique import radix_sort, scan_sorted
from .errors import FallbackWarning
from .optim import Optimizer

REGISTER_COLUMNS = (1, 2, 4, 8, 16)  # backward kernels hold G * K weights of a row per G lanes


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream of ``device``, for kernels that run beside the current stream's."""
    return torch.cuda.Stream(device)


def register_columns(dim: int) -> int | None:
    """Weights per lane of the backward kernels (a warp per row), None past 32 * 16 columns."""
    return next((k for k in REGISTER_COLUMNS if 32 * k >= dim), None)


def bag_tile(n: int, bags: int) -> int:
    """Bags a warp takes at once in the forward and the singles' update (kernels/forward.cu
    ``pool_short``), 0 for a warp per bag: a tile's indices (``tile * n / bags`` on average)
    should fit a warp's 32 lanes with room to spare, so tiles of 32, 16 or 8 bags where a bag
    holds at most a half, one or two indices on average (``n`` indices in ``B = bags``)."""
    for tile in (32, 16, 8):
        if tile * n <= 16 * bags:
            return tile
    return 0


def forward(
    store,
    batch,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Pooled bags ``(B, D)`` in one launch; ``offsets`` has ``B + 1`` entries, the last ``n``."""
    l2 = kernel_l2(store)
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
    args = (int64_on(offsets, dev), places, inverse, psw, batch.slots, int64_on(batch.addresses, dev),
            store.l1.weights, l2, width, dim, bags, mode == "mean")  # fmt: skip
    tile = bag_tile(_batch_length(batch), bags)
    if tile:  # short bags: a warp per tile of them (kernels/forward.cu pool_short)
        run_kernel("forward.cu", f"{fn}_short", dev, -(-bags // tile), (*args, tile, out), True)
    else:
        run_kernel("forward.cu", fn, dev, bags, (*args, out), True)
    return out


def _places(batch, dev: torch.device) -> torch.Tensor:
    """Each index's place (kernels/common.cuh ``ts_place``: its row's L1 slot, or the complement
    of its L2 address, and whether no other index reads the row), written from the batch's
    transpose once its rows are placed (kernels/unique.cu ``scatter_places``) and kept on it
    (``Transpose.places``) for the forward and the backward."""
    if batch.transpose.places is None:
        tr = batch.transpose
        n = tr.order.numel()
        tr.places = torch.empty(n, dtype=torch.int64, device=dev)
        suffix = "i32" if tr.order.dtype == torch.int32 else "i64"
        args = (tr.order, tr.rank, n, batch.slots, int64_on(batch.addresses, dev), tr.places)
        run_kernel("unique.cu", f"scatter_places_{suffix}", dev, n, args, per_warp=False)
    return batch.transpose.places


def _index_rows(batch, dev: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(places, inverse)``, one of them None, for the kernels that reach each index's row
    (kernels/common.cuh ``ts_index_weights``). A batch with a transpose will see a backward: its
    places, written once for the forward and the backward; another batch: its inverse."""
    if batch.transpose is not None:
        return _places(batch, dev), None
    return None, int64_on(batch.inverse, dev)


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
    k = register_columns(dim)
    group = 32  # lanes per chunk of sorted entries (kernels/backward.cu says why not 8)
    l2 = kernel_l2(store)
    # the update functor the optimizer declares (kernels/backward.cu), which picks the kernels
    functor = optimizer.cuda_functor if optimizer is not None else None
    if optimizer is not None and functor is None:
        warnings.warn(
            f"the optimizer {optimizer.name or type(optimizer).__name__!r} declares no "
            "cuda_functor: its updates run as torch ops (cpu.backward), which read the device",
            FallbackWarning,
            stacklevel=2,
        )
    if l2 is None or k is None or (optimizer is not None and functor is None):
        batch = batch.trimmed()
        return cpu.backward(
            store, batch, grad_out, offsets, per_sample_weights, mode, optimizer, want_weight_grad
        )
    dev = store.device
    n = _batch_length(batch)
    bags = offsets.numel() - 1
    width = store.layout.width
    offsets = int64_on(offsets, dev)
    addresses = int64_on(batch.addresses, dev)
    grad_out = grad_out.to(dev, torch.float32).contiguous()
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.to(dev, torch.float32).contiguous()
    mean = mode == "mean"
    weight_grad = None
    if want_weight_grad:
        weight_grad = torch.empty(n, device=dev)
        places, inverse = _index_rows(batch, dev)  # before a missing transpose is made below
        args = (offsets, places, inverse, grad_out, batch.slots, addresses, store.l1.weights,
                l2, width, dim, bags, mean, weight_grad)  # fmt: skip
        run_kernel("backward.cu", "weight_grad", dev, bags, args, per_warp=True)
    if optimizer is not None and n:
        # the sparse transpose: the unique step's sort (kernels/unique.cu), else a sort of the
        # inverse read by the same kernels
        tr = getattr(batch, "transpose", None)
        if tr is None:
            sorted_u, order = radix_sort(batch.inverse, max(n - 1, 1).bit_length())
            tr = scan_sorted(sorted_u, order, transpose=True)[-1]
            batch.transpose = tr  # a batch without one has no places yet: _places writes them
        bag = torch.empty(n, dtype=torch.int32, device=dev)  # the multi list's entries' bags
        args = (offsets, bags, bag)  # a warp per 32 bags
        run_kernel("backward.cu", "bag_of_index", dev, -(-bags // 32), args, per_warp=True)
        hyper = _hyper(store, optimizer, dev)  # (lr, eps) on the device: see load_hyper
        # each L1 row is marked dirty and, where the batch holds locks, unlocked by the kernel
        # that updates it, in its way record (kernels/backward.cu): the release leaves L1 alone
        # ... unless a later batch's lookup may be choosing victims on the prefetch stream beside
        # this update (pipeline.py): then the locks stay until it is done (the release below)
        unlock = batch.l1_locked and not store.side_pending
        rows = (batch.slots, addresses, *kernel_l1(store), l2, store.l1.way_state, unlock, width,
                dim)  # fmt: skip
        chunks = (n + group - 1) // group
        partial = torch.empty((chunks * 2, dim), device=dev)
        # The two kinds of rows are disjoint, so their kernels run at once: the multi list's
        # on a side stream (latency-bound: a few rows in flight per warp), beside the rows read
        # by one index, which keep HBM busy. A graph captures the fork and the join.
        main, side = torch.cuda.current_stream(dev), _side_stream(cuda_device(dev))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            # the multi list by chunks (its length on the device: at most n) ...
            length = tr.list_length
            args = (tr.multi_u, tr.multi_index, length, bag, offsets, psw, grad_out, n, mean,
                    *rows, hyper, partial)  # fmt: skip
            fn = f"reduce_chunks_{functor.suffix}_g{group}_k{k}"
            run_kernel("backward.cu", fn, dev, (chunks * group + 31) // 32, args, per_warp=True)
            # ... rows whose entries cross chunks: their partial sums, added in chunk order
            args = (tr.multi_u, tr.multi_first, tr.start, n, length, group, dim, partial)
            run_kernel("backward.cu", f"sum_groups_k{k}", dev, chunks, args, per_warp=True)
            args = (tr.multi_u, tr.multi_first, tr.start, n, length, group, *rows, hyper,
                    partial)  # fmt: skip
            fn = f"finish_crossing_{functor.suffix}_k{k}"
            run_kernel("backward.cu", fn, dev, chunks, args, per_warp=True)
        # rows read by one index, bag by bag (each bag's gradient read once)
        rest = (_places(batch, dev), psw, grad_out, mean, *rows, hyper)
        tile = bag_tile(n, bags)
        if tile:  # short bags: a warp per tile of them (update_singles_short)
            fn = f"update_singles_short_{functor.suffix}_k{k}"
            run_kernel("backward.cu", fn, dev, -(-bags // tile), (offsets, bags, tile, *rest), True)
        else:
            fn = f"update_singles_{functor.suffix}_k{k}"
            run_kernel("backward.cu", fn, dev, bags, (offsets, bags, *rest), per_warp=True)
        main.wait_stream(side)  # partial and the batch's buffers are freed on main: after this
        store.join_side()  # later lookups' fills are done before the refresh reads L1's tags
        if unlock:  # the kernels let the locks go: release leaves L1 alone
            batch.l1_locked = False
        mark_written(store, batch)
        if store.l1.step != batch.lookup_number:  # another batch's fills may hold stale copies
            refresh_conflicts(store, batch, l2)
        store.conflicts_updated(batch)
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
