"""Research: the floor under the uniform training step, what its rows and records cost at the
least on this card, beside the graphed step itself (issue 4's 1.5 ms target).

    python3 bench/exp/floor.py [--quick] [--json out.json]

The kernels (``row_traffic.cu``, beside this file) do nothing but a step's memory traffic: a
thread per 16 bytes of a row, the row's index read from a dense list. Not a benchmark of the
package: it explains why the step's figure stands where it does (bench/RESULTS.md, "Floor").
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common

import common  # noqa: E402
from common import B, D, L, N, Table, headline_table, t_ms, t_ms_queued, trace  # noqa: E402

import tierstore as ts  # noqa: E402


def bench_floor(quick: bool) -> Table:
    """What the uniform training step's rows cost at the least on this card, beside the step:
    the forward reads a row per index, the optimizer reads and writes each unique row once.
    ``row_traffic.cu``'s kernels do only that (a thread per 16 bytes, the row's index from
    a dense list); the step's own kernels add their lookups, gradient sums and order. Then the
    same traffic with each updated row's 32-byte way record read and written beside it (L1
    keeps RowWiseAdagrad's state and the dirty bit there, so its step must touch it), and at
    rows of 129 floats, only 4-byte aligned: RowWiseAdagrad's rows kept whole, as L2 keeps
    them (L1 keeps the weights apart from the state, for this cost), and at rows of 136 floats
    with the state in their 17th sector. Last, the probe's sectors alone: with the rows and
    records, the traffic that a step of docs/DESIGN.md's cache cannot avoid."""
    import cupy

    it = 10 if quick else 30
    out = Table(
        "row traffic floor of a step, uniform ids", f"{N:,} x {D} fp32 rows, int64 ids",
        f"{B} bags x {L} ids", "ms",
    )  # fmt: skip
    module = cupy.RawModule(code=(Path(__file__).parent / "row_traffic.cu").read_text())
    gather, update = module.get_function("gather_rows"), module.get_function("update_rows")
    dev = torch.device("cuda", torch.cuda.current_device())
    storage = torch.randn(N * (D + 8), device=dev)  # N rows of 128 floats, 129 or 136
    table = storage[: N * D].view(N, D)
    grad = torch.randn(1024, D, device=dev)
    sink = torch.zeros(1, device=dev)
    ids = trace("uniform", B * L)
    unique, counts = torch.unique(ids, return_counts=True)
    singles = unique[counts == 1]  # rows read by one index: update_singles' share
    unique = unique[torch.randperm(unique.numel(), device=dev)]  # the probe's order: random
    singles = singles[torch.randperm(singles.numel(), device=dev)]
    w4 = D // 4
    a = torch.randn(1 << 28, device=dev)
    b = torch.empty_like(a)
    t = t_ms(lambda: b.copy_(a), it)
    out.row("device-to-device copy, 1 GiB (read + write)", 2 * a.nbytes / t / 1e6, "GB/s")

    def launch(rows):
        return _per_piece(update, rows, D, (table, rows, rows.numel(), w4, grad))

    t_read = t_ms(_per_piece(gather, ids, D, (table, ids, ids.numel(), w4, w4, sink)), it)
    gb = ids.numel() * D * 4 / 1e9
    out.row(f"read {ids.numel():,} rows (the forward's)", t_read, "ms", f"{gb / t_read:.2f} TB/s")
    t_rmw = t_ms(launch(unique), it)
    gb = 2 * unique.numel() * D * 4 / 1e9
    out.row(
        f"read + write {unique.numel():,} unique rows (the optimizer's)",
        t_rmw,
        "ms",
        f"{gb / t_rmw:.2f} TB/s",
    )
    out.row("sum: the step's row traffic at the least", t_read + t_rmw, "ms", "", "step <= 1.5 ms")
    t = t_ms(launch(singles), it)
    out.row(f"read + write the {singles.numel():,} rows read once", t, "ms")
    t_rmw = _floor_with_records(out, module, table, grad, unique, singles, t_read, it)
    _floor_pitched(out, module, storage, ids, unique, singles, it)
    _floor_state_inside(out, module, storage, ids, unique, grad, it)
    t_probe = _floor_probe(out, module, unique, it)
    out.row(
        "sum with the records and the probe's sectors in set order",
        t_read + t_rmw + t_probe,
        "ms",
        "",
        "step <= 1.5 ms",
    )
    emb = headline_table(ts.RowWiseAdagrad(lr=0.01))
    g = torch.randn(B, D, device=dev)
    x = ids.view(B, L)
    emb(x).backward(g)  # rows in
    step = ts.GraphedStep(lambda x: emb(x).backward(g))
    t = t_ms_queued(lambda s=step: s(x), it)
    out.row("graphed RowWiseAdagrad step, same ids, back to back", t, "ms", "", "<= 1.5 ms")
    return out


