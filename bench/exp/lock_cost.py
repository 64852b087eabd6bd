"""The cost of the table's lock (issue 25) on a single-threaded training step.

Times the same all-hits training step with the table's ``RLock`` and with a lock that does
nothing, in alternating rounds (so drift of the machine hits both alike), and prints the
medians and their ratio. Every call of the module takes the lock once; a step takes it twice
(forward, backward).

    python3 bench/exp/lock_cost.py [--device cuda] [--rounds 30] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tierstore as ts


class NoLock:
    """A lock that does nothing: the step without serialisation."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bags", type=int, default=8192)
    parser.add_argument("--ids", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    emb = ts.TieredEmbeddingBag(
        args.rows, args.dim, mode="sum", cache=ts.CacheConfig(rows=args.rows),
        optimizer=ts.SGD(lr=0.01), device=dev,
    )  # fmt: skip
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, args.rows, (args.bags, args.ids), device=dev, generator=gen)
    g = torch.randn(args.bags, args.dim, device=dev, generator=gen)

    def steps() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            emb(x).backward(g)
        sync()
        return (time.perf_counter() - t) / args.steps * 1e3

    real = emb._lock
    steps()  # warm-up: kernels compiled, rows in L1
    with_lock, without = [], []
    for _ in range(args.rounds):
        emb._lock = real
        with_lock.append(steps())
        emb._lock = NoLock()
        without.append(steps())
    emb._lock = real
    a, b = statistics.median(with_lock), statistics.median(without)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"{name}: {args.rows:,} x {args.dim}, {args.bags} bags x {args.ids} ids, SGD, all hits; "
        f"{args.rounds} alternating rounds of {args.steps} steps, medians of ms per step\n"
        f"with the lock {a:.4f} ms, without {b:.4f} ms: {100 * (a / b - 1):+.2f} %"
    )


if __name__ == "__main__":
    main()
