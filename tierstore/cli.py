"""The ``tierstore`` command: ``run`` (the main job), ``replay`` and ``trace`` (trace tools)."""

from __future__ import annotations

import argparse
import sys


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x.rstrip("%")) for x in text.split(","))


def _add_run(sub) -> None:
    from .job import OPTIMIZERS, JobConfig

    d = JobConfig()
    p = sub.add_parser(
        "run", help="train on a synthetic trace at several cache sizes (the main job)"
    )
    p.add_argument("--rows", type=int, default=d.rows, help="rows in the table")
    p.add_argument("--dim", type=int, default=d.dim, help="embedding dim")
    p.add_argument("--bags", type=int, default=d.bags, help="bags per batch")
    p.add_argument("--pooling", type=int, default=d.pooling, help="ids per bag")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per configuration")
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of the ids")
    p.add_argument(
        "--cache",
        type=_floats,
        default=d.cache_pcts,
        help="cache sizes in %% of rows, e.g. 1,5,20,100",
    )
    p.add_argument("--policies", default=",".join(d.policies), help="lru,lfu")
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
        policies=tuple(args.policies.split(",")),
        optimizer=args.optimizer,
        device=args.device,
        ssd=args.ssd,
    )
    run_job(cfg, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tierstore", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    try:
        from .replay.cli import add_replay_command

        add_replay_command(sub)
    except ImportError:
        pass
    try:
        from .trace.cli import add_trace_commands

        add_trace_commands(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tierstore`` console script; ``run`` when no command is given."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["run"])
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
