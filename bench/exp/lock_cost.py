"""The cost of the table's lock (issue 25) on a single-threaded training step.

Times the same all-hits training step with the table's ``RLock`` and with a lock that does
nothing, in alternating rounds, each of the two first in every other round (so drift of the
machine hits both alike), and prints the medians and their ratio. Every call of the module
takes the lock once; a step takes it twice (forward, backward). With ``--collection``, the same step through a
``TieredEmbeddingBagCollection`` of ``--tables`` tables of ``rows / tables`` rows each (one
group, one feature per table, ``ids`` ids per bag per feature), whose lock is taken by the
forward and by its group's backward. Last, the lock's own cost per call, timed apart (an
empty method with and without ``serialised``), which a noisy machine does not blur.

    python3 bench/exp/lock_cost.py [--device cuda] [--rounds 30] [--steps 50]
                                   [--collection [--tables 4]]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tierstore as ts
from tierstore.serial import SerialisedCalls, serialised


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
    parser.add_argument("--collection", action="store_true", help="time a collection's step")
    parser.add_argument("--tables", type=int, default=4, help="the collection's tables")
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    if args.collection:
        step, holders, what = collection_step(args, dev, gen)
    else:
        emb = ts.TieredEmbeddingBag(
            args.rows, args.dim, mode="sum", cache=ts.CacheConfig(rows=args.rows),
            optimizer=ts.SGD(lr=0.01), device=dev,
        )  # fmt: skip
        x = torch.randint(0, args.rows, (args.bags, args.ids), device=dev, generator=gen)
        g = torch.randn(args.bags, args.dim, device=dev, generator=gen)
        step, holders, what = (lambda: emb(x).backward(g)), [emb], "a table"

    def steps() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - t) / args.steps * 1e3

    def set_lock(lock) -> None:  # every object whose _lock a call or a backward takes
        for h in holders:
            h._lock = lock

    real = holders[0]._lock
    steps()  # warm-up: kernels compiled, rows in L1
    with_lock, without = [], []
    for r in range(args.rounds):  # which goes first alternates too (ABBA)
        for lock, out in ((real, with_lock), (NoLock(), without))[:: 1 if r % 2 else -1]:
            set_lock(lock)
            out.append(steps())
    set_lock(real)
    a, b = statistics.median(with_lock), statistics.median(without)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"{name}: {what}, {args.rows:,} x {args.dim}, {args.bags} bags x {args.ids} ids, SGD, "
        "all hits; "
        f"{args.rounds} alternating rounds of {args.steps} steps, medians of ms per step\n"
        f"with the lock {a:.4f} ms, without {b:.4f} ms: {100 * (a / b - 1):+.2f} %"
    )
    lock_us, plain_us = call_cost()
    print(
        f"the lock alone: {lock_us - plain_us:.3f} us per serialised call ({lock_us:.3f} us "
        f"an empty serialised method, {plain_us:.3f} us a plain one; uncontended)"
    )


class Empty(SerialisedCalls):
    """A table with nothing to do: what ``serialised`` adds to a call, alone."""

    def __init__(self):
        self._start_serialising()

    def plain(self) -> None:
        pass

    @serialised
    def locked(self) -> None:
        pass


def call_cost(calls: int = 200_000, rounds: int = 15) -> tuple[float, float]:
    """Medians of microseconds per call of an empty method with and without ``serialised``,
    in alternating rounds."""
    table, with_lock, without = Empty(), [], []
    for _ in range(rounds):
        for call, out in ((table.locked, with_lock), (table.plain, without)):
            t = time.perf_counter()
            for _ in range(calls):
                call()
            out.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(with_lock), statistics.median(without)


def collection_step(args, dev: torch.device, gen: torch.Generator):
    """A collection's training step (all its rows in L1), the objects holding its lock (the
    collection, and each group for its backward) and its description."""
    per = args.rows // args.tables
    col = ts.TieredEmbeddingBagCollection(
        [ts.TableConfig(name=f"t{k}", embedding_dim=args.dim, num_embeddings=per)
         for k in range(args.tables)],
        cache=ts.CacheConfig(rows=per * args.tables), optimizer=ts.SGD(lr=0.01), device=dev,
    )  # fmt: skip
    n = args.tables * args.bags * args.ids
    batch = dict(
        keys=[t.name for t in col.tables],
        values=torch.randint(0, per, (n,), device=dev, generator=gen),
        lengths=torch.full((args.tables * args.bags,), args.ids, device=dev),
    )
    g = torch.randn(args.bags, args.tables * args.dim, device=dev, generator=gen)
    what = f"a collection of {args.tables} tables in {len(col.groups)} group(s)"
    return (lambda: col(**batch).values().backward(g)), [col, *col.groups], what


if __name__ == "__main__":
    main()
