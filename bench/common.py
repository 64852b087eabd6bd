"""Helpers shared by the GPU benchmark scripts of ``bench/``: the table and batch they use, CUDA
event timing, the traces, the printed tables and the command line.

Every script prints one Markdown table per section. Its header names the GPU, the types, the
batch and the unit; each row is a figure beside the baseline measured in the same run and the
target it is judged against. ``--json`` writes the same rows to a file.

Importing this module puts the repository root on ``sys.path``, so that a script runs as
``python3 bench/<script>.py`` from anywhere in a checkout without installing the package.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The headline table: N rows x D fp32, B bags of L ids (issue 4's shape).
N, D, B, L = 10_000_000, 128, 65536, 32


# --- timing -------------------------------------------------------------------------------------


def dma_rates(mib: int = 256) -> dict[str, float]:
    """Pinned host <-> device copy rates in GB/s: each way alone, and both at once on two
    streams (their bytes together over the time both take)."""
    n = mib << 18  # fp32 elements
    host_a = torch.empty(n, pin_memory=True).uniform_()
    host_b = torch.empty(n, pin_memory=True)
    dev_a = torch.empty(n, device="cuda").uniform_()
    dev_b = torch.empty(n, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    nbytes = 4 * n

    def timed(fn) -> float:
        ts_ = []
        for _ in range(7):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts_.append(time.perf_counter() - t)
        return statistics.median(ts_[2:])

    def both():
        with torch.cuda.stream(s1):
            dev_b.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(dev_a, non_blocking=True)

    h2d = nbytes / timed(lambda: dev_b.copy_(host_a, non_blocking=True)) / 1e9
    d2h = nbytes / timed(lambda: host_b.copy_(dev_a, non_blocking=True)) / 1e9
    bidir = 2 * nbytes / timed(both) / 1e9
    return {"h2d": h2d, "d2h": d2h, "both": bidir}


def floor_ms(all_hits_ms: float, fills: float, wbs: float, rates: dict) -> float:
    """The larger of the all-in-L1 step and the step's moves at the measured DMA rates."""
    pcie = max(fills / rates["h2d"], wbs / rates["d2h"], (fills + wbs) / rates["both"]) / 1e6
    return max(all_hits_ms, pcie)


def t_ms_queued(fn: Callable[[], object], it: int = 20, reps: int = 5, warm: int = 3) -> float:
    """Milliseconds per call of ``fn`` called ``it`` times back to back (the host queues the next
    call's kernels while the device runs the last: launch latency is hidden where the device is
    the bottleneck), CUDA events around the ``it`` calls; the median of ``reps`` such runs."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(it):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / it)
    return float(np.median(times))


def t_ms(fn: Callable[[], object], it: int = 20, warm: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` started on an idle device (CUDA events), over
    ``it`` calls after ``warm`` calls."""
    return t_ms_queued(fn, 1, reps=it, warm=warm)


