"""``tierstore replay TRACE...``: miss-ratio curves of the engine's policies and the bounds."""

from __future__ import annotations

import argparse

import numpy as np

from ..report import format_table, plot_lines, write_csv
from .sweep import COLUMNS, ENGINE_POLICIES, L2_COLUMNS, parse_sizes, replay_table


def add_replay_command(subparsers) -> argparse.ArgumentParser:
    """Registers ``replay`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "replay",
        help="replay access traces through the cache policies, with OPT and LRU bounds",
        description=(
            "Replays each table of each trace through the engine's set-associative LRU/LFU "
            "(its own code, batch by batch) and through OPT, fully associative LRU and modern "
            "policies, at every cache size, and prints one table."
        ),
    )
    p.add_argument("traces", nargs="+", help="trace files (any format `tierstore trace` reads)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format (default: detected)")
    p.add_argument(
        "--cache-rows", default="1%,5%,20%", help="sizes: rows, or %% of each table's distinct ids"
    )
    p.add_argument("--ways", type=int, default=32, help="associativity of the engine's cache")
    p.add_argument(
        "--policies", default="lru,lfu,opt,fa-lru,s3fifo,wtinylfu",
        help=f"comma list of {', '.join(ENGINE_POLICIES)} (engine) and opt, fa-lru, s3fifo, wtinylfu",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=65536, help="ids per step, as in training")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs the engine's kernels"
    )
    p.add_argument(
        "--host-rows",
        type=int,
        default=None,
        help="an L2 of this many rows: attribute hits to L1, L2, L3",
    )
    p.add_argument("--table", default=None, help="replay only this table (name)")
    p.add_argument("--csv", default=None, help="write the table to this CSV file")
    p.add_argument("--plot", default=None, help="write a miss-ratio-curve PNG here")
    p.set_defaults(func=run_replay)
    return p


def run_replay(args) -> int:
    """Runs the ``replay`` command."""
    from ..trace.formats import load_trace

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rows = []
    for path in args.traces:
        trace = load_trace(path, args.fmt)
        for name, ids in zip(trace.names, trace.tables):
            if args.table is not None and name != args.table:
                continue
            sizes = parse_sizes(args.cache_rows, int(np.unique(ids).size))
            label = name if len(args.traces) == 1 else f"{path}:{name}"
            rows += replay_table(
                ids, sizes, policies, table=label, ways=args.ways, batch=args.batch,
                device=args.device, host_rows=args.host_rows,
            )  # fmt: skip
    columns = COLUMNS + (L2_COLUMNS if args.host_rows else [])
    print(
        format_table(
            rows,
            columns,
            f"replay: batch {args.batch}, {args.ways}-way engine cache, device {args.device}",
        )
    )
    if args.csv:
        write_csv(rows, columns, args.csv)
    if args.plot:
        for r in rows:
            r["miss_ratio"] = 1.0 - r["hit_ratio"]
            r["curve"] = (
                f"{r['table']} {r['policy']}"
                if len({x["table"] for x in rows}) > 1
                else r["policy"]
            )
        if not plot_lines(
            rows,
            "cache_rows",
            ["miss_ratio"],
            "curve",
            args.plot,
            "miss-ratio curves",
            "cache size (rows)",
        ):
            print("--plot needs matplotlib (pip install matplotlib)")
    return 0
