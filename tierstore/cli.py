"""The ``tierstore`` command: ``run`` (the main job), ``replay`` and ``trace`` (trace tools).

Every error a user can cause (a bad argument, a missing or malformed file, an unwritable output
path, a device that is not there) ends the command with one line on stderr,
``tierstore COMMAND: error: WHAT``, and exit status 2, never a traceback: argparse's own errors
through :class:`Parser`, everything raised while a command runs through :func:`run_command`.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from .errors import InvalidInputError, TierstoreError

USAGE_ERROR = 2  # exit status of every error a user can cause (as argparse's own)
CLOSED_PIPE = 128 + 13  # the status of a command killed by SIGPIPE, as `yes | head` gives
RUN_ARGS_ENV = "TIERSTORE_RUN_ARGS"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block) and exit
    status 2; its subparsers are of the same class."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def run_command(func, args: argparse.Namespace, prog: str) -> int:
    """Runs a subcommand's ``func(args)`` and returns its exit status. A tierstore error or an
    OS error (a missing file, a full disk) is printed as one line ``PROG: error: ...`` on
    stderr and gives status 2; a closed stdout (``| head``) ends the command quietly."""
    try:
        status = func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here at the latest
        return status
    except BrokenPipeError:
        return _closed_pipe()
    except (TierstoreError, OSError) as e:
        detail = str(e)
        if isinstance(e, OSError) and not isinstance(e, TierstoreError) and e.strerror:
            detail = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        print(f"{prog}: error: {_one_line(detail)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + 2


def _closed_pipe() -> int:
    """The reader of stdout went away: point stdout at /dev/null so that Python's flush at exit
    cannot raise again, and end with SIGPIPE's status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured): nothing to redirect
        pass
    return CLOSED_PIPE


# ----------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def percentages(text: str) -> tuple[float, ...]:
    """An argparse type: a comma list of percentages in (0, 100], ``%`` optional."""
    values = []
    for part in text.split(","):
        try:
            value = float(part.strip().rstrip("%"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a percentage") from None
        if not (0 < value <= 100) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"percentages must lie in (0, 100], got {part!r}")
        values.append(value)
    return tuple(values)


def writable_path(path: str | os.PathLike, what: str) -> None:
    """Raises InvalidInputError unless a file can be written at ``path`` (checked before a
    long run, so that its results are not lost at the end). Leaves no file behind."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InvalidInputError(f"{what} {path}: is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise InvalidInputError(f"{what} {path}: cannot write there ({e.strerror})") from None
    if not existed:
        os.remove(path)


def cuda_or_error(device: str | None) -> None:
    """Raises InvalidInputError if ``device`` names CUDA and no CUDA device (with CuPy) is
    usable, or is no device torch knows."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device: {device!r} is not a device (cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device: {device!r} is not a device (cpu or cuda)")
    if dev.type == "cuda":
        from . import cuda

        if not cuda.available():
            raise InvalidInputError(f"--device {device}: no CUDA device with CuPy is usable here")


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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's --help (0) or its one-line error (2)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    if not hasattr(args, "func"):  # `tierstore trace` alone: argparse asks for its subcommand
        print(f"{parser.prog}: error: give a command: run, replay or trace", file=sys.stderr)
        return USAGE_ERROR
    return run_command(args.func, args, f"tierstore {args.command}")


if __name__ == "__main__":
    sys.exit(main())
