"""``tierstore replay TRACE...``: miss-ratio curves of the engine's policies and the bounds.

Every argument is checked, every trace opened and the output paths tried before the first
replay, so that a mistake costs nothing; the CSV and the plot are written before the table is
printed, so that a closed stdout (``| head``) loses neither.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..cli_common import cuda_or_error, positive_int, writable_path
from ..errors import InvalidInputError
from ..report import format_table, plot_lines, write_csv
from ..trace.cli import add_csv_options, csv_options
from ..trace.formats import FORMATS
from .sweep import COLUMNS, ENGINE_POLICIES, L2_COLUMNS, check_policies, parse_sizes, replay_table

SHARED_COLUMNS = ["cache", "request_share", "keys"]  # the CSV's, for a multi-table trace

NOTES = (
    "cache_rows: rows the cache holds (the engine's cache has whole sets of `ways` rows: "
    "ceil(asked_rows / ways) * ways); sizes in % of a table's distinct ids round down.",
    "hit_ratio: 1 - misses / requested. Rows of batch > 1 are batched: an id repeated inside a "
    "batch is looked up once and its repeats count as hits, as in training's stats(); compare "
    "them with per-request figures (OPT, fa-lru, ...) only at --batch 1.",
)
SHARED_NOTE = (
    "The tables share one cache, a row's key being (table, id); the rows of one table "
    "attribute its lookups and hits (every policy; OPT's split among tables is that of one "
    "optimal schedule, its total being the only one). --per-table-cache: each "
    "table in a cache of its own, the size split by distinct ids (asked_rows: the shared "
    "size; cache_rows: what the table's own cache holds)."
)


def add_replay_command(subparsers) -> argparse.ArgumentParser:
    """Registers ``replay`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "replay",
        help="replay access traces through the cache policies, with OPT and LRU bounds",
        description=(
            "Replays each trace through the engine's set-associative LRU/LFU (its own code, "
            "batch by batch; at --batch 1 request by request) and through OPT, fully "
            "associative LRU and modern policies, at every cache size, and prints a table. The "
            "tables of a multi-table trace share one cache keyed by (table, id), and a second "
            "table attributes its figures to each table."
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
    p.add_argument(
        "--per-table-cache",
        action="store_true",
        help="multi-table traces: also replay each table in a cache of its own, the size "
        "split among the tables by distinct ids, beside the shared cache",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON, not tables")
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
    from .shared import TABLE_COLUMNS, replay_shared

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    _check(args, policies)
    opts = csv_options(args)
    readers = [(path, read_trace(path, args.fmt, **opts)) for path in args.traces]
    run = dict(ways=args.ways, batch=args.batch, device=args.device, host_rows=args.host_rows)
    rows = []
    seen: list[str] = []
    for path, reader in readers:
        trace = reader.load("reading")
        seen += trace.names
        prefix = "" if len(args.traces) == 1 else f"{path}:"
        if args.table is None and len(trace.names) > 1:
            distinct = sum(int(np.unique(ids).size) for ids in trace.tables)
            sizes = parse_sizes(args.cache_rows, distinct)
            got = replay_shared(trace, sizes, policies, per_table_cache=args.per_table_cache, **run)
            rows += [{**r, "table": prefix + r["table"]} for r in got]
            continue
        for name, ids in zip(trace.names, trace.tables):
            if args.table is not None and name != args.table:
                continue
            sizes = parse_sizes(args.cache_rows, int(np.unique(ids).size))
            rows += replay_table(ids, sizes, policies, table=prefix + name, **run)
    if args.table is not None and args.table not in seen:
        raise InvalidInputError(f"--table {args.table!r}: no such table; tables: {seen}")
    shared = any("cache" in r for r in rows)
    columns = COLUMNS + (L2_COLUMNS if args.host_rows else [])
    title = f"replay: batch {args.batch}, {args.ways}-way engine cache, device {args.device}"
    notes = list(NOTES) + ([SHARED_NOTE] if shared else [])
    if any(r.get("keys") == "hashed" for r in rows):
        notes.append(
            "keys hashed: some ids lie outside [0, 2**47), so (table, id) keys hold a 47-bit "
            "hash of the id (two ids of a table of n distinct ids collide with odds ~n**2/2**48)"
        )
    if args.csv:
        write_csv(rows, columns + (SHARED_COLUMNS if shared else []), args.csv)
    drew = True
    if args.plot:
        drew = _plot([r for r in rows if "request_share" not in r], args.plot, title)
    if args.json:
        print(json.dumps({"title": title, "notes": notes, "rows": rows}))
    elif shared:
        whole = [r for r in rows if "request_share" not in r]
        print(format_table(whole, columns + ["cache"], title))
        print()
        rank = {p: k for k, p in enumerate(dict.fromkeys(r["policy"] for r in rows))}
        per_table = sorted(  # stable: the tables in trace order
            (r for r in rows if "request_share" in r),
            key=lambda r: (r["cache"] != "shared", rank[r["policy"]], r["asked_rows"]),
        )
        print(format_table(per_table, TABLE_COLUMNS, "per table:"))
        print("\n".join(notes))
    else:
        print(format_table(rows, columns, title))
        print("\n".join(notes))
    if not drew:
        print("--plot needs matplotlib (pip install matplotlib)")
    return 0


def _curve(row: dict, name_table: bool) -> str:
    """A plotted line's name: the policy, after its table where several are plotted, before
    its cache (shared or per-table) in a multi-table replay."""
    parts = [row["table"]] if name_table else []
    return " ".join([*parts, row["policy"], *([row["cache"]] if "cache" in row else [])])


def _plot(rows: list[dict], path: str, title: str) -> bool:
    """The miss-ratio curves, one line per policy (and table); batched lines say so in their
    name (the policy's). Returns False where matplotlib is missing."""
    tables = {r["table"] for r in rows}
    points = [
        {
            "cache_rows": r["cache_rows"],
            "miss_ratio": 1.0 - r["hit_ratio"],
            "curve": _curve(r, len(tables) > 1),
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
