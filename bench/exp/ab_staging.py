"""Research: the steady-state step with the dirty victims staged in HBM (writebacks beside the
fills, both directions of PCIe at once) against no staging (every writeback, then every fill),
same table, same batches, same process, the two interleaved round after round.

``cuda_rows.STAGE_BYTES = 0`` is the unstaged order (kernels/insert.cu MOVE_DIRECT for every
victim, then the fills). The table and batches are ``bench_steady.py``'s (20 M x 128,
Zipf(1.05) 65 536 x 32 ids, RowWiseAdagrad); the plain loop and ``prefetching(depth=1)``.

    python3 bench/exp/ab_staging.py [--l1 0.2] [--rounds 3] [--uniform]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_steady as bs  # noqa: E402

import tierstore as ts  # noqa: E402
from tierstore import cuda_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps a measurement")
    parser.add_argument("--uniform", action="store_true", help="uniform ids, not Zipf")
    args = parser.parse_args()
    emb = ts.TieredEmbeddingBag(
        args.rows, bs.D, mode="sum", cache=ts.CacheConfig(rows=int(args.l1 * args.rows)),
        optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda",
    )  # fmt: skip
    zipf = None if args.uniform else bs.ZipfBatches(args.rows)

    def batch() -> torch.Tensor:
        if zipf is None:
            return torch.randint(0, args.rows, (bs.B, bs.L), device="cuda")
        return zipf()

    g = torch.randn(bs.B, bs.D, device="cuda")

    def train(x):
        emb(x).backward(g)

    staged = cuda_rows.STAGE_BYTES
    bs.stream_ms(train, [batch() for _ in range(30)], 30)  # warm: the cache's steady state
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, stage in (("unstaged", 0), ("staged", staged)):
            cuda_rows.STAGE_BYTES = stage
            batches = [batch() for _ in range(args.steps + 2)]
            before = emb.stats()
            plain = bs.stream_ms(train, batches, 2)
            fills, wbs = bs.moved(emb, before, len(batches))
            piped = bs.pipelined_ms(emb, train, [batch() for _ in range(args.steps + 2)], 2)
            times.setdefault(f"{name} plain", []).append(plain)
            times.setdefault(f"{name} prefetching", []).append(piped)
            print(
                f"round {r} {name:>8}: plain {plain:6.2f} ms, prefetching(depth=1) "
                f"{piped:6.2f} ms; {fills / 1e6:.1f} MB in, {wbs / 1e6:.1f} MB back a step",
                flush=True,
            )
    print(f"L1 {args.l1:.0%}{' uniform' if args.uniform else ''}, medians over rounds:")
    for k, v in times.items():
        print(f"  {k:>22}: {statistics.median(v):6.2f} ms")


if __name__ == "__main__":
    main()
