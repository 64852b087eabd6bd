"""``tierstore trace``: convert, stats and generate.

``add_trace_commands(subparsers)`` registers the ``trace`` command on an argparse subparsers
object (the ``tierstore`` CLI calls it); ``main(argv)`` runs it standalone
(``python -m tierstore.trace.cli stats t.tst``). Each subcommand sets ``func``, which takes the
parsed arguments and returns an exit status; errors are raised as tierstore exceptions and
become one line on stderr and status 2 in ``tierstore.cli_common.run_command``, as for every
command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli_common import Parser, positive_int, run_parser
from ..errors import TierstoreError
from ..progress import progress
from .formats import FORMATS, WRITABLE, read_trace
from .writers import write_trace


def _reader_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--from", dest="fmt", choices=FORMATS, help="input format (default: detect)")
    add_csv_options(g)
    g.add_argument("--chunk", type=positive_int, default=1 << 20, help="ids or rows read at a time")


def add_csv_options(g) -> None:
    """Adds the csv reader's options (``--id-col`` ... ``--header``) to a parser or group;
    :func:`csv_options` collects the ones given."""
    g.add_argument("--id-col", help="csv: id column (header name or 0-based index)")
    g.add_argument("--table-col", help="csv: table column (optional)")
    g.add_argument("--sort-col", help="csv: order requests by this numeric column (optional)")
    g.add_argument(
        "--delimiter",
        type=delimiter,
        help="csv: field separator, one character or tab, comma, semicolon, space, pipe "
        "(default: tab for .tsv, else ,)",
    )
    g.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="csv: the first row is a header (default: guess)",
    )


def csv_options(args: argparse.Namespace) -> dict:
    """The csv reader options given on the command line (see :func:`add_csv_options`)."""
    opts = {}
    for key in ("id_col", "table_col", "sort_col", "delimiter", "header"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


_DELIMITERS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "space": " ", "pipe": "|"}


def delimiter(text: str) -> str:
    """An argparse type: one character, or the name of one (``tab``, ``comma``, ...)."""
    value = _DELIMITERS.get(text.lower(), text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one character nor one of {', '.join(_DELIMITERS)}"
        )
    return value


def _open(args):
    return read_trace(args.input, args.fmt, chunk_size=args.chunk, **csv_options(args))


class _Shown:
    """Wraps a reader so that reading shows a progress bar (and keeps ``table_names``)."""

    def __init__(self, reader, desc: str):
        self.reader, self.desc = reader, desc

    @property
    def table_names(self):
        return self.reader.table_names

    def __iter__(self):
        return iter(progress(self.reader, self.desc))


def _convert(args) -> int:
    reader = _open(args)
    t0 = time.perf_counter()
    counts = write_trace(
        args.output, _Shown(reader, "converting"), args.to, dtype=args.dtype, level=args.level
    )
    print(
        f"{args.output}: {sum(counts)} ids in {len(counts)} table(s) "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _stats(args) -> int:
    from .analyze import format_stats, shared_stats, trace_stats

    data = _open(args).load("reading")
    if args.table:
        keep = [i for i, n in enumerate(data.names) if n in args.table]
        if not keep:
            raise TierstoreError(f"no table named {args.table}; tables: {data.names}")
        data = data.select(keep)
    per_table, total = trace_stats(data)
    shared = shared_stats(data) if len(per_table) > 1 else None
    if args.json:
        out = {"tables": [s.to_dict() for s in per_table], "all": total.to_dict()}
        if shared is not None:
            out["shared"] = shared.to_dict()
        print(json.dumps(out))
    else:
        print(format_stats(per_table, total, shared))
    return 0


def _generate(args) -> int:
    from .generate import generate_trace

    params = {}
    if args.kind == "drift":
        params = {"period": args.period, "step": args.step}
    elif args.kind == "scan-mix":
        params = {"scan_fraction": args.scan_fraction, "scan_length": args.scan_length}
    trace = generate_trace(
        args.kind,
        args.requests,
        args.universe,
        args.alpha,
        seed=args.seed,
        tables=args.tables,
        **params,
    )
    counts = write_trace(args.output, trace, args.to, dtype=args.dtype, level=args.level)
    print(f"{args.output}: {sum(counts)} ids ({args.kind}, alpha {args.alpha}, seed {args.seed})")
    return 0


def _output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--to", choices=WRITABLE, help="output format (default: from the extension)")
    g.add_argument(
        "--dtype",
        choices=("auto", "int32", "int64", "uint64"),
        default="auto",
        help="id width in .tst files (auto: int32 when every id fits)",
    )
    g.add_argument("--level", type=int, default=3, help="zstd level for .tst.zst")


def add_trace_commands(subparsers) -> argparse.ArgumentParser:
    """Registers ``trace`` (with ``convert``, ``stats``, ``generate``) on ``subparsers``."""
    trace = subparsers.add_parser(
        "trace",
        help="convert, inspect and generate access traces",
        description="Access traces: convert between formats, print statistics, generate.",
    )
    sub = trace.add_subparsers(
        dest="trace_command", metavar="{convert,stats,generate}", required=True
    )

    p = sub.add_parser("convert", help="convert a trace between formats (streamed)")
    p.add_argument("input")
    p.add_argument("output")
    _reader_options(p)
    _output_options(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("stats", help="distinct ids, skew and reuse distances of a trace")
    p.add_argument("input")
    _reader_options(p)
    p.add_argument("--table", action="append", help="only this table (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_stats)

    p = sub.add_parser("generate", help="write a seeded synthetic trace")
    p.add_argument("output")
    p.add_argument("--kind", choices=("zipf", "drift", "scan-mix"), default="zipf")
    p.add_argument("--requests", type=int, default=1_000_000, help="requests per table")
    p.add_argument("--universe", type=int, default=1_000_000, help="ids to draw from")
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent (0: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables", type=int, default=1)
    p.add_argument("--period", type=int, default=100_000, help="drift: requests per shift")
    p.add_argument("--step", type=int, default=1000, help="drift: ids the ranks move per shift")
    p.add_argument("--scan-fraction", type=float, default=0.1, help="scan-mix: share of scans")
    p.add_argument("--scan-length", type=int, default=10_000, help="scan-mix: ids per scan")
    _output_options(p)
    p.set_defaults(func=_generate)
    return trace


def main(argv: list[str] | None = None) -> int:
    """``tierstore trace ...`` on its own: ``main(["stats", "t.tst"])``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "trace":
        argv = ["trace", *argv]
    parser = Parser(prog="tierstore")  # the trace commands alone, as `tierstore trace` runs them
    add_trace_commands(parser.add_subparsers(dest="command"))
    return run_parser(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
