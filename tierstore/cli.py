"""The ``tierstore`` command: ``run`` (the main job), ``replay`` and ``trace`` (trace tools).

Every error a user can cause (a bad argument, a missing or malformed file, an unwritable output
path, a device that is not there) ends the command with one line on stderr,
``tierstore COMMAND: error: WHAT``, and exit status 2, never a traceback: argparse's own errors
through :class:`~tierstore.cli_common.Parser`, everything raised while a command runs through
:func:`~tierstore.cli_common.run_command` (``cli_common.py``: what every command shares).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from .cli_common import Parser, cuda_or_error, percentages, positive_int, run_parser, writable_path

RUN_ARGS_ENV = "TIERSTORE_RUN_ARGS"


# ---------------------------------------------------------------------------- run
def _add_run(sub) -> None:
    from .job import OPTIMIZERS, JobConfig

    d = JobConfig()
    p = sub.add_parser(
        "run",
        help="train on a synthetic trace at several cache sizes (the main job)",
        description="Trains a synthetic table on a Zipf trace at several cache sizes and "
        "policies; prints hit ratios and throughput, writes OUT.csv and OUT.png.",
        epilog=f"Options in the environment variable {RUN_ARGS_ENV} are read before the "
        f"command line's (which win), e.g. {RUN_ARGS_ENV}='--rows 20000 --steps 3' for a "
        "scaled-down run.",
    )
    p.add_argument("--rows", type=positive_int, default=d.rows, help="rows in the table")
    p.add_argument("--dim", type=positive_int, default=d.dim, help="embedding dim")
    p.add_argument("--bags", type=positive_int, default=d.bags, help="bags per batch")
    p.add_argument("--pooling", type=positive_int, default=d.pooling, help="ids per bag")
    p.add_argument(
        "--steps", type=positive_int, default=d.steps, help="training steps per configuration"
    )
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of the ids")
    p.add_argument(
        "--cache",
        type=percentages,
        default=d.cache_pcts,
        help="cache sizes in %% of rows, e.g. 1,5,20,100",
    )
    p.add_argument("--policies", default=",".join(d.policies), help="lru,lfu")
    p.add_argument("--ways", type=positive_int, default=d.ways, help="L1 associativity")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ssd", action="store_true", help="add an SSD tier (in a temporary directory)")
    p.add_argument("--out", default="tierstore-run", help="prefix of the .csv and .png written")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .job import JobConfig, run_job

    cfg = JobConfig(
        rows=args.rows,
        dim=args.dim,
        bags=args.bags,
        pooling=args.pooling,
        steps=args.steps,
        zipf=args.zipf,
        cache_pcts=args.cache,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        ways=args.ways,
        optimizer=args.optimizer,
        device=args.device,
        ssd=args.ssd,
    )
    cuda_or_error(cfg.device)
    writable_path(f"{args.out}.csv", "--out")
    writable_path(f"{args.out}.png", "--out")
    run_job(cfg, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(prog="tierstore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    from .replay.cli import add_replay_command
    from .trace.cli import add_trace_commands

    add_replay_command(sub)
    add_trace_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tierstore`` console script; ``run`` when no command is given.
    Returns the exit status (2 after a one-line error on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv or ["run"]
    if argv[0] == "run" and os.environ.get(RUN_ARGS_ENV):
        argv = ["run", *shlex.split(os.environ[RUN_ARGS_ENV]), *argv[1:]]
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
