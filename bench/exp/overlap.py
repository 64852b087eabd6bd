"""Research: why the prefetch pipeline overlaps nothing (issue 23). Every kernel is launched
with a grid of up to 8 resident blocks of 8 warps per multiprocessor (``interop.launch``'s
``max_waves``), which loop grid-stride over their work: 64 warps per SM, the whole card, for
the kernel's whole run. So a kernel of the prefetch stream (the row moves) and one of the
compute stream (forward, backward) cannot share the card: whichever starts first holds every SM
until it ends. The moves need few warps (PCIe latency, not warps, limits them), so they could
leave most of the card to the compute stream.

On ``bench_steady.py``'s table (20 M x 128, Zipf(1.05) batches of 65 536 x 32 ids,
RowWiseAdagrad) with L1 at ``--l1`` of the rows, each configuration times the plain loop and
the loop under ``ts.prefetching`` (depth 1 and 2), mean wall time a step over back-to-back
steps: the kernels' grid caps (blocks per SM: for the move kernels, and for every other
kernel), and the prefetch stream's priority.

    python3 bench/exp/overlap.py [--l1 0.2] [--rows 20000000] [--steps 10,20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_steady as bs  # noqa: E402

import tierstore as ts  # noqa: E402
from tierstore import interop  # noqa: E402

MOVES = ("move_rows_vec4", "move_rows_scalar")
# (name, blocks per SM of the move kernels, of every other kernel, prefetch stream priority)
CONFIGS = [
    ("as shipped", 8, 8, 0),
    ("moves 2 / SM", 2, 8, 0),
    ("moves 1 / SM", 1, 8, 0),
    ("moves 2, others 6 / SM", 2, 6, 0),
    ("moves 2 / SM, prefetch high priority", 2, 8, -1),
    ("no grid cap (a block per 256 items), prefetch high priority", 1 << 20, 1 << 20, -1),
]


def capped(launch, moves: int, others: int):
    """``interop.launch`` with each kernel's grid capped at ``moves`` or ``others`` waves."""

    def run(kernel, device, items, args, per_warp, max_waves=8):
        name = getattr(kernel, "name", "")
        return launch(kernel, device, items, args, per_warp, moves if name in MOVES else others)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--steps", default="10,20", help="warm-up,timed steps per loop")
    args = parser.parse_args()
    warm, timed = (int(x) for x in args.steps.split(","))
    emb = ts.TieredEmbeddingBag(
        args.rows, bs.D, mode="sum", cache=ts.CacheConfig(rows=int(args.l1 * args.rows)),
        optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda",
    )  # fmt: skip
    zipf = bs.ZipfBatches(args.rows)
    batches = [zipf() for _ in range(warm + timed)]
    g = torch.randn(bs.B, bs.D, device="cuda")

    def train(x):
        emb(x).backward(g)

    bs.stream_ms(train, batches, warm)  # fills L1 first: the first configuration's rows
    shipped = interop.launch  # would otherwise time a cold cache (measured: 4.72 ms plain)
    print(f"{torch.cuda.get_device_name()}; L1 {args.l1:.0%} of {args.rows:,} rows; "
          f"{warm} + {timed} steps a loop; ms a step")  # fmt: skip
    print(f"{'configuration':62s} {'plain':>7s} {'depth 1':>8s} {'depth 2':>8s}")
    for name, moves, others, priority in CONFIGS:
        interop.launch = capped(shipped, moves, others)
        emb.store._side = torch.cuda.Stream(emb.device, priority=priority)
        try:
            plain = bs.stream_ms(train, batches, warm)
            one = bs.pipelined_ms(emb, train, batches, warm, 1)
            two = bs.pipelined_ms(emb, train, batches, warm, 2)
        finally:
            interop.launch = shipped
        print(f"{name:62s} {plain:7.2f} {one:8.2f} {two:8.2f}", flush=True)


if __name__ == "__main__":
    main()
