"""Research: where a steady-state training step with a partial L1 goes (issue 23): the
``bench_steady.py`` table (20 M x 128, Zipf(1.05) batches of 65 536 x 32 ids, RowWiseAdagrad)
with L1 at ``--l1`` of the rows, warm-up steps, then three steps under ``torch.profiler``: the
device time by kernel and the host time by op, after the mean wall time per step. With
``--depth D`` the loop runs under ``ts.prefetching(depth=D)`` (the pipelined loop); with
``--trace PATH`` the profiled steps are also written as a Chrome trace (chrome://tracing or
Perfetto), whose stream rows show what runs beside what.

    python3 bench/exp/profile_steady.py [--l1 0.2] [--rows 20000000] [--depth 1]
        [--trace $OUT/steady.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_steady as bs  # noqa: E402

import tierstore as ts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, default=0.2)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--uniform", action="store_true", help="uniform ids, not Zipf")
    parser.add_argument("--depth", type=int, default=0, help="prefetching depth (0: plain)")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    emb = ts.TieredEmbeddingBag(
        args.rows, bs.D, mode="sum", cache=ts.CacheConfig(rows=int(args.l1 * args.rows)),
        optimizer=ts.RowWiseAdagrad(lr=0.01), device="cuda",
    )  # fmt: skip
    if args.uniform:
        batches = [torch.randint(0, args.rows, (bs.B, bs.L), device="cuda") for _ in range(36)]
    else:
        zipf = bs.ZipfBatches(args.rows)
        batches = [zipf() for _ in range(36)]
    g = torch.randn(bs.B, bs.D, device="cuda")

    def train(x):
        emb(x).backward(g)

    loop = "plain" if not args.depth else f"prefetching(depth={args.depth})"
    if args.depth:
        ms = bs.pipelined_ms(emb, train, batches[:33], 30, args.depth)
    else:
        ms = bs.stream_ms(train, batches[:33], 30)
    print(f"L1 {args.l1:.0%}, {loop}: {ms:.2f} ms a step (mean of 3 after 30 warm-up)")
    last = batches[33:]
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for x in ts.prefetching(last, emb, depth=args.depth) if args.depth else last:
            train(x)
        torch.cuda.synchronize()
    t = time.perf_counter()
    trace = args.trace or str(Path(tempfile.mkdtemp()) / "steady.json")
    prof.export_chrome_trace(trace)
    print_streams(trace)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                    max_name_column_width=70))  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                    max_name_column_width=70))  # fmt: skip
    print(f"(tables printed in {time.perf_counter() - t:.1f} s)")


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint intervals covering ``spans`` (start, end), ascending."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def print_streams(trace: str) -> None:
    """From a Chrome trace of the profiled steps: each stream's busy time (its kernels and
    copies, overlaps merged), how much of it ran beside another stream's, and its five
    longest kernels by total time, so that one sees whether the prefetch stream's moves
    overlapped the compute stream's forward and backward."""
    events = json.load(open(trace))["traceEvents"]
    work = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not work:
        print("no device events in the trace")
        return
    by_stream: dict[int, list[dict]] = {}
    for e in work:
        by_stream.setdefault(e["args"].get("stream", e.get("tid")), []).append(e)
    spans = {s: _union([(e["ts"], e["ts"] + e["dur"]) for e in es]) for s, es in by_stream.items()}
    first = min(e["ts"] for e in work)
    last = max(e["ts"] + e["dur"] for e in work)
    print(
        f"device span of the profiled steps: {(last - first) / 1e3:.2f} ms; busy "
        f"(any stream) {_length(_union([x for v in spans.values() for x in v])) / 1e3:.2f} ms"
    )
    for s, es in sorted(by_stream.items(), key=lambda kv: -_length(spans[kv[0]])):
        others = _union([x for o, v in spans.items() if o != s for x in v])
        beside = sum(max(0.0, min(b, d) - max(a, c)) for a, b in spans[s] for c, d in others)
        totals: dict[str, list[float]] = {}
        for e in es:
            totals.setdefault(e["name"][:60], []).append(e["dur"])
        top = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:5]
        print(
            f"stream {s}: {len(es)} events, busy {_length(spans[s]) / 1e3:.2f} ms, of which "
            f"{beside / 1e3:.2f} ms beside other streams' work"
        )
        for name, d in top:
            print(f"    {sum(d) / 1e3:8.3f} ms  {len(d):4d} x  {name}")


if __name__ == "__main__":
    main()
