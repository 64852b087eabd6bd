"""Speed and hit ratios of the fully associative references: OPT, LRU, S3-FIFO, W-TinyLFU.

    python bench/bench_replay_bounds.py                 # 10 M requests, as in bench/RESULTS.md
    python bench/bench_replay_bounds.py --requests 1000000 --alphas 1.0

For each Zipf exponent it generates a seeded trace (``--universe`` ids, shuffled), takes cache
sizes of 1, 5 and 20 % of the distinct ids, and times every reference on it: FA-LRU once for
all sizes (Mattson), the others once per size. Prints Markdown: requests per second, then the
hit ratios (hits / requests).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierstore.replay import compulsory_misses, lru_hits, opt_hits, policy_hits  # noqa: E402
from tierstore.replay.policies import POLICIES  # noqa: E402
from tierstore.trace.generate import zipf_trace  # noqa: E402


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000_000)
    ap.add_argument("--universe", type=int, default=2_000_000)
    ap.add_argument("--alphas", default="0.8,1.0,1.2")
    ap.add_argument("--pcts", default="1,5,20", help="cache sizes in %% of the distinct ids")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    pcts = [float(p) for p in args.pcts.split(",")]
    names = ["OPT", "FA-LRU", *POLICIES]

    print(
        f"machine: {_cpu()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"numpy {np.__version__}; load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"command: python bench/bench_replay_bounds.py --requests {args.requests} "
        f"--universe {args.universe} --alphas {args.alphas} --pcts {args.pcts} "
        f"--seed {args.seed}\n"
    )
    speed_rows, ratio_rows = [], []
    for alpha in alphas:
        t0 = time.perf_counter()
        ids = zipf_trace(args.requests, args.universe, alpha, seed=args.seed)
        gen_s = time.perf_counter() - t0
        n = ids.size
        distinct = compulsory_misses(ids)
        sizes = [max(1, round(distinct * p / 100)) for p in pcts]
        print(
            f"Zipf({alpha}): {n} requests, {distinct} distinct ids, sizes {sizes} "
            f"(generated in {gen_s:.1f} s)",
            flush=True,
        )
        hits: dict[str, list[int]] = {}
        secs: dict[str, list[float]] = {}

        t0 = time.perf_counter()
        hits["FA-LRU"] = lru_hits(ids, sizes).tolist()
        secs["FA-LRU"] = [time.perf_counter() - t0]  # all sizes in one pass
        hits["OPT"], secs["OPT"] = [], []
        for name in ["OPT", *POLICIES]:
            hits.setdefault(name, [])
            secs.setdefault(name, [])
            for c in sizes:
                t0 = time.perf_counter()
                if name == "OPT":
                    h = int(opt_hits(ids, [c], show=False)[0])
                else:
                    h = int(policy_hits(name, ids, [c], show=False)[0])
                secs[name].append(time.perf_counter() - t0)
                hits[name].append(h)
                print(f"  {name} C={c}: hit ratio {h / n:.4f}, {secs[name][-1]:.1f} s", flush=True)
        print(f"  FA-LRU all sizes: {secs['FA-LRU'][0]:.1f} s", flush=True)
        for name in names:
            ratio_rows.append((alpha, name, [h / n for h in hits[name]]))
            speed_rows.append((alpha, name, [n / s / 1e6 for s in secs[name]]))
        for name in POLICIES:  # the bound must hold
            assert all(o >= h for o, h in zip(hits["OPT"], hits[name])), name
        assert all(o >= h for o, h in zip(hits["OPT"], hits["FA-LRU"]))

    print(f"\nload average at end {os.getloadavg()[0]:.2f}\n")
    print("### Requests per second (millions)\n")
    print("| Zipf | reference | " + " | ".join(f"C = {p:g} %" for p in pcts) + " |")
    print("|---|---|" + "---|" * len(pcts))
    for alpha, name, mps in speed_rows:
        cells = (
            [f"{mps[0]:.2f} (all sizes, one pass)"] + [""] * (len(pcts) - 1)
            if name == "FA-LRU"
            else [f"{v:.2f}" for v in mps]
        )
        print(f"| {alpha} | {name} | " + " | ".join(cells) + " |")
    print("\n### Hit ratio (hits / requests)\n")
    print("| Zipf | reference | " + " | ".join(f"C = {p:g} %" for p in pcts) + " |")
    print("|---|---|" + "---|" * len(pcts))
    for alpha, name, r in ratio_rows:
        print(f"| {alpha} | {name} | " + " | ".join(f"{v:.4f}" for v in r) + " |")


if __name__ == "__main__":
    main()
