"""``tierstore replay TRACE...``: miss-ratio curves of the engine's policies and the bounds.

Every argument is checked, every trace opened and the output paths tried before the first
replay, so that a mistake costs nothing; the CSV and the plot are written before the table is
printed, so that a closed stdout (``| head``) loses neither.
"""

from __future__ import annotations

import argparse

import numpy as np

from ..cli_common import cuda_or_error, positive_int, writable_path
from ..errors import InvalidInputError
from ..report import format_table, plot_lines, write_csv
from ..trace.cli import add_csv_options, csv_options
from ..trace.formats import FORMATS
from .sweep import COLUMNS, ENGINE_POLICIES, L2_COLUMNS, check_policies, parse_sizes, replay_table

NOTES = (
    "cache_rows: rows the cache holds (the engine's cache has whole sets of `ways` rows: "
    "ceil(asked_rows / ways) * ways); sizes in % of a table's distinct ids round down.",
    "hit_ratio: 1 - misses / requested. Rows of batch > 1 are batched: an id repeated inside a "
    "batch is looked up once and its repeats count as hits, as in training's stats(); compare "
    "them with per-request figures (OPT, fa-lru, ...) only at --batch 1.",
)


def add_replay_command(subparsers) -> argparse.ArgumentParser:
    """Registers ``replay`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "replay",
        help="replay access traces through the cache policies, with OPT and LRU bounds",
        description=(
            "Replays each table of each trace through the engine's set-associative LRU/LFU "
            "(its own code, batch by batch; at --batch 1 request by request) and through OPT, "
            "fully associative LRU and modern policies, at every cache size, and prints one "
            "table."
        ),
    )
    p.add_argument("traces", nargs="+", help="trace files (any format `tierstore trace` reads)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default=None,
        help="trace format (default: detected)",
    )
    add_csv_options(p)
    p.add_argument(
        "--cache-rows",
        default="1%,5%,20%",
        help="sizes: rows, or %% of each table's distinct ids (rounded down)",
    )
    p.add_argument(
        "--ways",
        type=positive_int,
        default=32,
        help="associativity of the engine's cache (any; at least the rows: fully associative; "
        "the CUDA kernels take up to 64)",
    )
    p.add_argument(
        "--policies", default="lru,lfu,opt,fa-lru,s3fifo,wtinylfu",
        help=f"comma list of {', '.join(ENGINE_POLICIES)} (engine) and opt, fa-lru, s3fifo, wtinylfu",
    )  # fmt: skip
    p.add_argument(
        "--batch",
        type=positive_int,
        default=65536,
        help="ids per step of the engine's cache, as in training (1: per request, comparable "
        "with OPT)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs the engine's kernels"
    )
    p.add_argument(
        "--host-rows",
        type=positive_int,
        default=None,
        help="an L2 of this many rows: attribute hits to L1, L2, L3",
    )
    p.add_argument("--table", default=None, help="replay only this table (name)")
    p.add_argument("--csv", default=None, help="write the table to this CSV file")
    p.add_argument("--plot", default=None, help="write a miss-ratio-curve PNG here")
    p.set_defaults(func=run_replay)
    return p


def _check(args, policies: list[str]) -> None:
    """Every check that needs no replay: raises InvalidInputError before any work."""
    check_policies(policies)
    parse_sizes(args.cache_rows, 1)  # the syntax; percentages resolve per table
    if any(p in ENGINE_POLICIES for p in policies):
        cuda_or_error(args.device)
        if args.device == "cuda":
            from ..cuda import MAX_WAYS

            if args.ways > MAX_WAYS:
                raise InvalidInputError(
                    f"--ways {args.ways}: the CUDA kernels take at most {MAX_WAYS} ways; "
                    "replay wider caches with --device cpu"
                )
    for path, what in ((args.csv, "--csv"), (args.plot, "--plot")):
        if path:
            writable_path(path, what)


def run_replay(args) -> int:
    """Runs the ``replay`` command."""
    from ..trace.formats import read_trace

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    _check(args, policies)
    opts = csv_options(args)
    readers = [(path, read_trace(path, args.fmt, **opts)) for path in args.traces]
    rows = []
    seen: list[str] = []
    for path, reader in readers:
        trace = reader.load()
        seen += trace.names
        for name, ids in zip(trace.names, trace.tables):
            if args.table is not None and name != args.table:
                continue
            sizes = parse_sizes(args.cache_rows, int(np.unique(ids).size))
            label = name if len(args.traces) == 1 else f"{path}:{name}"
            rows += replay_table(
                ids, sizes, policies, table=label, ways=args.ways, batch=args.batch,
                device=args.device, host_rows=args.host_rows,
            )  # fmt: skip
    if args.table is not None and args.table not in seen:
        raise InvalidInputError(f"--table {args.table!r}: no such table; tables: {seen}")
    columns = COLUMNS + (L2_COLUMNS if args.host_rows else [])
    title = f"replay: batch {args.batch}, {args.ways}-way engine cache, device {args.device}"
    if args.csv:
        write_csv(rows, columns, args.csv)
    drew = True
    if args.plot:
        drew = _plot(rows, args.plot, title)
    print(format_table(rows, columns, title))
    print("\n".join(NOTES))
    if not drew:
        print("--plot needs matplotlib (pip install matplotlib)")
    return 0


def _plot(rows: list[dict], path: str, title: str) -> bool:
    """The miss-ratio curves, one line per policy (and table); batched lines say so in their
    name (the policy's). Returns False where matplotlib is missing."""
    tables = {r["table"] for r in rows}
    points = [
        {
            "cache_rows": r["cache_rows"],
            "miss_ratio": 1.0 - r["hit_ratio"],
            "curve": f"{r['table']} {r['policy']}" if len(tables) > 1 else r["policy"],
        }
        for r in rows
    ]
    return plot_lines(
        points,
        "cache_rows",
        ["miss_ratio"],
        "curve",
        path,
        title
        if all(r["batch"] == 1 for r in rows)
        else f"{title}\n(batched: repeats in a batch hit)",
        "cache size (rows held)",
    )
