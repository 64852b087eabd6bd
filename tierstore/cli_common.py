"""What every command of the ``tierstore`` CLI shares (``cli.py``, ``replay/cli.py``,
``trace/cli.py``): one-line errors with exit status 2, argument types, and the checks made
before a long run.

Every error a user can cause ends a command with one line on stderr,
``tierstore COMMAND: error: WHAT``, and exit status 2, never a traceback: argparse's own errors
through :class:`Parser`, everything raised while a command runs through :func:`run_command`.
(A module of its own, below the commands, so that none of them imports another's parent.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .errors import InvalidInputError, TierstoreError

USAGE_ERROR = 2  # exit status of every error a user can cause (as argparse's own)
CLOSED_PIPE = 128 + 13  # the status of a command killed by SIGPIPE, as `yes | head` gives


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


def run_parser(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parses ``argv`` with ``parser`` (whose subcommands set ``func``) and runs the command
    through :func:`run_command`; returns the exit status (2 after a one-line error)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's --help (0) or its one-line error (2)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    if not hasattr(args, "func"):  # `tierstore trace` alone: argparse asks for its subcommand
        print(f"{parser.prog}: error: give a command: run, replay or trace", file=sys.stderr)
        return USAGE_ERROR
    return run_command(args.func, args, f"tierstore {args.command}")
