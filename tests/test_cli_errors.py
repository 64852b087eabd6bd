"""Every error a user can cause on the command line is one line on stderr and exit status 2,
never a traceback, and comes before any work (``tierstore.cli_common``: ``Parser``, ``run_command``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierstore.cli import main
from tierstore.cli_common import CLOSED_PIPE
from tierstore.trace import write_trace, zipf_trace

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "z.tst"
    write_trace(path, [zipf_trace(3000, 500, 1.0, seed=5)])
    return path


def assert_one_line_error(capsys, argv, *needles):
    """``main(argv)`` returns 2, prints nothing on stdout and one line on stderr that names
    the command and contains every needle."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (argv, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tierstore"), lines[0]
    assert "error:" in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


REPLAY_ERRORS = [
    (["--cache-rows", "-5"], "-5"),
    (["--cache-rows", "ten"], "'ten'"),
    (["--cache-rows", "150%"], "150%"),
    (["--policies", "foo"], "foo"),
    (["--policies", ","], "unknown policies"),
    (["--batch", "0"], "--batch"),
    (["--batch", "x"], "--batch"),
    (["--ways", "0"], "--ways"),
    (["--host-rows", "-3"], "--host-rows"),
    (["--format", "foo"], "--format"),
    (["--format", "csv"], "z.tst"),  # a binary .tst read as CSV
    (["--delimiter", "tab"], "takes no options"),  # a csv option for a .tst trace
    (["--delimiter", "tabs"], "--delimiter"),
    (["--device", "tpu"], "--device"),
    (["--table", "C9"], "C9"),
    (["--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("extra, needle", REPLAY_ERRORS)
def test_replay_argument_errors(trace_file, capsys, extra, needle):
    assert_one_line_error(capsys, ["replay", str(trace_file), "--batch", "500", *extra], needle)


def test_replay_missing_and_malformed_traces(tmp_path, trace_file, capsys):
    assert_one_line_error(capsys, ["replay", str(tmp_path / "nope.tst")], "nope.tst", "no such")
    bad = tmp_path / "bad.tst"
    bad.write_bytes(b"NOTATRACE" + bytes(64))
    assert_one_line_error(capsys, ["replay", str(bad)], "bad.tst")
    # the second trace is checked before the first is replayed: nothing printed on stdout
    assert_one_line_error(capsys, ["replay", str(trace_file), str(tmp_path / "gone.tst")], "gone")
    unknown = tmp_path / "t.xyz"
    unknown.write_bytes(b"\x00\x01binary")
    assert_one_line_error(capsys, ["replay", str(unknown)], "t.xyz")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where CUDA is missing")
def test_device_cuda_without_cuda(trace_file, capsys):
    assert_one_line_error(capsys, ["replay", str(trace_file), "--device", "cuda"], "cuda")
    assert_one_line_error(capsys, ["run", "--device", "cuda", "--rows", "100"], "cuda")


def test_replay_wide_ways_on_cuda_refused(trace_file, capsys):
    """Any ways on the CPU; the CUDA kernels take 64 (or, without CUDA, the device is refused)."""
    line = assert_one_line_error(
        capsys, ["replay", str(trace_file), "--device", "cuda", "--ways", "128"], "cuda"
    )
    if HAS_CUDA:
        assert "64" in line


@pytest.mark.parametrize("which", ["--csv", "--plot"])
def test_unwritable_output_fails_before_the_replay(tmp_path, trace_file, capsys, which):
    for target in (tmp_path / "no-dir" / "x.out", tmp_path):  # a missing folder, a folder
        assert_one_line_error(capsys, ["replay", str(trace_file), which, str(target)], which)
    assert not (tmp_path / "no-dir").exists()


RUN_ERRORS = [
    (["--cache", "-5"], "--cache"),
    (["--cache", "0"], "--cache"),
    (["--cache", "101"], "--cache"),
    (["--cache", "a,b"], "--cache"),
    (["--policies", "foo"], "foo"),
    (["--rows", "0"], "--rows"),
    (["--steps", "-1"], "--steps"),
    (["--ways", "0"], "--ways"),
    (["--zipf", "-1"], "zipf"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--device", "tpu"], "tpu"),
]


@pytest.mark.parametrize("extra, needle", RUN_ERRORS)
def test_run_argument_errors(tmp_path, capsys, extra, needle):
    argv = ["run", "--rows", "100", "--steps", "1", "--out", str(tmp_path / "j"), *extra]
    assert_one_line_error(capsys, argv, needle)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_run_unwritable_out_fails_before_the_run(tmp_path, capsys):
    assert_one_line_error(capsys, ["run", "--out", str(tmp_path / "no-dir" / "j")], "--out")


def test_trace_errors_share_the_mechanism(tmp_path, capsys):
    assert_one_line_error(capsys, ["trace", "stats", str(tmp_path / "nope.csv")], "nope.csv")
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\n1\n2\n")
    assert_one_line_error(capsys, ["trace", "stats", str(tsv), "--delimiter", "tabs"], "tabs")
    assert_one_line_error(capsys, ["trace", "convert", str(tsv)], "output")
    assert_one_line_error(capsys, ["trace"], "convert")
    assert_one_line_error(capsys, ["nonsense"], "nonsense")


def test_named_delimiter_is_read(tmp_path, capsys):
    """``--delimiter tab`` (the case that once crashed) reads a tab-separated file."""
    tsv = tmp_path / "a.txt"
    tsv.write_text("table\tid\na\t7\nb\t9\na\t7\n")
    argv = ["trace", "stats", str(tsv), "--from", "csv", "--delimiter", "tab", "--json"]
    argv += ["--id-col", "id", "--table-col", "table"]
    assert main(argv) == 0
    assert '"requests": 2' in capsys.readouterr().out


def test_subprocess_error_is_one_line_with_status_2(tmp_path):
    """The real console path: status 2, one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (
        ["replay", str(tmp_path / "missing.tst")],
        ["replay", str(tmp_path / "missing.tst"), "--batch", "0"],
        ["run", "--cache", "-5"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "tierstore", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_closed_pipe_keeps_the_csv_and_prints_no_traceback(tmp_path, trace_file):
    """``tierstore replay ... --csv f | head -1``: the CSV is whole, stderr is empty."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "tierstore", "replay", str(trace_file), "--batch", "500"]
    cmd += ["--policies", "lru,opt", "--cache-rows", "5%,20%", "--csv", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    proc.stdout.close()  # the reader goes away before the table is printed
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == CLOSED_PIPE
    assert "Traceback" not in err and err == "", err
    assert len(out.read_text().splitlines()) == 1 + 4  # header, 2 policies x 2 sizes
