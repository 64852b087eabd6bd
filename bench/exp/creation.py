"""Issue 24's creation figure: wall time and peak memory to build a 10 M x 128 in-memory table,
then to train one batch on it (the first touch of its rows).

    python3 bench/exp/creation.py [--device cuda] [--rows 10000000] [--dim 128]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import tierstore as ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    start = time.perf_counter()
    emb = ts.TieredEmbeddingBag(args.rows, args.dim, mode="sum", device=args.device)
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter() - start
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (KiB units)
    indices = torch.randint(0, args.rows, (65_536 * 32,), device=args.device)
    offsets = torch.arange(0, indices.numel(), 32, device=args.device)
    start = time.perf_counter()
    emb(indices, offsets).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    step = time.perf_counter() - start
    hbm = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    print(
        f"{args.rows} x {args.dim} on {args.device}: built in {built:.2f} s, peak host RSS "
        f"{peak_host:.2f} GiB, torch HBM peak {hbm:.2f} GiB; first 65 536 x 32 step {step:.2f} s"
    )


if __name__ == "__main__":
    main()
