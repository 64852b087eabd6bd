"""Replay speed and hit ratios of the engine's set-associative LRU and LFU (batch by batch).

    python bench/bench_replay_engine.py [--device cuda] [--requests 10000000] [--batch 65536]
        [--torch-step]

Same traces as ``bench_replay_bounds.py`` (Zipf over 2 M ids, seed 0), so the hit ratios sit
beside OPT's and the other references' in bench/RESULTS.md. Prints one row per (alpha, policy,
size): hit ratio per request and per unique lookup, and requests per second (best of
``--repeat`` runs: the 2-core machine is often shared). On the CPU the cache steps with its
compiled twin where numba is installed; ``--torch-step`` forces the torch step (cache.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tierstore

from tierstore import cache  # noqa: E402
from tierstore.replay.engine import replay_engine  # noqa: E402
from tierstore.report import format_table  # noqa: E402
from tierstore.trace import zipf_trace  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=10_000_000)
    p.add_argument("--universe", type=int, default=2_000_000)
    p.add_argument("--alphas", default="0.8,1.0,1.2")
    p.add_argument("--pcts", default="1,5,20")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--ways", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--torch-step", action="store_true", help="the torch step, not the compiled")
    args = p.parse_args()
    cache.COMPILED_STEP = not args.torch_step
    rows = []
    for alpha in map(float, args.alphas.split(",")):
        ids = zipf_trace(args.requests, args.universe, alpha, seed=0)
        distinct = int(np.unique(ids).size)
        batches = [
            torch.from_numpy(ids[a : a + args.batch]).to(args.device)
            for a in range(0, ids.size, args.batch)
        ]
        for policy in ("lru", "lfu"):
            for pct in map(float, args.pcts.split(",")):
                size = max(1, int(np.ceil(distinct * pct / 100)))
                runs = [
                    replay_engine(
                        batches,
                        size,
                        policy,
                        args.ways,
                        device=args.device,
                        num_rows=args.universe,
                    )
                    for _ in range(args.repeat)
                ]
                best = min(runs, key=lambda r: r.seconds)
                rows.append({
                    "zipf": alpha, "policy": f"{policy} ({args.ways}-way)", "pct": pct, "cache_rows": size,
                    "hit_ratio": round(best.hit_ratio, 4), "unique_hit_ratio": round(best.unique_hit_ratio, 4),
                    "Mreq_per_s": round(best.requests / best.seconds / 1e6, 2),
                })  # fmt: skip
    step = "torch" if args.torch_step else "compiled"
    dev = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads, {step} step"
    )
    title = f"engine replay: {args.requests} requests/trace, batch {args.batch}, {dev}"
    print(format_table(rows, list(rows[0]), title))


if __name__ == "__main__":
    main()
