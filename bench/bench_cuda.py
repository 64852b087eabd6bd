"""Benchmarks of the CUDA backend on one GPU, each beside its baseline in the same run.

Table: N rows x D fp32, B bags of L ids, ids uniform or Zipf(1.05) (numpy's, ids >= N dropped,
hot ranks scattered by a random permutation: ``shared/baseline/torch_step.py``'s trace).
Times are CUDA-event medians after warm-up. Prints one table per section and writes JSON.

    python bench/bench_cuda.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tierstore as ts
from tierstore import cuda
from tierstore.stats import HITS, UNIQUE

N, D, B, L = 10_000_000, 128, 65536, 32


def t_ms_queued(fn, it: int = 20, reps: int = 5, warm: int = 3) -> float:
    """Milliseconds per call of ``fn`` called ``it`` times back to back (the host queues the next
    call's kernels while the device runs the last: launch latency is hidden where the device is
    the bottleneck), CUDA events around the ``it`` calls; the median of ``reps`` such runs."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(it):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / it)
    return float(np.median(times))


def t_ms(fn, it: int = 20, warm: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``it`` runs (CUDA events), after ``warm`` runs."""
    return t_ms_queued(fn, 1, reps=it, warm=warm)


def trace(dist: str, n: int, rows: int = N, seed: int = 0) -> torch.Tensor:
    """``n`` ids on the GPU, uniform or Zipf(1.05) as the baseline scripts draw them."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return torch.from_numpy(rng.integers(0, rows, n)).cuda()
    z = rng.zipf(1.05, 3 * n) - 1
    z = z[z < rows][:n]
    # one fixed popularity order for every batch (the hot rows stay hot from batch to batch)
    perm = torch.randperm(rows, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    return perm[torch.from_numpy(z).cuda()]


def free(*objs) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def row(name: str, value: float, unit: str, baseline: str = "", target: str = "") -> dict:
    print(f"| {name:<58} | {value:>10.3f} {unit:<7} | {baseline:<28} | {target:<18} |", flush=True)
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "target": target}


def header(title: str) -> None:
    print(f"\n### {title}\n", flush=True)
    print(f"| {'what':<58} | {'figure':>18} | {'baseline (same run)':<28} | {'target':<18} |")
    print(f"|{'-' * 60}|{'-' * 20}|{'-' * 30}|{'-' * 20}|", flush=True)


def bench_forward_and_step(out: list, quick: bool) -> None:
    offsets = torch.arange(0, B * L + 1, L, device="cuda")
    it = 10 if quick else 30
    header(f"forward and training step, every row in L1: {N:,} x {D} fp32, {B} bags x {L}")
    weight = torch.randn(N, D, device="cuda")
    sgd = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache_rows=N, optimizer=ts.SGD(lr=0.01), device="cuda"
    )
    rw = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache_rows=N, optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda"
    )
    g = torch.randn(B, D, device="cuda")
    for dist in ("uniform", "zipf"):
        ids = trace(dist, B * L)
        ref = t_ms(lambda ids=ids: F.embedding_bag(ids, weight, offsets[:-1]), it)
        out.append(row(f"torch F.embedding_bag fwd, table in HBM, {dist}", ref, "ms"))
        store = sgd.store
        store.release(store.lookup(ids))  # brings the rows in
        batch = store.lookup(ids)
        c = store.l1.counters.tolist()
        y = cuda.forward(store, batch, offsets, None, "sum")
        unique_ids = batch.trimmed().ids
        rows = store.read_rows(unique_ids)[:, :D]
        want = F.embedding_bag(batch.inverse, rows, offsets, mode="sum", include_last_offset=True)
        err = ((y - want).norm() / want.norm()).item()
        print(f"  ({dist}: unique {unique_ids.numel():,}, rel err vs embedding_bag {err:.1e})")

        def forward(b=batch, s=store):
            b.places = None  # each call resolves the batch's places anew: part of its forward
            cuda.forward(s, b, offsets, None, "sum")

        t = t_ms(forward, it)
        out.append(
            row(f"tierstore forward, slots known, {dist}", t, "ms", f"{ref:.3f} ms", "<= baseline")
        )
        store.release(batch)

        def look_fwd(ids=ids, store=store):
            b = store.lookup(ids, backward=False, hold=False)  # inference
            cuda.forward(store, b, offsets, None, "sum")
            store.release(b)

        t = t_ms(look_fwd, it)
        out.append(
            row(
                f"tierstore lookup + forward, {dist}",
                t,
                "ms",
                f"{ref:.3f} ms",
                f"<= {1.5 * ref:.3f} ms",
            )
        )
        ref_q = t_ms_queued(lambda ids=ids: F.embedding_bag(ids, weight, offsets[:-1]), it)
        t = t_ms_queued(look_fwd, it)
        out.append(
            row(
                f"tierstore lookup + forward, back to back, {dist}",
                t,
                "ms",
                f"{ref_q:.3f} ms back to back",
                f"<= {1.5 * ref_q:.3f} ms",
            )
        )
        before = store.l1.counters.tolist()
        look_fwd()
        after = store.l1.counters.tolist()
        print(
            f"  (hits in that step: {after[HITS] - before[HITS]:,} of {after[UNIQUE] - before[UNIQUE]:,} unique; earlier counters {c[HITS]:,})"
        )

        x = ids.view(B, L)

        def train(emb, x=x):
            def step():
                emb(x).backward(g)

            return step

        for name, emb in (("SGD", sgd), ("RowWiseAdagrad", rw)):
            train(emb)()  # rows in
            t = t_ms(train(emb), it)
            out.append(
                row(
                    f"tierstore train step (lookup, fwd, bwd, fused {name}), {dist}",
                    t,
                    "ms",
                    "",
                    "<= 1.5 ms" if name == "RowWiseAdagrad" else "",
                )
            )
        psw = torch.rand(B * L, device="cuda")

        def psw_step(ids=ids, psw=psw):  # weighted features: the weights' gradient too
            w = psw.detach().requires_grad_()
            torch.autograd.grad(rw(ids, offsets[:-1], per_sample_weights=w), w, g)

        psw_step()
        t = t_ms(psw_step, it)
        out.append(
            row(f"tierstore train step, RowWiseAdagrad, per-sample weights, {dist}", t, "ms")
        )
        for opt_name in ("sgd", "adagrad"):
            if quick and opt_name == "adagrad" and dist == "zipf":
                continue
            emb = torch.nn.EmbeddingBag(N, D, mode="sum", sparse=True).cuda()
            opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adagrad)(
                emb.parameters(), lr=0.01
            )

            def tstep(emb=emb, opt=opt, ids=ids):
                opt.zero_grad(set_to_none=True)
                emb(ids, offsets[:-1]).backward(g)
                opt.step()

            t = t_ms(tstep, 5 if opt_name == "adagrad" else it, warm=2)
            out.append(row(f"torch EmbeddingBag(sparse)+optim.{opt_name} step, {dist}", t, "ms"))
            free(emb, opt)
    free(sgd, rw, weight)