def wall_ms(fn: Callable[[], object], it: int = 20) -> float:
    """Host milliseconds per call of ``fn`` over ``it`` calls back to back (what a training loop
    sees), the device synchronised before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(it):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / it * 1e3


# --- traces -------------------------------------------------------------------------------------


def trace(dist: str, n: int, rows: int = N, seed: int = 0) -> torch.Tensor:
    """``n`` int64 ids on the GPU, ``"uniform"`` over ``rows`` or ``"zipf"``: Zipf(1.05) ranks as
    numpy draws them (ranks >= ``rows`` dropped), mapped through one fixed random permutation of
    the rows, so the hot rows are scattered and stay hot from batch to batch (the trace of
    ``shared/baseline/torch_step.py``)."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return torch.from_numpy(rng.integers(0, rows, n)).cuda()
    z = rng.zipf(1.05, 3 * n) - 1
    z = z[z < rows][:n]
    perm = torch.randperm(rows, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    return perm[torch.from_numpy(z).cuda()]


def free() -> None:
    """Returns the device memory of tensors no longer referenced to the driver (call it after
    ``del`` of a section's tables, so the next section starts with the whole card)."""
    gc.collect()
    torch.cuda.empty_cache()


def headline_table(optimizer):
    """The headline table on CUDA: ``N x D`` fp32, sum pooling, every row in L1, trained by
    ``optimizer`` (a tierstore rule)."""
    import tierstore as ts

    return ts.TieredEmbeddingBag(
        N, D, mode="sum", cache=ts.CacheConfig(rows=N), optimizer=optimizer, device="cuda"
    )


# --- the engine's internals that the benchmarks reach -------------------------------------------
# The benchmarks time parts of a step (a forward with the slots known, an inference lookup), so
# they call the store and the CUDA backend below the module. Those calls are gathered here: where
# the engine's internals change, this block changes, not every script.


def inference_lookup(store, ids: torch.Tensor):
    """A batch looked up as an inference forward looks it up: no backward will follow, so no
    transpose and no locks (``store.lookup(mode=BatchMode.EVAL)``)."""
    from tierstore.store import BatchMode

    return store.lookup(ids, mode=BatchMode.EVAL)


def forward_pooled(store, batch, offsets: torch.Tensor) -> torch.Tensor:
    """The CUDA forward of a looked-up ``batch``: (B, D) sums of its bags (``offsets`` (B + 1,))."""
    from tierstore import cuda

    return cuda.forward(store, batch, offsets, None, "sum")


def lookup_and_forward(store, ids: torch.Tensor, offsets: torch.Tensor) -> None:
    """One inference lookup, its forward and its release."""
    batch = inference_lookup(store, ids)
    forward_pooled(store, batch, offsets)
    store.release(batch)


# --- tables -------------------------------------------------------------------------------------


def gpu_line() -> str:
    """The GPU and the software versions, for the top of a run's output."""
    props = torch.cuda.get_device_properties(0)
    try:
        import cupy

        cp = f", cupy {cupy.__version__}"
    except ImportError:
        cp = ", no cupy"
    return f"GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}{cp}"


@dataclass
class Table:
    """One section's printed table. The header names the GPU, the types, the batch and the unit;
    ``row`` prints a row at once (a long run shows its figures as they come) and keeps it for
    the JSON file."""

    title: str
    types: str  # e.g. "fp32 rows of 128, int64 ids"
    batch: str  # e.g. "65536 bags x 32 ids"
    unit: str  # the unit of most rows; a row may name its own
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"\n### {self.title}\n", flush=True)
        print(f"GPU: {gpu}; types: {self.types}; batch: {self.batch}; unit: {self.unit}\n")
        print(f"| {'what':<62} | {'figure':>18} | {'baseline (same run)':<28} | {'target':<18} |")
        print(f"|{'-' * 64}|{'-' * 20}|{'-' * 30}|{'-' * 20}|", flush=True)

    def row(
        self, name: str, value: float, unit: str | None = None, baseline: str = "", target: str = ""
    ) -> dict:
        """Prints and keeps one figure."""
        unit = self.unit if unit is None else unit
        print(
            f"| {name:<62} | {value:>10.3f} {unit:<7} | {baseline:<28} | {target:<18} |", flush=True
        )
        entry = {"section": self.title, "name": name, "value": value, "unit": unit,
                 "baseline": baseline, "target": target}  # fmt: skip
        self.rows.append(entry)
        return entry


def note(text: str) -> None:
    """A line under a table (a count, a check), indented so that it reads as an aside."""
    print(f"  ({text})", flush=True)


# --- command line -------------------------------------------------------------------------------


Section = Callable[[bool], Table | list[Table] | None]


def run_sections(
    run_one: Callable[[str], Any],
    names: Sequence[str],
    json_path: str | None,
    meta: Callable[[], dict],
    after: Callable[[], None] | None = None,
) -> bool:
    """Runs each section ``run_one(name)`` in turn (it returns a :class:`Table`, a list of them
    or None); one that fails prints its traceback and the others still run; ``after`` (if
    given) runs after each, failed or not. Prints the time taken and writes ``meta()`` with the
    rows as ``results`` to ``json_path`` (if given). Returns whether every section passed."""
    rows: list[dict] = []
    failed = []
    t0 = time.time()
    for name in names:
        try:
            out = run_one(name)
        except Exception as e:  # keep the other sections' figures
            traceback.print_exc()
            print(f"section {name} failed: {e!r}", flush=True)
            failed.append(name)
            continue
        finally:
            if after is not None:
                after()
        for table in out if isinstance(out, list) else [out] if out else []:
            rows.extend(table.rows)
    print(f"\n{Path(sys.argv[0]).name} took {time.time() - t0:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**meta(), "results": rows}, f, indent=1)
    return not failed


def main(doc: str, sections: dict[str, Section]) -> None:
    """The command line of a benchmark script: ``--quick`` (fewer repetitions), ``--json PATH``
    (the figures as JSON), ``--only a,b`` (some sections). Runs each section in turn
    (:func:`run_sections`). Exits 1 if any failed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--only", default=",".join(sections), help="comma-separated sections")
    args = parser.parse_args()
    unknown = [s for s in args.only.split(",") if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(sections)}")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA device")
    print(gpu_line(), flush=True)
    passed = run_sections(
        lambda name: sections[name](args.quick),
        args.only.split(","),
        args.json,
        lambda: {"gpu": torch.cuda.get_device_name()},
        after=free,  # the section's tables are gone: the next one starts with the whole card
    )
    if not passed:
        sys.exit(1)
