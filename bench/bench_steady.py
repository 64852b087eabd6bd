"""Steady-state training with a partial L1: the prefetch pipeline against its PCIe floor.

A 20 M x 128 fp32 table, 65 536 bags x 32 ids, a fresh Zipf(1.05) batch each step drawn from one
fixed popularity order (a random permutation of the rows), at least 30 warm-up steps then timed
steps, host wall time per step (synchronised), medians. For each optimizer (RowWiseAdagrad,
SGD) and L1 size (100, 20, 5 % of the rows): the plain eager loop, the eager loop under
``ts.prefetching`` (the next batch's cache step on a side stream), and the plain loop captured
with ``GraphedStep``; torch ``nn.EmbeddingBag(sparse=True)`` whole in HBM in the same run.
Each row prints the rows moved each way per step and the PCIe rate they reached, and the floor:
the larger of the L1 = 100 % step and the time the step's moves need at the DMA rates measured
at the start of the run (host to device, device to host, both at once).

    python3 bench/bench_steady.py [--rows 20000000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import dma_rates, floor_ms

import tierstore as ts

B, L, D = 65_536, 32, 128


class ZipfBatches:
    """Fresh Zipf(1.05) batches of ``B x L`` ids over ``rows`` rows, one popularity order."""

    def __init__(self, rows: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = 1.0 / torch.arange(1, rows + 1, device="cuda", dtype=torch.float64) ** 1.05
        self.cdf = torch.cumsum(w / w.sum(), 0)
        self.order = torch.randperm(rows, device="cuda", generator=g)
        self.gen = g

    def __call__(self) -> torch.Tensor:
        u = torch.rand(B * L, device="cuda", dtype=torch.float64, generator=self.gen)
        rank = torch.searchsorted(self.cdf, u).clamp_(max=self.order.numel() - 1)
        return self.order[rank].view(B, L)


def pipelined_ms(emb, train, batches: list, warm: int, depth: int = 1) -> float:
    """Mean wall time per step of the loop under ``ts.prefetching``, steps back to back as a
    user runs them (one synchronise after the warm-up steps and one at the end)."""
    t = 0.0
    for k, x in enumerate(ts.prefetching(batches, emb, depth=depth)):
        if k == warm:
            torch.cuda.synchronize()
            t = time.perf_counter()
        train(x)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / max(1, len(batches) - warm)


def stream_ms(train, batches: list, warm: int) -> float:
    """Mean wall time per step of steps queued back to back (one synchronise at each end)."""
    for x in batches[:warm]:
        train(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches[warm:]:
        train(x)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / max(1, len(batches) - warm)


def moved(emb, before: ts.CacheStats, steps: int) -> tuple[float, float]:
    """Bytes per step filled into L1 and written back from it since ``before``."""
    now = emb.stats()
    fills = (now.bytes_l2_to_l1 - before.bytes_l2_to_l1) / steps
    wbs = (now.bytes_l1_to_l2 - before.bytes_l1_to_l2) / steps
    return fills, wbs


def peak_step_bytes(step, x) -> int:
    """Device memory a step allocates above what was allocated before it (its peak)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def prefetch_temporaries(emb, train, batches: list) -> int:
    """The device memory a prefetch adds to a step (issue 23, must-hold 5): the peak of a step
    that trains batch t while batch t+1 is prefetched, less the peak of the same step alone
    (medians of 5)."""
    alone, piped = [], []
    for k in range(5):
        x, nxt = batches[2 * k], batches[2 * k + 1]
        alone.append(peak_step_bytes(train, x))

        def piped_step(x, nxt=nxt):
            emb.prefetch(x)
            emb.prefetch(nxt)  # placed at the end of x's forward, beside its compute
            train(x)

        piped.append(peak_step_bytes(piped_step, x))
        emb.clear_prefetched()
    return int(statistics.median(piped) - statistics.median(alone))


def torch_baseline(rows: int, batches: list, warm: int, opt: str) -> float:
    emb = torch.nn.EmbeddingBag(rows, D, mode="sum", sparse=True, device="cuda")
    optim = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[opt](emb.parameters(), lr=0.01)
    g = torch.randn(B, D, device="cuda")

    def step(x):
        optim.zero_grad(set_to_none=True)
        emb(x).backward(g)
        optim.step()

    return stream_ms(step, batches, warm)