def _ab_rows(out: list, name: str, dist: str, step, look_fwd, ref: float, it: int) -> None:
    """Rows of one configuration: the train step (events, then wall time back to back) and
    lookup + forward against ``F.embedding_bag``'s ``ref`` ms."""
    step()
    t = t_ms(step, it)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(it):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / it * 1e3
    tl = t_ms(look_fwd, it)
    out.append(row(f"{name}: train step, {dist}", t, "ms", f"wall {wall:.3f} ms"))
    out.append(
        row(
            f"{name}: lookup + forward, {dist}", tl, "ms", f"{ref:.3f} ms", f"<= {1.5 * ref:.3f} ms"
        )
    )


def bench_ab(out: list, quick: bool) -> None:
    """The step with and without its fast paths, same table, same ids, same process: the
    'before' row is torch.unique (the host reads the unique count: a second sync in the step)
    and a second sort in backward; 'sync-free' is the unique step of kernels/unique.cu with the
    count left on the device and its sort reused as the backward's transpose."""
    it = 10 if quick else 30
    offsets = torch.arange(0, B * L + 1, L, device="cuda")
    header("same-run comparison of the fast paths (RowWiseAdagrad, every row in L1)")
    emb = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache_rows=N, optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda"
    )
    store = emb.store
    g = torch.randn(B, D, device="cuda")
    weight = torch.randn(N, D, device="cuda")
    configs = (("before", False), ("sync-free", True))
    try:
        for dist in ("uniform", "zipf"):
            x = trace(dist, B * L).view(B, L)
            flat = x.reshape(-1)
            emb(x).backward(g)  # rows in
            ref = t_ms(lambda f=flat: F.embedding_bag(f, weight, offsets[:-1]), it)
            out.append(row(f"torch F.embedding_bag fwd, table in HBM, {dist}", ref, "ms"))
            for rep in range(2):
                for name, fast in configs:
                    cuda.FAST_UNIQUE = fast

                    def step(x=x):
                        emb(x).backward(g)

                    def look_fwd(f=flat):
                        b = store.lookup(f, backward=False, hold=False)  # inference
                        cuda.forward(store, b, offsets, None, "sum")
                        store.release(b)

                    _ab_rows(out, f"[{rep}] {name}", dist, step, look_fwd, ref, it)
                # the same step and an inference forward captured as CUDA graphs (GraphedStep:
                # each call copies the batch in, checks it, and replays)
                train_g = ts.GraphedStep(lambda x: emb(x).backward(g))
                infer_g = ts.GraphedStep(torch.no_grad()(emb.forward))  # inference
                _ab_rows(
                    out, f"[{rep}] graphed", dist, lambda x=x, s=train_g: s(x),
                    lambda x=x, s=infer_g: s(x), ref, it,
                )  # fmt: skip
                del train_g, infer_g  # their graphs' memory
    finally:
        cuda.FAST_UNIQUE = True
    free(emb, store, weight)


