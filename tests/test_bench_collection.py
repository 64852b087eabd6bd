"""bench/bench_collection.py on the CPU: its id draws, its table sizes and kernel count, its
command line, and one whole run at a tiny scale whose JSON holds every row with sane figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_collection as bc  # noqa: E402

# Each section's step rows, and the baseline of each speed-up row (label: the baseline's row)
CRITEO_BASELINES = {
    "torch + Adagrad": "26 nn.EmbeddingBag(sparse) + torch.optim.Adagrad",
    "torch + SGD": "26 nn.EmbeddingBag(sparse) + torch.optim.SGD",
    "26 TieredEmbeddingBag": "26 TieredEmbeddingBag, RowWiseAdagrad, L1 = 10 % each",
}
CRITEO_STEPS = {"collection, RowWiseAdagrad, L1 = 100 %", "collection, RowWiseAdagrad, L1 = 10 %"}
CRITEO_STEPS |= {"collection, RowWiseAdagrad, L1 = 10 %, GraphedStep"}
CRITEO_STEPS |= {"collection, RowWiseAdagrad, L1 = 100 %, GraphedStep"}
CRITEO_STEPS |= {"collection, RowWiseAdagrad, L1 = 10 %, prefetching(depth=1)"}
CRITEO_STEPS |= set(CRITEO_BASELINES.values())
MIXED_BASELINES = {
    "torch + Adagrad": "856 nn.EmbeddingBag(sparse) + torch.optim.Adagrad",
    "torch + SGD": "856 nn.EmbeddingBag(sparse) + torch.optim.SGD",
}
MIXED_STEPS = {"collection, RowWiseAdagrad, L1 = 10 %"} | set(MIXED_BASELINES.values())
SPEEDUP = "speed-up of collection L1 = 10 % over "


def test_zipf_columns_draw_each_table_in_its_range_with_zipf_frequencies():
    sizes = [3, 1, 500, 40]
    zipf = bc.ZipfColumns(sizes, torch.device("cpu"), seed=5)
    batch = 20_000
    x = zipf(batch)
    assert x.dtype == torch.int64 and x.shape == (len(sizes) * batch,)
    cols = x.view(len(sizes), batch)  # feature-major: table t's ids at row t
    order = zipf.order.split(sizes)
    for t, n in enumerate(sizes):
        assert 0 <= int(cols[t].min()) and int(cols[t].max()) < n
        assert sorted(order[t].tolist()) == list(range(n))  # a permutation of the rows
    # table 2's most popular row, order[2][0], comes up as often as Zipf(1.05) says (numpy's
    # sum as the reference), in this batch and the next (one fixed popularity order)
    p0 = 1.0 / np.sum(np.arange(1, 501, dtype=np.float64) ** -bc.ALPHA)
    sigma = math.sqrt(p0 * (1 - p0) / batch)
    for ids in (cols[2], zipf(batch).view(len(sizes), batch)[2]):
        freq = (ids == order[2][0]).double().mean().item()
        assert abs(freq - p0) < 6 * sigma
    one = cols[1]
    assert torch.equal(one, torch.zeros_like(one))  # a table of one row


def test_mixed_sizes_are_fixed_and_shaped_as_documented():
    sizes = bc.mixed_sizes()
    assert sizes == bc.mixed_sizes()
    assert len(sizes) == 856
    assert sizes.count(10_000_000) == 4
    rest = [n for n in sizes if n != 10_000_000]
    assert all(4 <= n < 2_000_000 for n in rest)
    assert sum(n < 100_000 for n in sizes) == 828
    assert sum(sizes) == 61_692_054  # as the script's docstring says
    assert sizes.index(10_000_000) > 0  # shuffled: the big tables are not all first
    assert [bc.scaled(n, 0.001) for n in (3, 1499, 10_000_000)] == [1, 1, 10_000]


def test_count_kernels_counts_device_kernels_alone():
    def ev(device, kind, name):
        return SimpleNamespace(device_type=device, activity_type=kind, name=name)

    events = [
        ev(DeviceType.CPU, "cpu_op", "aten::mm"),
        ev(DeviceType.CPU, "cuda_runtime", "cudaLaunchKernel"),
        ev(DeviceType.CUDA, "kernel", "probe_lru"),
        ev(DeviceType.CUDA, "kernel", "void at::native::vectorized_elementwise_kernel"),
        ev(DeviceType.CUDA, "gpu_memcpy", "Memcpy HtoD (Pinned -> Device)"),
        ev(DeviceType.CUDA, "gpu_memset", "Memset (Device)"),
        ev(DeviceType.CUDA, None, "forward_sum"),  # no activity type: told by its name
        ev(DeviceType.CUDA, None, "Memcpy DtoD (Device -> Device)"),
        ev(DeviceType.CUDA, 1, "Memset (Device)"),  # a type that is not a name: by its name
        ev(DeviceType.CUDA, 1, "update_rowwise_adagrad"),
    ]
    assert bc.count_kernels(events) == 4
    assert bc.count_kernels([]) == 0


def test_count_kernels_reads_real_profiler_events():
    """The attributes count_kernels reads are those torch.profiler's events have: a CPU-only
    profile holds ops and no kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.embedding_bag(torch.tensor([[1, 2]]), torch.randn(4, 8))
    events = prof.events()
    assert any(e.name == "aten::embedding_bag" for e in events)
    assert all(isinstance(e.activity_type, str) for e in events)  # kineto's names
    assert bc.count_kernels(events) == 0
    assert bc.launches_per_step(lambda x: None, torch.zeros(1), torch.device("cpu")) is None


