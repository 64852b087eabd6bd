"""The main job (``tierstore run``) on a tiny table: table, CSV, plot and the transparency check."""

from __future__ import annotations

import csv

from tierstore.cli import main


def test_run_job_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "job"
    argv = ["run", "--rows", "3000", "--dim", "8", "--bags", "64", "--pooling", "8", "--steps", "4",
            "--cache", "1,20,100", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "identical across every cache size and policy: yes" in text
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert [(r["policy"], float(r["cache_pct"])) for r in rows] == [
        (p, c) for p in ("lru", "lfu") for c in (1.0, 20.0, 100.0)
    ]
    hits = {(r["policy"], float(r["cache_pct"])): float(r["hit_ratio"]) for r in rows}
    assert hits[("lru", 100.0)] >= hits[("lru", 20.0)] >= hits[("lru", 1.0)]
    assert hits[("lru", 100.0)] > 0
    # the rows L1 holds: whole sets of 32 ways (1 % of 3000 asks 30: one set of 30 ways;
    # 20 % asks 600: 19 sets of 32 = 608 rows)
    assert [int(r["cache_rows"]) for r in rows[:3]] == [30, 608, 3008]
    for r in rows:  # the request hit ratio counts repeats inside a batch, the unique one not
        assert float(r["hit_ratio"]) >= float(r["unique_hit_ratio"])


def test_run_job_with_an_ssd_tier(tmp_path, capsys):
    argv = ["run", "--rows", "2000", "--dim", "4", "--bags", "32", "--pooling", "4", "--steps", "3",
            "--cache", "5,100", "--policies", "lru", "--ssd", "--out", str(tmp_path / "j"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "yes" in capsys.readouterr().out


def test_run_reads_options_from_the_environment(tmp_path, capsys, monkeypatch):
    """TIERSTORE_RUN_ARGS scales the job down (the README's `tierstore run` in its test); the
    command line wins over it."""
    monkeypatch.setenv(
        "TIERSTORE_RUN_ARGS",
        "--rows 1000 --dim 4 --bags 16 --pooling 4 "
        "--steps 2 --cache 50 --policies lfu --device cpu --rows 999999999",
    )
    assert main(["run", "--rows", "500", "--out", str(tmp_path / "e")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert [(r["policy"], r["cache_rows"]) for r in rows] == [("lfu", "256")]  # 8 sets x 32
    assert "500 rows x 4 fp32" in capsys.readouterr().out