def bench_profile(out: list, quick: bool) -> None:
    """Where a training step's device time goes (torch.profiler, kernels by total time)."""
    from torch.profiler import ProfilerActivity, profile

    emb = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache_rows=N, optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda"
    )
    g = torch.randn(B, D, device="cuda")
    for dist in ("uniform", "zipf"):
        x = trace(dist, B * L).view(B, L)
        for _ in range(3):
            emb(x).backward(g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            emb(x).backward(g)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5 * 1e3
        flat = x.reshape(-1)
        t_prep = t_ms(lambda x=x: emb._prepare(x, None, None)[3].wait(), 10)
        t_uniq = t_ms(lambda f=flat: torch.unique(f, return_inverse=True, return_counts=True), 10)
        t_look = t_ms(lambda f=flat: emb.store.release(emb.store.lookup(f)), 10)
        print(
            f"\n  {dist}: validation (normalize_batch + check_ids) {t_prep:.3f} ms, "
            f"torch.unique {t_uniq:.3f} ms, store.lookup + release (unique included) "
            f"{t_look:.3f} ms (CUDA events)"
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                emb(x).backward(g)
            torch.cuda.synchronize()
        print(
            f"\n#### RowWiseAdagrad step, {dist}: host wall {wall:.3f} ms per step; kernels (3 steps)"
        )
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=22, max_name_column_width=48
            )
        )
    free(emb)