def _per_piece(kernel, rows: torch.Tensor, floats: int, args):
    """A launch of a ``row_traffic.cu`` kernel over ``rows``: a thread per 4 of each row's
    ``floats`` (16 bytes)."""
    from tierstore import interop

    items = rows.numel() * ((floats + 3) // 4)
    return lambda: interop.launch(kernel, rows.device, items, args, per_warp=False)


def _floor_with_records(out, module, table, grad, unique, singles, t_read: float, it: int) -> float:
    """The optimizer's floor again with each row's 32-byte way record read and written beside
    the row: RowWiseAdagrad's state and the dirty bit (kernels/common.cuh WayState), one more
    random sector a row. The rows read once are what ``update_singles`` is judged against.
    Returns the unique rows' time with their records."""
    update = module.get_function("update_rows_with_record")
    records = torch.randn(table.shape[0], 8, device=table.device)
    w4 = table.shape[1] // 4

    def launch(rows):
        return _per_piece(
            update, rows, table.shape[1], (table, rows, rows.numel(), w4, grad, records)
        )

    t_rmw = t_ms(launch(unique), it)
    out.row(f"read + write {unique.numel():,} unique rows and their records", t_rmw, "ms")
    out.row("sum with the records: RowWiseAdagrad's row traffic at the least", t_read + t_rmw, "ms")
    t = t_ms(launch(singles), it)
    out.row(f"read + write the {singles.numel():,} rows read once, with records", t, "ms")
    return t_rmw


def _floor_pitched(out: Table, module, storage, ids, unique, singles, it: int) -> None:
    """The floor's traffic again at a pitch of D + 1 floats (RowWiseAdagrad's rows whole: the
    weights and the row's state), a thread per 4 floats with scalar loads: what that layout costs
    the same simple kernels against 128-float rows, the reason L1 keeps the state apart."""
    gather = module.get_function("gather_rows_pitched")
    update = module.get_function("update_rows_pitched")
    pitch = D + 1
    grad = torch.randn(1024, pitch, device=storage.device)
    sink = torch.zeros(1, device=storage.device)

    t_read = t_ms(_per_piece(gather, ids, D, (storage, ids, ids.numel(), D, pitch, sink)), it)
    out.row(f"read {ids.numel():,} rows' weights, {pitch}-float rows", t_read, "ms")
    args = (storage, unique, unique.numel(), pitch, grad)
    t_rmw = t_ms(_per_piece(update, unique, pitch, args), it)
    out.row(f"read + write {unique.numel():,} unique {pitch}-float rows", t_rmw, "ms")
    out.row(f"sum at {pitch}-float rows, same simple kernels", t_read + t_rmw, "ms")
    args = (storage, singles, singles.numel(), pitch, grad)
    t = t_ms(_per_piece(update, singles, pitch, args), it)
    out.row(f"read + write the {singles.numel():,} rows read once, {pitch} floats", t, "ms")


def _floor_state_inside(out: Table, module, storage, ids, unique, grad, it: int) -> None:
    """The floor with the record's sector moved into the row: rows of D + 8 floats (32-byte
    aligned), RowWiseAdagrad's state in the sector after the weights, float4 loads. Would a
    row's state beside it cost less than a record apart? The forward reads at that pitch too."""
    gather = module.get_function("gather_rows")
    update = module.get_function("update_rows_state_inside")
    w4, pitch4 = D // 4, (D + 8) // 4
    sink = torch.zeros(1, device=storage.device)
    args = (storage, ids, ids.numel(), w4, pitch4, sink)
    t_read = t_ms(_per_piece(gather, ids, D, args), it)
    out.row(f"read {ids.numel():,} rows' weights, {D + 8}-float rows", t_read, "ms")
    args = (storage, unique, unique.numel(), w4, pitch4, grad)
    t_rmw = t_ms(_per_piece(update, unique, D, args), it)
    out.row(f"read + write {unique.numel():,} unique rows, the state inside", t_rmw, "ms")
    out.row(f"sum at {D + 8}-float rows, the state inside", t_read + t_rmw, "ms")


def _floor_probe(out: Table, module, unique, it: int) -> float:
    """The probe's memory traffic alone (a unique id's set digests, then its way's record,
    which takes a stamp and a lock), the slots known: in the batch's order, where the sets come
    at random, and in set order, the best that any order of the unique step could give it. A
    random permutation of the slots stands in for the hash. Returns the set order's time."""
    from tierstore import interop

    probe = module.get_function("probe_sectors")
    ways, dev = 32, unique.device
    digests = torch.randint(-(2**31), 2**31 - 1, (N // ways, 8), dtype=torch.int32, device=dev)
    records = torch.randint(0, 2**40, (N, 4), device=dev)
    found = torch.empty(unique.numel(), dtype=torch.int64, device=dev)
    batch_order = torch.randperm(N, device=dev)[unique.sort().values]
    times = []
    for name, slots in (
        ("the batch's order", batch_order),
        ("set order", batch_order.sort().values),
    ):
        args = (slots, slots.numel(), ways, digests, records, found)
        t = t_ms(partial(interop.launch, probe, dev, slots.numel(), args, per_warp=False), it)
        out.row(f"the probe's sectors of {slots.numel():,} unique ids, {name}", t, "ms")
        times.append(t)
    return times[-1]


if __name__ == "__main__":
    common.main(__doc__, {"floor": bench_floor})
