"""Where a collection's training step goes (issue 27): the 26 Criteo tables of
``bench_collection.py`` in one collection, a few warm-up steps, then one step under
``torch.profiler`` (the CUDA time by kernel and the host time by op) and its wall time;
``--graphed``: the step through ``ts.GraphedStep``, as ``bench_collection.py``'s graphed row.
With a partial L1, the cache is first filled until a step writes back half what it fills.

    python3 bench/exp/profile_collection.py [--scale 1.0] [--l1 0.1] [--graphed]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_collection as bc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--l1", type=float, default=0.1)
    parser.add_argument("--graphed", action="store_true", help="the step as a GraphedStep")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [bc.scaled(n, args.scale) for n in bc.CRITEO_ROWS]
    batch = bc.scaled(bc.CRITEO_BATCH, args.scale)
    run = bc.collection(sizes, args.l1, batch, device, graphed=args.graphed)
    bench = bc.Run(device, warm=10, timed=5, scale=args.scale)  # 16 batches, fresh ones to fill
    batches = bench.batches(sizes, batch)
    if args.l1 < 1:  # the steady state: L1 full, evicting (bench_collection.py's fill)
        filled, evicting = bench.fill(run)
        print(f"{filled} fill steps; L1 {'writing back' if evicting else 'NOT writing back yet'}")
    for x in batches[:10]:
        run.step(x)
    run.reset()
    walls = []
    for x in batches[10:15]:
        bc.sync(device)
        t = time.perf_counter()
        run.step(x)
        bc.sync(device)
        walls.append(1e3 * (time.perf_counter() - t))
    fills, wbs = (b / len(walls) / 1e6 for b in run.moved())
    print(f"a step: {statistics.median(walls):.2f} ms wall (median of 5, synchronised); "
          f"{fills:.1f} MB filled, {wbs:.1f} MB written back a step")  # fmt: skip
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run.step(batches[15])
        bc.sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                    max_name_column_width=60))  # fmt: skip
    # each launch of the row moves on its own: the writebacks' launch, then the fills'
    moves = [e for e in prof.events() if e.name.startswith("move_rows")]
    for e in moves:
        print(f"{e.name}: {e.device_time_total:.1f} us")


if __name__ == "__main__":
    main()