def bench_lookup(out: list, quick: bool) -> None:
    header("lookup: unique ids resolved to slots, 32-way cache of 4 M rows (all hits)")
    cache = cuda.new_cache(1 << 22, 32, "lru", torch.device("cuda"))
    ids = torch.unique(torch.randint(0, 1 << 40, (3 << 20,), device="cuda"))
    for lo in range(0, ids.numel(), 1 << 20):
        part = ids[lo : lo + (1 << 20)]
        found = cache.lookup(part, torch.ones_like(part))
        cache.release(found.slots)
    slots = cache.find(ids)
    cached = ids[slots >= 0]
    print(f"  ({cached.numel():,} of {ids.numel():,} ids cached)")
    for n in (1 << 20, cached.numel()):
        q = cached[torch.randperm(cached.numel(), device="cuda")[:n]].sort().values
        ones = torch.ones_like(q)
        t = t_ms(lambda q=q: cache.find(q), 20 if quick else 50)
        out.append(
            row(
                f"find_slots kernel, {n:,} unique ids",
                n / t / 1e6,
                "G ids/s",
                "HKV find 3.3-3.7 G/s",
                ">= 4 G ids/s",
            )
        )

        def step(q=q, ones=ones):
            f = cache.lookup(q, ones)
            cache.release(f.slots)

        t = t_ms(step, 20 if quick else 50)
        out.append(
            row(f"whole lookup step + release, {n:,} unique ids (all hits)", n / t / 1e6, "G ids/s")
        )
    free(cache)


def bench_moves(out: list, quick: bool) -> None:
    for width_name, opt in (
        ("128 floats (SGD)", ts.SGD(lr=0.01)),
        ("129 floats (RowWiseAdagrad)", ts.RowWiseAdagrad(lr=0.01)),
    ):
        header(
            f"rows moved L2 (pinned host) <-> L1, rows of {width_name}, 1 M unique misses per step"
        )
        emb = ts.TieredEmbeddingBag(
            N, D, mode="sum", cache_rows=1 << 20, optimizer=opt, device="cuda"
        )
        store = emb.store
        rb = store.layout.row_bytes
        for dirty in (False, True):
            fills, times = [], []
            for k in range(6 if quick else 12):
                ids = torch.unique(torch.randint(0, N, (1_100_000,), device="cuda"))[: 1 << 20]
                batch_ids, inverse, counts = torch.unique(
                    ids, return_inverse=True, return_counts=True
                )
                found = cuda.lookup(store.l1, batch_ids, counts)
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                cuda.move_rows(store, found, batch_ids)
                e.record()
                torch.cuda.synchronize()
                f = found.trimmed()
                wb = int(f.victim_dirty.sum())
                if k >= 2:
                    fills.append((f.fill_index.numel(), wb))
                    times.append(s.elapsed_time(e))
                store.l1.release(found.slots)
                if dirty:
                    store.l1.mark_dirty(found.slots)
            t = float(np.median(times))
            nf, nwb = np.median([f for f, _ in fills]), np.median([w for _, w in fills])
            gbs = (nf + nwb) * rb / (t / 1e3) / 1e9
            what = "fill + dirty writeback" if dirty else "fill (clean victims)"
            out.append(
                row(
                    f"{what}: {int(nf):,} fills, {int(nwb):,} writebacks",
                    gbs,
                    "GB/s",
                    "zero-copy 16.6, CPU+DMA 22.7",
                    ">= 30 GB/s",
                )
            )
            print(f"  ({t:.3f} ms per step)")
        free(emb, store)


