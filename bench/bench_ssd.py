"""Benchmarks of the SSD tier (L3, tierstore/ssd.py).

As a script, the full matrix behind bench/RESULTS.md (a few minutes, ~1.2 GB of disk at
a time in a temporary directory)::

    python bench/bench_ssd.py                      # 2 M rows, block_rows 1 4 16 64, levels 0 3
    python bench/bench_ssd.py --rows 262144 --block-rows 1 --levels 3
    python bench/bench_ssd.py --compare --block-rows 1 2 4 --levels 3   # reads only, interleaved
    python bench/bench_ssd.py --checksums --rows 131072 --block-rows 1 16 --levels 3
    python bench/bench_ssd.py --random-reads --block-rows 1 --levels 3 --dim 64 \
        --rows 2097152 --batch 100000 --threads 1 2 4 8 16 --json reads.json

As a pytest-benchmark suite (small tables, for regressions)::

    python -m pytest bench/bench_ssd.py --benchmark-only

Rows are "trained-like" fp32: dim 128 weights ~ normal(0, 0.01), then one positive row-wise
AdaGrad state (row_width 129). Reads are batches of 64K unique ids, sorted as the engine
sends them, with the page cache warm (the table has just been written and read once).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import wait

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierstore import blocks  # noqa: E402

try:
    from tierstore import blocks_compiled  # noqa: E402
except ImportError:  # the tier before the compiled decoder (for before/after figures)
    blocks_compiled = None
from tierstore.hashing import initial_weights  # noqa: E402
from tierstore.ssd import SSDTier  # noqa: E402

DIM, WIDTH = 128, 129
BATCH = 1 << 16


def init_rows(ids: torch.Tensor, width: int = WIDTH) -> torch.Tensor:
    return initial_weights(ids, width, 7, 0.05)


def trained_rows(rng: np.random.Generator, n: int, width: int = WIDTH) -> torch.Tensor:
    rows = np.empty((n, width), np.float32)
    rows[:, : width - 1] = rng.normal(0, 0.01, (n, width - 1))
    rows[:, width - 1] = np.abs(rng.normal(0, 0.05, n))  # AdaGrad's sum of squared gradients
    return torch.from_numpy(rows)


def random_batch(rng: np.random.Generator, ids: np.ndarray, n: int = BATCH) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.choice(ids, n, replace=False)))


def rate(rows: int, seconds: float) -> float:
    return rows / seconds / 1e6


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def build(
    path, ids: np.ndarray, block_rows: int, level: int, rng, width: int = WIDTH
) -> tuple[SSDTier, float]:
    """Creates a table holding ``ids`` (sorted) in one flush; returns it and the flush time."""
    tier = SSDTier.create(
        path,
        {"row_width": width},
        functools.partial(init_rows, width=width),
        block_rows=block_rows,
        compression_level=level,
        io_threads=2,
    )
    spent = 0.0
    writer = tier.flush_begin()
    for start in range(0, len(ids), BATCH):
        chunk = torch.from_numpy(ids[start : start + BATCH])
        rows = trained_rows(rng, len(chunk), width)  # generated outside the timed part
        t0 = time.perf_counter()
        writer.write(chunk, rows)
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.commit()
    return tier, spent + time.perf_counter() - t0


def measure(workdir: str, rows: int, block_rows: int, level: int, sparse: bool, reads: int):
    """All figures for one configuration, as a dict."""
    rng = np.random.default_rng(block_rows * 10 + level)
    if sparse:  # hashed feature ids: anywhere in int64
        ids = np.unique(rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64))
    else:
        ids = np.arange(rows, dtype=np.int64)
    path = os.path.join(workdir, f"t{block_rows}_{level}_{int(sparse)}")
    tier, flush_s = build(path, ids, block_rows, level, rng)
    out = {
        "ids": "hashed" if sparse else "dense",
        "block_rows": block_rows,
        "level": level,
        "rows": len(ids),
        "bulk_flush": rate(len(ids), flush_s),
        "ratio": len(ids) * WIDTH * 4 / tier.stats["bytes_written"],
        "disk_per_row": tier.disk_bytes() / len(ids),
    }
    t0 = time.perf_counter()  # warms the page cache's page tables
    for start in range(0, len(ids), BATCH):
        tier.read(torch.from_numpy(ids[start : start + BATCH]))
    out["seq_read"] = rate(len(ids), time.perf_counter() - t0)
    batches = [random_batch(rng, ids) for _ in range(reads)]
    it = iter(batches)
    out["rand_read"] = rate(BATCH, statistics.median(timed(lambda: tier.read(next(it)), reads)))
    t0 = time.perf_counter()  # two batches in flight at a time, as the prefetch pipeline does
    wait([tier.read_async(b) for b in batches])
    out["rand_read_async"] = rate(BATCH * reads, time.perf_counter() - t0)
    dirty = [(random_batch(rng, ids), trained_rows(rng, BATCH)) for _ in range(6)]
    it = iter(dirty)
    out["rand_flush"] = rate(BATCH, statistics.median(timed(lambda: tier.flush(*next(it)), 3)))
    out["rand_write"] = rate(BATCH, statistics.median(timed(lambda: tier.write(*next(it)), 3)))
    t0 = time.perf_counter()
    tier.flush(dirty[0][0][:0], dirty[0][1][:0])  # merges the 3 x 64K staged rows
    out["staged_flush"] = rate(3 * BATCH, time.perf_counter() - t0)
    tier.close()
    shutil.rmtree(path)
    return out


def compare_reads(workdir: str, rows: int, configs: list[tuple[int, int]], rounds: int = 9):
    """Random-read rows/s of several tables, measured in interleaved rounds so that the load
    of a shared machine hits every configuration alike: {(block_rows, level): (median, best)}."""
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64)
    tiers = {}
    for block_rows, level in configs:
        path = os.path.join(workdir, f"cmp{block_rows}_{level}")
        tiers[block_rows, level], _ = build(path, ids, block_rows, level, rng)
        for start in range(0, rows, BATCH):
            tiers[block_rows, level].read(torch.from_numpy(ids[start : start + BATCH]))
    times = {config: [] for config in configs}
    for _ in range(rounds):
        for config in configs:
            batch = random_batch(rng, ids)
            times[config] += timed(lambda: tiers[config].read(batch), 1)  # noqa: B023
    for tier in tiers.values():
        tier.close()
    return {c: (rate(BATCH, statistics.median(t)), rate(BATCH, min(t))) for c, t in times.items()}


def checksum_cost(workdir: str, rows: int, block_rows: int, level: int, rounds: int = 9):
    """What the format-2 checks cost, in one process and on one table (so that a shared
    machine's load hits both alike): rows/s of 64K-row random reads and flushes with the
    checks as shipped and with them switched off, best of ``rounds`` each, interleaved, on two
    identical tables (the one flushed without checks holds blocks without valid trailers).
    Each table holds the even ids of ``[0, 2 * rows)``; "half absent" reads draw from all ids,
    so half of them were never written and take the absence check
    (:meth:`BlockDB.check_absent`). Reads take the codec's path, whose checks can be switched
    off (the compiled decoder checks inside its loop).
    """
    from tierstore.ssd_blockdb import BlockDB  # here: the script also runs on older trees

    ids = np.arange(0, 2 * rows, 2, dtype=np.int64)
    tiers = {}
    for name in ("on", "off"):
        path = os.path.join(workdir, f"ck{block_rows}_{level}_{name}")
        tiers[name], _ = build(path, ids, block_rows, level, np.random.default_rng(1))
        tiers[name]._db.compiled = False  # internal switch: the codec's checks, patched below
        for start in range(0, len(ids), BATCH):  # warm the page cache
            tiers[name].read(torch.from_numpy(ids[start : start + BATCH]))
    rng = np.random.default_rng(block_rows * 10 + level)
    shipped = (blocks.check, blocks.seal, BlockDB.check_absent)

    def no_crc_seal(keys, bodies):  # the trailer's 4 bytes, not computed
        return [b + b"\0\0\0\0" for b in bodies]

    off = (lambda values, keys: None, no_crc_seal, lambda *args: None)
    best = {}
    for _ in range(rounds):
        for name, (check, seal, absent) in (("on", shipped), ("off", off)):
            blocks.check, blocks.seal, BlockDB.check_absent = check, seal, absent
            tier = tiers[name]
            present = random_batch(rng, ids)
            mixed = random_batch(rng, np.arange(2 * rows, dtype=np.int64))
            dirty = (random_batch(rng, ids), trained_rows(rng, BATCH))
            for what, fn in (
                ("read", lambda: tier.read(present)),  # noqa: B023
                ("read, half absent", lambda: tier.read(mixed)),  # noqa: B023
                ("flush", lambda: tier.flush(*dirty)),  # noqa: B023
            ):
                seconds = timed(fn, 1)[0]
                best[what, name] = max(best.get((what, name), 0.0), rate(BATCH, seconds))
    blocks.check, blocks.seal, BlockDB.check_absent = shipped
    for tier in tiers.values():
        tier.close()
    return best


def children_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def read_scaling(
    workdir: str, rows: int, dim: int, block_rows: int, level: int, batch: int,
    threads: list[int], rounds: int, processes: list[int] = (0,),
) -> list[dict]:  # fmt: skip
    """Random reads of ``batch`` unique ids (the misses of a batch, sorted as the engine sends
    them) from a table of ``rows`` rows of ``dim`` weights + 1 AdaGrad state, page cache warm,
    by ``io_threads`` and read path (getmulti and the compiled decoder, the default; getmulti
    and the codec) and ``io_processes`` (reader processes looking keys up, compiled decoder
    only; 0: none): median and
    best rows/s, CPU seconds of the process per row (all threads: per-core cost), and
    ``getmulti`` of the same keys alone (the part that runs on one thread)."""
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64)
    path = os.path.join(workdir, f"scaling{block_rows}_{level}")
    width = dim + 1
    tier, _ = build(path, ids, block_rows, level, rng, width)
    tier.close()
    found = []
    for n_threads, n_processes in itertools.product(threads, processes):
        more = {"io_processes": n_processes} if n_processes else {}  # older tiers lack it
        tier = SSDTier.open(path, functools.partial(init_rows, width=width), io_threads=n_threads,
                            **more)  # fmt: skip
        for start in range(0, rows, 1 << 17):  # warms the page cache (and starts the readers)
            tier.read(torch.from_numpy(ids[start : start + (1 << 17)]))
        db = getattr(tier, "_db", None)  # None: the tier before the split (one decoder)
        decoders = ["codec"]
        if db is not None and blocks_compiled.AVAILABLE:
            decoders = ["getmulti+compiled", "codec"]
        if n_processes:
            decoders = ["getmulti+compiled"]
            if not db.readers.ready(timeout=60):
                raise SystemExit("the reader processes did not start")
            tier.read(torch.from_numpy(ids[: 1 << 17]))  # warms the readers' maps
        for decoder in decoders:
            if db is not None:
                # Internal switch, as the tests use it: the compiled decoder (the default)
                # or the codec.
                db.compiled = decoder != "codec"
            walls, cpus, reader_cpus = [], [], []
            pids = db.readers.pids() if n_processes else []
            for _ in range(rounds):
                b = random_batch(rng, ids, batch)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                readers0 = children_cpu(pids)
                tier.read(b)
                walls.append(time.perf_counter() - wall0)
                cpus.append(time.process_time() - cpu0)
                reader_cpus.append(children_cpu(pids) - readers0)
            b = random_batch(rng, ids, batch)
            codec = db.codec if db is not None else tier._codec
            keys = codec.keys(codec.blocks(b.numpy().view(np.uint64) ^ blocks.SIGN)[1])
            with tier._env.begin() as txn:
                cursor = txn.cursor(tier._blocks)
                getmulti_s = min(timed(lambda: cursor.getmulti(keys), 3))  # noqa: B023
            found.append({
                "io_threads": n_threads, "io_processes": n_processes, "decoder": decoder, "rows": rows, "dim": dim,
                "block_rows": block_rows, "level": level, "batch": batch,
                "read": rate(batch, statistics.median(walls)), "best": rate(batch, min(walls)),
                "cpu_us_per_row": 1e6 * statistics.median(cpus) / batch,
                "reader_cpu_us_per_row": 1e6 * statistics.median(reader_cpus) / batch,
                "getmulti_alone": rate(batch, getmulti_s),
            })  # fmt: skip
            print(found[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
        if n_processes and (db.readers.closed or db.readers.broken):
            raise SystemExit("the reader processes failed: figures would be in-process ones")
        tier.close()
    shutil.rmtree(path)
    return found


SCALING_COLUMNS = [
    ("io_threads", "io_threads", "{}"),
    ("io_processes", "io_processes", "{}"),
    ("decoder", "read path", "{}"),
    ("read", "random read, M rows/s (median)", "{:.3f}"),
    ("best", "best", "{:.3f}"),
    ("cpu_us_per_row", "CPU us per row (this process, all threads)", "{:.2f}"),
    ("reader_cpu_us_per_row", "CPU us per row (reader processes)", "{:.2f}"),
    ("getmulti_alone", "getmulti alone, M rows/s", "{:.3f}"),
]


COLUMNS = [
    ("ids", "ids", "{}"),
    ("block_rows", "block_rows", "{}"),
    ("level", "zstd level", "{}"),
    ("rand_read", "random read, M rows/s", "{:.3f}"),
    ("rand_read_async", "random read, 2 threads", "{:.3f}"),
    ("seq_read", "sequential read", "{:.3f}"),
    ("bulk_flush", "bulk flush (ids in order)", "{:.3f}"),
    ("rand_flush", "random flush (RMW)", "{:.3f}"),
    ("rand_write", "random write() (staged)", "{:.3f}"),
    ("staged_flush", "flush of staged rows", "{:.3f}"),
    ("ratio", "compression ratio (values)", "{:.3f}"),
    ("disk_per_row", "disk bytes/row", "{:.0f}"),
]


def markdown(results: list[dict], columns: list = COLUMNS) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1 << 21)
    parser.add_argument("--block-rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--reads", type=int, default=7, help="random batches per figure")
    parser.add_argument("--hashed", action="store_true", help="add hashed-id tables")
    parser.add_argument("--dir", default=None, help="where to put the tables (default: /tmp)")
    parser.add_argument(
        "--compare", action="store_true", help="only random reads, interleaved across configs"
    )
    parser.add_argument(
        "--checksums", action="store_true", help="reads and flushes with and without checks"
    )
    parser.add_argument(
        "--random-reads", action="store_true",
        help="only random reads by io_threads, io_processes and decoder (--threads, "
        "--processes, --dim, --batch)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[0],
        help="with --random-reads: io_processes (reader processes) to try, 0 = none",
    )  # fmt: skip
    parser.add_argument("--dim", type=int, default=DIM, help="weights per row (+1 state)")
    parser.add_argument("--batch", type=int, default=100_000, help="ids per random read")
    parser.add_argument("--json", default=None, help="with --random-reads: write figures here")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load average before: {os.getloadavg()}", flush=True)  # fmt: skip
    if args.random_reads:
        results = []
        with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
            for block_rows in args.block_rows:
                for level in args.levels:
                    results += read_scaling(
                        workdir, args.rows, args.dim, block_rows, level, args.batch,
                        args.threads, args.reads, args.processes,
                    )  # fmt: skip
        print(f"load average after: {os.getloadavg()}")
        print(f"\nrandom reads of {args.batch} unique ids from {args.rows} x {args.dim + 1} fp32 "
              f"rows, page cache warm, median of {args.reads}")  # fmt: skip
        for block_rows in args.block_rows:
            for level in args.levels:
                print(f"\nblock_rows {block_rows}, zstd level {level}\n")
                print(markdown([r for r in results if (r["block_rows"], r["level"])
                                == (block_rows, level)], SCALING_COLUMNS))  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.checksums:
        print("| block_rows | zstd level | operation | checks on, M rows/s | off | on / off |")
        print("|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
            for block_rows in args.block_rows:
                for level in args.levels:
                    best = checksum_cost(workdir, args.rows, block_rows, level)
                    for what in ("read", "read, half absent", "flush"):
                        on, off = best[what, "on"], best[what, "off"]
                        print(f"| {block_rows} | {level} | {what} | {on:.3f} | {off:.3f} | "
                              f"{on / off:.2f} |", flush=True)  # fmt: skip
        print(f"load average after: {os.getloadavg()}")
        return
    if args.compare:
        configs = [(s, lv) for lv in args.levels for s in args.block_rows]
        with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
            found = compare_reads(workdir, args.rows, configs)
        print(f"load average after: {os.getloadavg()}")
        print(
            "| block_rows | zstd level | random read, M rows/s (median) | best |\n|---|---|---|---|"
        )
        for (block_rows, level), (median, best) in found.items():
            print(f"| {block_rows} | {level} | {median:.3f} | {best:.3f} |")
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        configs = [(s, lv, False) for s in args.block_rows for lv in args.levels]
        if args.hashed:
            configs += [(s, lv, True) for s in args.block_rows[:1] for lv in args.levels]
        for block_rows, level, sparse in configs:
            r = measure(workdir, args.rows, block_rows, level, sparse, args.reads)
            results.append(r)
            print(r, f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(markdown(results))


# ------------------------------------------------------------------ pytest-benchmark suite


@pytest.fixture(scope="module", params=[0, 3], ids=["level0", "level3"])
def small_table(request, tmp_path_factory):
    rng = np.random.default_rng(0)
    ids = np.arange(1 << 18, dtype=np.int64)
    tier, _ = build(tmp_path_factory.mktemp("ssd") / "t", ids, 1, request.param, rng)
    tier.read(torch.from_numpy(ids))
    yield tier, ids, rng
    tier.close()


def test_read_random_64k(benchmark, small_table):
    tier, ids, rng = small_table
    batches = iter([random_batch(rng, ids) for _ in range(40)])
    benchmark.pedantic(lambda: tier.read(next(batches)), rounds=20, warmup_rounds=1)


def test_flush_random_64k(benchmark, small_table):
    tier, ids, rng = small_table
    dirty = iter([(random_batch(rng, ids), trained_rows(rng, BATCH)) for _ in range(6)])
    benchmark.pedantic(lambda: tier.flush(*next(dirty)), rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    main()