def uniform_rows(rows: int, warm: int, timed: int, rates: dict) -> list[dict]:
    """Uniform ids at L1 = 20 % (PCIe-bound): the fills and writebacks' row bytes per second,
    both directions together, plain and pipelined (issue 23's target: 65 GB/s or more)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, rows, (B, L), device="cuda", generator=gen)
               for _ in range(warm + timed)]  # fmt: skip
    g = torch.randn(B, D, device="cuda")
    out = []
    for opt_name, opt in (("rowwise", ts.RowWiseAdagrad(lr=0.01)), ("sgd", ts.SGD(lr=0.01))):
        emb = ts.TieredEmbeddingBag(
            rows, D, mode="sum", cache=ts.CacheConfig(rows=rows // 5), optimizer=opt,
            device="cuda",
        )  # fmt: skip

        def train(x, emb=emb):
            emb(x).backward(g)

        before = emb.stats()
        plain = stream_ms(train, batches, warm)
        fills, wbs = moved(emb, before, len(batches))
        pipe = pipelined_ms(emb, train, batches, warm)
        best = min(plain, pipe)
        both = (fills + wbs) / best / 1e6
        floor = max(fills / rates["h2d"], wbs / rates["d2h"], (fills + wbs) / rates["both"]) / 1e6
        print(
            f"uniform ids, L1 20 %, {opt_name}: plain {plain:.2f} ms, pipelined {pipe:.2f} ms; "
            f"fills {fills / 1e6:.1f} MB + writebacks {wbs / 1e6:.1f} MB a step: {both:.1f} GB/s "
            f"both ways together (DMA floor {floor:.2f} ms, target >= 65 GB/s)",
            flush=True,
        )
        out.append(dict(optimizer=opt_name, ids="uniform", l1=0.2, plain=plain, pipelined=pipe,
                        fill_bytes=fills, wb_bytes=wbs, gbps_both=both, floor=floor))  # fmt: skip
        del emb, train
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--quick", action="store_true", help="RowWiseAdagrad only, fewer steps")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    warm, timed = (30, 12) if args.quick else (40, 20)
    props = torch.cuda.get_device_properties(0)
    rates = dma_rates()
    print(
        f"# {props.name}; table {args.rows:,} x {D} fp32; batch {B:,} bags x {L} ids, "
        f"Zipf(1.05) fresh each step; {warm} warm-up + {timed} timed steps; ms per step\n"
        f"# pinned DMA GB/s: H2D {rates['h2d']:.1f}, D2H {rates['d2h']:.1f}, "
        f"both at once {rates['both']:.1f}"
    )
    zipf = ZipfBatches(args.rows)
    batches = [zipf() for _ in range(warm + timed)]
    results: list[dict] = []
    base = {o: torch_baseline(args.rows, batches, warm, o) for o in ("sgd", "adagrad")}
    torch.cuda.empty_cache()
    print(f"torch whole in HBM: SGD {base['sgd']:.2f} ms, Adagrad {base['adagrad']:.2f} ms")
    results.append({"what": "torch", **base})
    g = torch.randn(B, D, device="cuda")
    header = (
        f"{'optimizer':<10} {'L1':>5} {'plain':>7} {'pipelined':>9} "
        f"{'graphed':>8} {'floor':>7} {'hit':>6} {'fill MB':>8} {'wb MB':>7} "
        f"{'H2D GB/s':>8} {'D2H GB/s':>8} {'pf MB':>8} {'bound MB':>8}"
    )
    print(header)
    optimizers = {"rowwise": ts.RowWiseAdagrad(lr=0.01)}
    if not args.quick:
        optimizers["sgd"] = ts.SGD(lr=0.01)
    for opt_name, opt in optimizers.items():
        all_hits = None
        for share in (1.0, 0.2, 0.05):
            t0 = time.perf_counter()
            emb = ts.TieredEmbeddingBag(
                args.rows, D, mode="sum", cache=ts.CacheConfig(rows=int(share * args.rows)),
                optimizer=opt, device="cuda",
            )  # fmt: skip
            made_s = time.perf_counter() - t0

            def train(x, emb=emb):
                emb(x).backward(g)

            queued = stream_ms(train, batches, warm)
            before = emb.stats()
            pipe = pipelined_ms(emb, train, batches, warm)
            fills, wbs = moved(emb, before, len(batches))
            hit = emb.stats().unique_hit_ratio
            graphed = stream_ms(ts.GraphedStep(train), batches, warm)
            extra = prefetch_temporaries(emb, train, batches)
            bound = 2 * batches[0].numel() * 8 + fills + wbs  # 2x the index bytes + the moves
            best = min(queued, pipe, graphed)
            if share == 1.0:
                all_hits = best
            floor = floor_ms(all_hits, fills, wbs, rates)
            h2d, d2h = fills / best / 1e6, wbs / best / 1e6
            print(
                f"{opt_name:<10} {share:>5.0%} {queued:>7.2f} {pipe:>9.2f} {graphed:>8.2f} "
                f"{floor:>7.2f} {hit:>6.3f} {fills / 1e6:>8.1f} {wbs / 1e6:>7.1f} {h2d:>8.1f} "
                f"{d2h:>8.1f} {extra / 1e6:>8.1f} {bound / 1e6:>8.1f}"
                f"   (table made in {made_s:.1f} s)",
                flush=True,
            )
            results.append(dict(optimizer=opt_name, l1=share, plain=queued,
                                pipelined=pipe, graphed=graphed,
                                floor=floor, hit_rate=hit, fill_bytes=fills, wb_bytes=wbs,
                                create_s=made_s, prefetch_bytes=extra,
                                prefetch_bound=bound))  # fmt: skip
            del emb, train
            torch.cuda.empty_cache()
    print(
        "all mean ms per step, steps queued back to back: plain eager loop; pipelined: "
        "under prefetching(depth=1); graphed: GraphedStep (plain); floor: max(best all-in-L1 "
        "step, the step's fills and writebacks at the DMA rates); GB/s at the best time; pf MB: "
        "the device memory a prefetch of the next batch adds to a step's peak, against its bound "
        "(2x the batch's index bytes plus the rows it moves)"
    )
    results += uniform_rows(args.rows, warm, timed, rates)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": props.name, "dma": rates, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
