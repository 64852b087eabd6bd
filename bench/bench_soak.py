"""The inference soak (issue 23, "what must hold" 3): a long inference loop on a small table,
with and without prefetching, ends with no locked slot and no memory growth.

    python3 bench/bench_soak.py [--steps 1000000] [--device cpu|cuda] [--ssd] [--json PATH]

A 2 000 x 8 table trained by RowWiseAdagrad (so that a training batch would lock its rows),
L1 = 64 rows in sets of 4 (far fewer than a batch's rows with the look-ahead: conflict misses
every step), and 64 batches of 64 bags x 4 Zipf(1.05) ids made once and reused in turn. The
steps run in blocks of ``--block``, each block one of three inference loops in turn:

* ``no_grad``: ``emb(ids, offsets)`` under ``torch.no_grad()``;
* ``prefetch``: ``emb.prefetch(ids, offsets)`` then ``emb(ids, offsets)`` with grad enabled and
  its output dropped (no backward ever runs), and at the block's end one batch prefetched and
  never consumed, dropped by ``clear_prefetched()``;
* ``prefetching``: ``ts.prefetching(batches, emb, depth=2)`` under ``torch.no_grad()``.

After each block the locks are counted (L1's, and with ``--ssd`` L2's beyond its pins of L1's
rows); the process's resident memory (``/proc/self/statm``) and, on CUDA, the caching
allocator's allocated bytes are read after the first round of the three loops and at the end.
Printed: the most locks found after a block (target 0) and each memory's growth from the end
of the first round to the end (target: none beyond the allocators' noise, 4 MiB).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Table, note, run_sections

import tierstore as ts
from tierstore.progress import progress

ROWS, DIM, BAGS, PER_BAG, POOL = 2_000, 8, 64, 4, 64
LOOPS = ("no_grad", "prefetch", "prefetching")
GROWTH_LIMIT_MIB = 4.0


def batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``POOL`` fixed batches of ``BAGS`` bags of ``PER_BAG`` Zipf(1.05) ids."""
    gen = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, ROWS + 1, dtype=torch.float64) ** 1.05
    offsets = torch.arange(0, BAGS * PER_BAG, PER_BAG, device=device)
    return [
        (torch.multinomial(weights, BAGS * PER_BAG, True, generator=gen).to(device), offsets)
        for _ in range(POOL)
    ]


def memory_mib(device: torch.device) -> dict[str, float]:
    """The process's resident memory and, on CUDA, the caching allocator's allocated bytes."""
    with open("/proc/self/statm") as f:
        got = {"resident": int(f.read().split()[1]) * resource.getpagesize() / 2**20}
    if device.type == "cuda":
        torch.cuda.synchronize()
        got["CUDA allocated"] = torch.cuda.memory_allocated(device) / 2**20
    return got


def run_block(emb, loop: str, pool, start: int, steps: int) -> None:
    """``steps`` inference steps of one loop, over the pool's batches from ``start`` on."""
    chosen = [pool[(start + k) % POOL] for k in range(steps)]
    if loop == "no_grad":
        with torch.no_grad():
            for ids, offsets in chosen:
                emb(ids, offsets)
    elif loop == "prefetch":
        for ids, offsets in chosen:
            emb.prefetch(ids, offsets)
            emb(ids, offsets)  # grad enabled, no backward: released at the forward's end
        emb.prefetch(*pool[(start + steps) % POOL])
        emb.clear_prefetched()
    else:
        with torch.no_grad():
            for ids, offsets in ts.prefetching(chosen, emb, depth=2):
                emb(ids, offsets)


def soak(steps: int, block: int, device: torch.device, ssd_dir: str | None) -> Table:
    """The soak itself (see the module docstring); returns its table."""
    ssd = None if ssd_dir is None else ts.SSDConfig(Path(ssd_dir) / "soak", host_rows=1_024)
    emb = ts.TieredEmbeddingBag(
        ROWS, DIM, mode="sum", cache=ts.CacheConfig(rows=64, ways=4),
        optimizer=ts.RowWiseAdagrad(lr=0.05), device=device, ssd=ssd,
    )  # fmt: skip
    tier = "over an SSD tier" if ssd is not None else "all in L2"
    table = Table(
        f"inference soak, {steps:,} steps, {tier}",
        f"{ROWS:,} x {DIM} fp32 rows, RowWiseAdagrad, L1 = 64 rows", f"{BAGS} bags x {PER_BAG}",
        "",
    )  # fmt: skip
    pool = batches(device)
    blocks = -(-steps // block)
    baseline, worst_locks, done, t0 = None, 0, 0, time.perf_counter()
    timeline: list[str] = []  # the resident memory's growth at each tenth of the run
    for b in progress(range(blocks), "soak", total=blocks):
        n = min(block, steps - done)
        run_block(emb, LOOPS[b % len(LOOPS)], pool, done, n)
        done += n
        worst_locks = max(worst_locks, emb.store.held_locks())
        if b == len(LOOPS) - 1 or (baseline is None and b == blocks - 1):
            baseline = memory_mib(device)  # every loop has run once: pools are sized
        elif baseline is not None and (10 * (b + 1)) // blocks > (10 * b) // blocks:
            grown = memory_mib(device)["resident"] - baseline["resident"]
            timeline.append(f"{done:,}: {grown:+.2f}")
    seconds = time.perf_counter() - t0
    table.row("locks held after a block, most", worst_locks, "locks", target="0")
    for what, mib in memory_mib(device).items():
        table.row(f"{what} memory growth after the first round", mib - baseline[what], "MiB",
                  target=f"<= {GROWTH_LIMIT_MIB}")  # fmt: skip
    note(
        f"{done:,} steps in {seconds:.1f} s ({1e6 * seconds / done:.0f} us a step); after the "
        "first round: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in baseline.items())
    )
    if timeline:
        note("resident growth (MiB) after steps " + "; ".join(timeline))
    emb.close(flush=False)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=1_000, help="steps of one loop in a row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ssd", action="store_true", help="the table over an SSD tier")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    if args.steps < 1 or args.block < 1:
        parser.error("--steps and --block must be positive")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        passed = run_sections(
            lambda _: soak(args.steps, args.block, device, tmp if args.ssd else None),
            ["soak"],
            args.json,
            lambda: {"device": str(device)},
        )
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
