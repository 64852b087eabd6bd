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
    hits = {(r["policy"], float(r["cache_pct"])): float(r["hit_rate"]) for r in rows}
    assert hits[("lru", 100.0)] >= hits[("lru", 20.0)] >= hits[("lru", 1.0)]
    assert hits[("lru", 100.0)] > 0


def test_run_job_with_an_ssd_tier(tmp_path, capsys):
    argv = ["run", "--rows", "2000", "--dim", "4", "--bags", "32", "--pooling", "4", "--steps", "3",
            "--cache", "5,100", "--policies", "lru", "--ssd", "--out", str(tmp_path / "j"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "yes" in capsys.readouterr().out