def bench_sweep(out: list, quick: bool) -> None:
    header(
        f"cache size sweep: Zipf(1.05), RowWiseAdagrad train step, {B} x {L} ids, fresh batch each step"
    )
    x_all = [trace("zipf", B * L, seed=100 + k).view(B, L) for k in range(8 if quick else 16)]
    g = torch.randn(B, D, device="cuda")
    for pct in (1, 5, 20, 100):
        emb = ts.TieredEmbeddingBag(
            N,
            D,
            mode="sum",
            cache_rows=N * pct // 100,
            optimizer=ts.RowWiseAdagrad(lr=0.01),
            device="cuda",
        )
        for x in x_all[: len(x_all) // 2]:  # warm the cache
            emb(x).backward(g)
        emb.reset_stats()
        times = []
        for x in x_all[len(x_all) // 2 :]:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            emb(x).backward(g)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        st = emb.stats()
        t = float(np.median(times))
        out.append(row(f"cache {pct:>3} % of the table: step time", t, "ms"))
        out.append(row(f"cache {pct:>3} % of the table: hit rate (unique rows)", st.hit_rate, ""))
        print(
            f"  (conflict misses {st.conflict_misses:,}, writebacks {st.writebacks:,}, request hit rate {st.request_hit_rate:.3f})"
        )
        free(emb)


def bench_floor(out: list, quick: bool) -> None:
    """What the uniform training step's rows cost at the least on this card, beside the step:
    the forward reads a row per index, the optimizer reads and writes each unique row once.
    ``bench/row_traffic.cu``'s kernels do only that (a thread per 16 bytes, the row's index from
    a dense list); the step's own kernels add their lookups, gradient sums and order. Then the
    same traffic with each updated row's 32-byte way record read and written beside it (L1
    keeps RowWiseAdagrad's state and the dirty bit there, so its step must touch it), and at
    rows of 129 floats, only 4-byte aligned: RowWiseAdagrad's rows kept whole, as L2 keeps
    them (L1 keeps the weights apart from the state, for this cost), and at rows of 136 floats
    with the state in their 17th sector. Last, the probe's sectors alone: with the rows and
    records, the traffic that a step of DESIGN.md's cache cannot avoid."""
    import cupy

    it = 10 if quick else 30
    header(f"row traffic floor of a step, uniform ids: {N:,} x {D} fp32, {B} x {L} ids")
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
    out.append(row("device-to-device copy, 1 GiB (read + write)", 2 * a.nbytes / t / 1e6, "GB/s"))

    def launch(rows):
        return _per_piece(update, rows, D, (table, rows, rows.numel(), w4, grad))

    t_read = t_ms(_per_piece(gather, ids, D, (table, ids, ids.numel(), w4, w4, sink)), it)
    gb = ids.numel() * D * 4 / 1e9
    out.append(
        row(f"read {ids.numel():,} rows (the forward's)", t_read, "ms", f"{gb / t_read:.2f} TB/s")
    )
    t_rmw = t_ms(launch(unique), it)
    gb = 2 * unique.numel() * D * 4 / 1e9
    out.append(
        row(
            f"read + write {unique.numel():,} unique rows (the optimizer's)",
            t_rmw,
            "ms",
            f"{gb / t_rmw:.2f} TB/s",
        )
    )
    out.append(
        row("sum: the step's row traffic at the least", t_read + t_rmw, "ms", "", "step <= 1.5 ms")
    )
    t = t_ms(launch(singles), it)
    out.append(row(f"read + write the {singles.numel():,} rows read once", t, "ms"))
    t_rmw = _floor_with_records(out, module, table, grad, unique, singles, t_read, it)
    _floor_pitched(out, module, storage, ids, unique, singles, it)
    _floor_state_inside(out, module, storage, ids, unique, grad, it)
    t_probe = _floor_probe(out, module, unique, it)
    out.append(
        row(
            "sum with the records and the probe's sectors in set order",
            t_read + t_rmw + t_probe,
            "ms",
            "",
            "step <= 1.5 ms",
        )
    )
    emb = ts.TieredEmbeddingBag(
        N, D, mode="sum", cache_rows=N, optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda"
    )
    g = torch.randn(B, D, device=dev)
    x = ids.view(B, L)
    emb(x).backward(g)  # rows in
    step = ts.GraphedStep(lambda x: emb(x).backward(g))
    t = t_ms_queued(lambda s=step: s(x), it)
    out.append(row("graphed RowWiseAdagrad step, same ids, back to back", t, "ms", "", "<= 1.5 ms"))
    free(step, emb, table, storage, a, b)


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
    out.append(row(f"read + write {unique.numel():,} unique rows and their records", t_rmw, "ms"))
    out.append(
        row("sum with the records: RowWiseAdagrad's row traffic at the least", t_read + t_rmw, "ms")
    )
    t = t_ms(launch(singles), it)
    out.append(row(f"read + write the {singles.numel():,} rows read once, with records", t, "ms"))
    return t_rmw


def _floor_pitched(out, module, storage, ids, unique, singles, it: int) -> None:
    """The floor's traffic again at a pitch of D + 1 floats (RowWiseAdagrad's rows whole: the
    weights and the row's state), a thread per 4 floats with scalar loads: what that layout costs
    the same simple kernels against 128-float rows, the reason L1 keeps the state apart."""
    gather = module.get_function("gather_rows_pitched")
    update = module.get_function("update_rows_pitched")
    pitch = D + 1
    grad = torch.randn(1024, pitch, device=storage.device)
    sink = torch.zeros(1, device=storage.device)

    t_read = t_ms(_per_piece(gather, ids, D, (storage, ids, ids.numel(), D, pitch, sink)), it)
    out.append(row(f"read {ids.numel():,} rows' weights, {pitch}-float rows", t_read, "ms"))
    args = (storage, unique, unique.numel(), pitch, grad)
    t_rmw = t_ms(_per_piece(update, unique, pitch, args), it)
    out.append(row(f"read + write {unique.numel():,} unique {pitch}-float rows", t_rmw, "ms"))
    out.append(row(f"sum at {pitch}-float rows, same simple kernels", t_read + t_rmw, "ms"))
    args = (storage, singles, singles.numel(), pitch, grad)
    t = t_ms(_per_piece(update, singles, pitch, args), it)
    out.append(row(f"read + write the {singles.numel():,} rows read once, {pitch} floats", t, "ms"))


def _floor_state_inside(out, module, storage, ids, unique, grad, it: int) -> None:
    """The floor with the record's sector moved into the row: rows of D + 8 floats (32-byte
    aligned), RowWiseAdagrad's state in the sector after the weights, float4 loads. Would a
    row's state beside it cost less than a record apart? The forward reads at that pitch too."""
    gather = module.get_function("gather_rows")
    update = module.get_function("update_rows_state_inside")
    w4, pitch4 = D // 4, (D + 8) // 4
    sink = torch.zeros(1, device=storage.device)
    args = (storage, ids, ids.numel(), w4, pitch4, sink)
    t_read = t_ms(_per_piece(gather, ids, D, args), it)
    out.append(row(f"read {ids.numel():,} rows' weights, {D + 8}-float rows", t_read, "ms"))
    args = (storage, unique, unique.numel(), w4, pitch4, grad)
    t_rmw = t_ms(_per_piece(update, unique, D, args), it)
    out.append(row(f"read + write {unique.numel():,} unique rows, the state inside", t_rmw, "ms"))
    out.append(row(f"sum at {D + 8}-float rows, the state inside", t_read + t_rmw, "ms"))


def _floor_probe(out, module, unique, it: int) -> float:
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
        out.append(row(f"the probe's sectors of {slots.numel():,} unique ids, {name}", t, "ms"))
        times.append(t)
    return times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--only", default="ab,forward,profile,lookup,moves,sweep,floor")
    args = parser.parse_args()
    import cupy

    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, cupy {cupy.__version__}"
    )
    out: list = []
    t0 = time.time()
    sections = {
        "ab": bench_ab,
        "forward": bench_forward_and_step,
        "profile": bench_profile,
        "lookup": bench_lookup,
        "moves": bench_moves,
        "sweep": bench_sweep,
        "floor": bench_floor,
    }
    for name in args.only.split(","):
        try:
            sections[name](out, args.quick)
        except Exception as e:  # keep the other sections' figures
            import traceback

            traceback.print_exc()
            print(f"section {name} failed: {e!r}", flush=True)
    print(f"\nbenchmarks took {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": props.name, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