@pytest.mark.parametrize(
    "argv", [["--scale", "0"], ["--only", "criteo"], ["--steps", "3"], ["--steps", "1,0"]]
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bc.main([*argv, "--device", "cpu"])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def _figures(rows: list[dict], section: str) -> dict[str, dict]:
    return {r["name"]: r for r in rows if r["section"].startswith(section)}


@pytest.mark.slow
def test_whole_run_at_a_tiny_scale_gives_every_row(tmp_path):
    """Both sections at scale 0.001 (26 and 856 tables of a few rows, batches of 66 and 8),
    one timed step per row; deprecated keywords are errors, as in the tests."""
    out = tmp_path / "collection.json"
    cmd = [
        sys.executable, "-W", "error:.*are deprecated; pass:DeprecationWarning",
        str(ROOT / "bench" / "bench_collection.py"), "--scale", "0.001", "--steps", "0,1",
        "--device", "cpu", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "device: CPU" in done.stdout
    assert "n/a |" in done.stdout  # the launches column, off CUDA
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and got["scale"] == 0.001
    for section, steps, baselines in (
        ("criteo26", CRITEO_STEPS, CRITEO_BASELINES),
        ("mixed856", MIXED_STEPS, MIXED_BASELINES),
    ):
        rows = _figures(got["results"], section)
        assert set(rows) == steps | {SPEEDUP + b for b in baselines}, section
        for name in steps:
            r = rows[name]
            assert r["unit"] == "ms" and math.isfinite(r["value"]) and r["value"] > 0, r
            assert r["launches"] is None  # n/a on the CPU
            assert r["made_s"] >= 0
            cached = "collection" in name or "TieredEmbeddingBag" in name
            assert (r["hit_ratio"] is not None) == cached, r
            assert not cached or 0 <= r["hit_ratio"] <= 1, r
            assert (r["moved_bytes"] is not None) == cached, r
            assert not cached or min(r["moved_bytes"]) >= 0, r
        # a tenth of the rows in L1, filled until it evicts: timed steps fill and write back
        for name in steps:
            if "L1 = 10 %" in name:
                r = rows[name]
                assert r["evicting"] and 0 < r["fill_steps"] <= 300, r
                assert min(r["moved_bytes"]) > 0, r
            elif "L1 = 100 %" in name:
                assert rows[name]["fill_steps"] == 0, name  # an L1 of every row: not filled
        ours = rows["collection, RowWiseAdagrad, L1 = 10 %"]["value"]
        if section == "criteo26":  # the fastest of the eager, graphed and pipelined steps
            for way in ("GraphedStep", "prefetching(depth=1)"):
                ours = min(ours, rows[f"collection, RowWiseAdagrad, L1 = 10 %, {way}"]["value"])
        for label, name in baselines.items():
            r = rows[SPEEDUP + label]
            assert r["unit"] == "x" and r["value"] == pytest.approx(rows[name]["value"] / ours), r
