"""What creating a large in-memory CUDA table costs (issue 24's < 3 s for 10 M x 128): page-locked
host memory from torch's caching host allocator (which rounds the size up to a power of two),
pageable memory registered with cudaHostRegister, and the table's own creation profiled.

    python3 bench/exp/pin_cost.py [--rows 10000000] [--dim 128]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--only", default="alloc,table")
    args = parser.parse_args()
    n = args.rows * args.dim
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731
    if "alloc" in args.only:
        t = time.perf_counter()
        a = torch.empty(n, pin_memory=True)
        print(f"torch.empty(pin_memory=True) of {4 * n / 2**30:.2f} GiB: "
              f"{time.perf_counter() - t:.2f} s, peak RSS {rss():.2f} GiB")  # fmt: skip
        del a
        t = time.perf_counter()
        b = torch.empty(n)
        b.zero_()
        t1 = time.perf_counter()
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(b.data_ptr(), b.numel() * 4, 0)
        t2 = time.perf_counter()
        print(f"pageable + zero_: {t1 - t:.2f} s; cudaHostRegister: {t2 - t1:.2f} s (err {err}); "
              f"is_pinned {b.is_pinned()}; peak RSS {rss():.2f} GiB")  # fmt: skip
        cudart.cudaHostUnregister(b.data_ptr())
        del b
    if "table" in args.only:
        import tierstore as ts

        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        emb = ts.TieredEmbeddingBag(args.rows, args.dim, mode="sum", device="cuda")
        torch.cuda.synchronize()
        prof.disable()
        print(f"TieredEmbeddingBag: {time.perf_counter() - t:.2f} s, peak RSS {rss():.2f} GiB")
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
        del emb


if __name__ == "__main__":
    main()
