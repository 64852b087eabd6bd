"""Many tables: one ``TieredEmbeddingBagCollection`` against one module per table (issue 27,
"How fast"), side by side in one run on the same ids.

Every table is ``dim 64`` fp32 and sum-pooled; every sample has one id per table (one bag of one
id per feature); each step draws a fresh batch of Zipf(1.05) ids per table from one fixed
popularity order per table (a random permutation of its rows: the hot rows are scattered and
stay hot from step to step, as ``bench_steady.py`` draws them). A step is the forward, the
backward of a fixed random gradient of the ``(B, T x 64)`` output, and the optimizer's update.
Before a model with a partial L1 is timed, it is stepped on fresh batches until a step writes
back at least half the bytes it fills (at most ``--fill-steps``): its cache is full and evicts,
the steady state the targets are about (at ``--scale 1`` the 26 tables' 3.4 M distinct rows of
an L1 of 10 % are first reached after about 50 steps; without this fill, the warm-up steps alone
left it filling, not evicting).
The figure is the median host wall time of a step, the device synchronised before and after
each step, after warm-up steps; launches per step are the CUDA kernels ``torch.profiler``
records in one more step (CuPy's kernels included: CUPTI sees every kernel; copies and memsets
not counted), ``n/a`` on the CPU.

    python3 bench/bench_collection.py [--quick] [--scale 1.0] [--device cuda|cpu]
                                      [--steps WARM,TIMED] [--fill-steps 300] [--json out.json]
                                      [--only criteo26,mixed856]

- ``criteo26``: 26 tables with the Criteo Kaggle cardinalities (3 to 10.1 M rows, 33.8 M rows
  in all), batch 65 536. Rows: the collection trained by ``ts.RowWiseAdagrad`` with L1 = 100 %
  and 10 % of all rows, each also through ``ts.GraphedStep``, and at 10 % under
  ``ts.prefetching(depth=1)``; 26 ``ts.TieredEmbeddingBag`` (RowWiseAdagrad, L1 = 10 % of
  each table); 26 ``nn.EmbeddingBag(sparse=True)`` whole on the device with
  ``torch.optim.Adagrad`` and with ``torch.optim.SGD``. Targets (issue 27): the collection at
  L1 = 10 % (the fastest of eager, graphed and pipelined) at least 5x faster than the torch
  tables with Adagrad, at least 1.5x faster than with SGD. On CUDA a last row gives the floor
  of the L1 = 10 % step: the larger of the L1 = 100 % step and its row moves at the DMA rates
  measured in the same run.
- ``mixed856``: 856 tables of mixed sizes (:func:`mixed_sizes`: 4 of 10 M rows, 24 of 100 k
  to 2 M, 828 of 4 to 100 k; about 62 M rows), batch 8 192 (the 856 pooled outputs of 65 536
  samples would take 14 GB, their gradient as much again). Rows: the collection at L1 = 10 %
  against 856 torch tables with Adagrad and with SGD; the collection's launches per step at
  856 tables beside those at 26 (target, issue 27: the same count).

``--scale F`` multiplies every cardinality and both batches (each at least 1), so that
``--quick --scale 0.001 --device cpu`` runs in seconds (``tests/test_bench_collection.py``).
At ``--scale 1`` the largest row, 856 torch tables with Adagrad, holds 32 GB on the device
(62 M x 64 fp32 weights and as much Adagrad state); a tierstore row holds its whole tables in
pinned host memory (L2: 16 GB for mixed856) and its L1 on the device. Each row's models are
freed (device and pinned memory) before the next row is built.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import common
import numpy as np
import torch
from common import Table, note

import tierstore as ts

# Criteo Kaggle's 26 categorical columns: distinct values of each (33,762,577 rows in all)
CRITEO_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
D = 64  # every table's dim
CRITEO_BATCH = 65_536
MIXED_BATCH = 8_192
ALPHA = 1.05  # the Zipf exponent of every table's ids
LR = 0.01
L1_SHARE = 0.1  # the partial L1 of the targets: 10 % of the rows
# launches per step of the 26-table collection at L1 = 10 %, once criteo26 has run (mixed856
# sets them beside its own)
_launches_26: dict[str, int | None] = {}


# --- tables and ids -----------------------------------------------------------------------------


def mixed_sizes(seed: int = 856) -> list[int]:
    """The 856 tables of ``mixed856``, in a fixed order: 4 of 10 M rows, 24 log-uniform in
    [100 k, 2 M) and 828 log-uniform in [4, 100 k), shuffled together (numpy's PCG64 seeded with
    ``seed``: the same list on every machine). 61,692,054 rows."""
    rng = np.random.default_rng(seed)
    mid = np.exp(rng.uniform(math.log(100_000), math.log(2_000_000), 24))
    small = np.exp(rng.uniform(math.log(4), math.log(100_000), 828))
    sizes = [10_000_000] * 4 + [int(n) for n in mid] + [int(n) for n in small]
    return [sizes[i] for i in rng.permutation(len(sizes))]


def scaled(n: int, scale: float) -> int:
    """``n`` times ``scale``, at least 1."""
    return max(1, round(n * scale))


class ZipfColumns:
    """Fresh batches of one Zipf(``alpha``) id per table per sample: ``(T * B,)`` int64
    table-local ids, feature-major (table 0's ``B`` ids, then table 1's, ...), as a
    ``KeyedJaggedTensor``'s values. Table ``t``'s rank ``r`` (0 the most popular) is its row
    ``order_t[r]``, ``order_t`` one fixed random permutation of its rows.

    One ``searchsorted`` draws a whole batch: table ``t``'s cumulative distribution is stored
    shifted into ``(t, t + 1]`` and its uniform draws likewise, so that every table is
    sampled by one op whatever the table count (float64 keeps the tail's ranks apart: the
    rarest of 10 M rows has probability ~3e-9, the spacing at 856 is ~1e-13).

    Args:
        sizes: rows of each table.
        device: where the distributions live and the batches are drawn.
        seed: of the popularity orders and the draws.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device, seed: int = 0):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        cdfs, orders = [], []
        for t, rows in enumerate(sizes):
            w = torch.arange(1, rows + 1, device=device, dtype=torch.float64).pow_(-ALPHA)
            cdf = w.cumsum_(0)
            cdfs.append(cdf.div_(cdf[-1].item()).add_(t))
            orders.append(torch.randperm(rows, device=device, generator=self.gen))
        self.cdf, self.order = torch.cat(cdfs), torch.cat(orders)  # (sum of rows,)
        size = torch.tensor(list(sizes), dtype=torch.int64, device=device)
        self.first = size.cumsum(0) - size  # (T,) where each table starts in cdf and order
        self.last = self.first + size - 1

    def __call__(self, batch: int) -> torch.Tensor:
        """One batch: ``(T * batch,)`` int64, table ``t``'s ids at ``[t * batch, (t+1) * batch)``."""
        tables = self.first.numel()
        t = torch.arange(tables, device=self.device).repeat_interleave(batch)
        u = torch.rand(t.numel(), device=self.device, dtype=torch.float64, generator=self.gen)
        at = torch.searchsorted(self.cdf, u.add_(t))
        # a draw on a table's boundary (rounding) stays in its own table
        at = torch.minimum(torch.maximum(at, self.first[t]), self.last[t])
        return self.order[at]


# --- timing and launches ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_ms(
    step: Callable[[torch.Tensor], None],
    batches: Sequence[torch.Tensor],
    warm: int,
    device: torch.device,
    after_warm: Callable[[], None] | None = None,
) -> float:
    """Median host wall milliseconds of ``step`` over ``batches[warm:]`` (one batch a step, the
    device synchronised before and after each), after ``warm`` warm-up steps on the first
    batches; ``after_warm`` is called between the two (a counter reset)."""
    times = []
    for i, x in enumerate(batches):
        if i == warm and after_warm is not None:
            after_warm()
        sync(device)
        t0 = time.perf_counter()
        step(x)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def count_kernels(events: Iterable) -> int:
    """Kernels among ``torch.profiler`` events: the CUDA device's events that are neither copies
    nor memsets (by kineto's activity type where the event has one, else by name)."""
    from torch.autograd import DeviceType

    n = 0
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        kind = getattr(e, "activity_type", None)  # kineto's name: "kernel", "gpu_memcpy", ...
        if isinstance(kind, str) and kind:
            n += "kernel" in kind.lower()
        else:
            n += not e.name.startswith(("Memcpy", "Memset"))
    return n


def launches_per_step(step: Callable[[torch.Tensor], None], x: torch.Tensor, device) -> int | None:
    """CUDA kernels of one ``step(x)`` under ``torch.profiler``; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(x)
            sync(device)
    except RuntimeError as e:  # no CUPTI: the step time still counts
        note(f"launches not counted: torch.profiler failed: {e}")
        return None
    return count_kernels(prof.events())


def free(device: torch.device) -> None:
    """Returns what the last row's models held (call after they are unreferenced): device
    memory, and on CUDA the pinned host memory of their L2 (torch caches both)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)
        if empty_host_cache is not None:  # torch >= 2.9
            empty_host_cache()


# --- the models ---------------------------------------------------------------------------------


class Runner(NamedTuple):
    """A model's training step on one batch (the ids of :class:`ZipfColumns`), and its cache
    counters where it has a cache (``reset`` zeroes them, ``hit_ratio`` reads them)."""

    step: Callable[[torch.Tensor], None]
    reset: Callable[[], None] | None = None
    hit_ratio: Callable[[], float] | None = None
    # bytes filled into L1 and written back from it since the last reset
    moved: Callable[[], tuple[int, int]] | None = None
    # the step on any batch, outside a pipeline (None: ``step``), for filling the cache
    plain: Callable[[torch.Tensor], None] | None = None


class Jagged(NamedTuple):
    """The methods of TorchRec's ``KeyedJaggedTensor`` that a collection reads (torchrec is not
    a dependency of the benchmark)."""

    feature_keys: list[str]
    ids: torch.Tensor
    bag_lengths: torch.Tensor

    def keys(self) -> list[str]:
        return self.feature_keys

    def values(self) -> torch.Tensor:
        return self.ids

    def lengths(self) -> torch.Tensor:
        return self.bag_lengths


def collection(
    sizes: Sequence[int],
    l1_share: float,
    batch: int,
    device,
    graphed: bool = False,
    prefetched: Sequence[torch.Tensor] | None = None,
) -> Runner:
    """One ``TieredEmbeddingBagCollection`` of every table (one group: one dim, one optimizer),
    L1 ``l1_share`` of all rows, trained by ``ts.RowWiseAdagrad``; fed as a
    ``KeyedJaggedTensor``'s keys, values and lengths. ``graphed``: the step through
    ``ts.GraphedStep`` (captured at its second call; eager without CUDA). ``prefetched``: every
    batch the runner will be given, in order, which it then takes from
    ``ts.prefetching(..., depth=1)``, so that the next batch's cache step overlaps this one's
    compute (its step refuses any other batch)."""
    tables = [
        ts.TableConfig(name=f"t{k}", embedding_dim=D, num_embeddings=n) for k, n in enumerate(sizes)
    ]
    col = ts.TieredEmbeddingBagCollection(
        tables,
        cache=ts.CacheConfig(rows=max(1, round(l1_share * sum(sizes)))),
        optimizer=ts.RowWiseAdagrad(lr=LR),
        device=device,
    )
    keys = col.feature_keys
    lengths = torch.ones(len(sizes) * batch, dtype=torch.int64, device=device)
    grad = torch.randn(batch, len(sizes) * D, device=device)

    def step(values: torch.Tensor, lengths: torch.Tensor) -> None:
        col(keys=keys, values=values, lengths=lengths).values().backward(grad)

    if prefetched is None:
        # lengths is an input too: a graphed step checks each replay's batch, all of its tensors
        run = ts.GraphedStep(step) if graphed else step
    else:
        ahead = ts.prefetching([Jagged(keys, v, lengths) for v in prefetched], col, depth=1)

        def run(values: torch.Tensor, lengths: torch.Tensor) -> None:
            x = next(ahead)
            if x.ids is not values:
                raise RuntimeError("a prefetched collection is stepped on its batches in order")
            col(x).values().backward(grad)

    def moved() -> tuple[int, int]:
        overall = col.stats().overall
        return overall.bytes_l2_to_l1, overall.bytes_l1_to_l2

    return Runner(
        lambda v: run(v, lengths),
        col.reset_stats,
        lambda: col.stats().unique_hit_ratio,
        moved,
        lambda v: step(v, lengths),
    )


def tiered_tables(sizes: Sequence[int], l1_share: float, batch: int, device) -> Runner:
    """One ``ts.TieredEmbeddingBag`` per table, each with L1 ``l1_share`` of its rows, trained
    by ``ts.RowWiseAdagrad``; their outputs concatenated (as a model consumes them)."""
    mods = [
        ts.TieredEmbeddingBag(
            n,
            D,
            mode="sum",
            cache=ts.CacheConfig(rows=max(1, round(l1_share * n))),
            optimizer=ts.RowWiseAdagrad(lr=LR),
            device=device,
        )
        for n in sizes
    ]
    grad = torch.randn(batch, len(sizes) * D, device=device)

    def step(values: torch.Tensor) -> None:
        cols = values.view(len(mods), batch, 1)  # table t's bags of one id
        torch.cat([m(cols[t]) for t, m in enumerate(mods)], 1).backward(grad)

    def hit_ratio() -> float:
        every = [m.stats() for m in mods]
        return sum(s.hits for s in every) / max(1, sum(s.unique for s in every))

    def reset() -> None:
        for m in mods:
            m.reset_stats()

    def moved() -> tuple[int, int]:
        every = [m.stats() for m in mods]
        return sum(s.bytes_l2_to_l1 for s in every), sum(s.bytes_l1_to_l2 for s in every)

    return Runner(step, reset, hit_ratio, moved)


def torch_tables(sizes: Sequence[int], batch: int, device, optimizer: str) -> Runner:
    """One ``nn.EmbeddingBag(sparse=True)`` per table, whole on the device, trained by
    ``torch.optim.Adagrad`` or ``torch.optim.SGD``; outputs concatenated."""
    embs = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(n, D, mode="sum", sparse=True, device=device) for n in sizes
    )
    opt = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[optimizer]
    optim = opt(embs.parameters(), lr=LR)
    grad = torch.randn(batch, len(sizes) * D, device=device)

    def step(values: torch.Tensor) -> None:
        optim.zero_grad(set_to_none=True)
        cols = values.view(len(embs), batch, 1)
        torch.cat([e(cols[t]) for t, e in enumerate(embs)], 1).backward(grad)
        optim.step()

    return Runner(step)


# --- the printed table --------------------------------------------------------------------------


def device_line(device: torch.device) -> str:
    """The device and the software versions, for the top of a run's output."""
    if device.type == "cuda":
        return common.gpu_line()
    return f"CPU: {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


@dataclass
class StepTable(Table):
    """``common.Table`` with the device named in the header (CPU or GPU) and a column of kernel
    launches per step (``n/a`` off CUDA); each JSON entry has ``launches`` (an int or None)."""

    device: str = "CPU"

    def __post_init__(self) -> None:
        print(f"\n### {self.title}\n", flush=True)
        print(
            f"device: {self.device}; types: {self.types}; batch: {self.batch}; unit: {self.unit}\n"
        )
        print(
            f"| {'what':<62} | {'figure':>18} | {'launches/step':>13} | "
            f"{'baseline (same run)':<28} | {'target':<18} |"
        )
        print(f"|{'-' * 64}|{'-' * 20}|{'-' * 15}|{'-' * 30}|{'-' * 20}|", flush=True)

    def row(
        self,
        name: str,
        value: float,
        unit: str | None = None,
        baseline: str = "",
        target: str = "",
        launches: int | None = None,
    ) -> dict:
        """Prints and keeps one figure; ``launches`` (None) shows as ``n/a`` in a row of
        milliseconds (a step off CUDA), blank in the others."""
        unit = self.unit if unit is None else unit
        shown = str(launches) if launches is not None else ("n/a" if unit == "ms" else "")
        print(
            f"| {name:<62} | {value:>10.3f} {unit:<7} | {shown:>13} | {baseline:<28} | "
            f"{target:<18} |",
            flush=True,
        )
        entry = {
            "section": self.title,
            "name": name,
            "value": value,
            "unit": unit,
            "launches": launches,
            "baseline": baseline,
            "target": target,
        }
        self.rows.append(entry)
        return entry


@dataclass
class Run:
    """What every section needs: the device, the step counts, the scale."""

    device: torch.device
    warm: int
    timed: int
    scale: float
    fill_steps: int = 300
    _ids: ZipfColumns | None = None  # the section's id distributions (fresh batches)
    _batch: int = 0

    def time_row(
        self, table: StepTable, name: str, build: Callable[[], Runner], batches, fill: bool = True
    ) -> dict:
        """Builds a model, fills its cache (:meth:`fill`; not where ``fill`` is False: an L1 of
        every row), times its steps over ``batches`` (the last one kept for the launch count),
        prints its row, and frees it before returning."""
        t0 = time.perf_counter()
        runner = build()
        made = time.perf_counter() - t0
        filled, evicting = self.fill(runner) if fill else (0, False)
        ms = median_step_ms(runner.step, batches[:-1], self.warm, self.device, runner.reset)
        hit = runner.hit_ratio() if runner.hit_ratio is not None else None
        steps = len(batches) - 1 - self.warm
        moved = [b / steps for b in runner.moved()] if runner.moved is not None else None
        launches = launches_per_step(runner.step, batches[-1], self.device)
        entry = table.row(name, ms, launches=launches)
        entry["made_s"] = made
        entry["hit_ratio"] = hit
        entry["moved_bytes"] = moved  # [filled, written back] a timed step, or None
        entry["fill_steps"], entry["evicting"] = filled, evicting
        hit_text = "" if hit is None else f", unique-id hit ratio {hit:.3f} after warm-up"
        if runner.moved is not None and fill:
            state = "writing rows back" if evicting else "NOT yet writing rows back"
            hit_text += f", {filled} fill steps (L1 {state})"
        if moved is not None:
            hit_text += (
                f", {moved[0] / 1e6:.1f} MB filled and {moved[1] / 1e6:.1f} MB written back a step"
            )
        note(f"built in {made:.1f} s{hit_text}")
        del runner
        free(self.device)
        return entry

    def batches(self, sizes: Sequence[int], batch: int) -> list[torch.Tensor]:
        """``warm + timed`` batches and one more (the launch count's); the distributions are
        kept for :meth:`fill`'s fresh batches (:meth:`done` frees them)."""
        self._ids, self._batch = ZipfColumns(sizes, self.device), batch
        return [self._ids(batch) for _ in range(self.warm + self.timed + 1)]

    def done(self) -> None:
        """Frees the section's distributions."""
        self._ids = None
        free(self.device)

    def fill(self, runner: Runner) -> tuple[int, bool]:
        """Steps a model with a cache on fresh batches until a step writes back at least half
        as many bytes as it fills (its L1 is full and evicts about what it takes in, dirty:
        the steady state the targets are about; a first writeback comes earlier, from the
        first full set), at most ``fill_steps`` of them; returns the steps taken and whether
        that point was reached. A model without a cache is not stepped."""
        if runner.moved is None or self._ids is None:
            return 0, False
        step = runner.plain or runner.step
        filled, written = runner.moved()  # one read of the counters a step (it syncs)
        for k in range(self.fill_steps):
            step(self._ids(self._batch))
            now_filled, now_written = runner.moved()
            if 0 < now_filled - filled <= 2 * (now_written - written):
                return k + 1, True
            filled, written = now_filled, now_written
        return self.fill_steps, False


def speedups(
    table: StepTable, ours: dict, against: dict[str, dict], targets: dict[str, str]
) -> None:
    """Rows of the speed-up of the collection at L1 = 10 % (``ours``) over each baseline (the
    baseline's time over ours), beside the target of that baseline where the issue sets one."""
    for label, base in against.items():
        table.row(
            f"speed-up of collection L1 = 10 % over {label}",
            base["value"] / ours["value"],
            "x",
            f"{base['value']:.3f} / {ours['value']:.3f} ms",
            targets.get(label, ""),
        )


def floor_row(table: StepTable, all_hits: dict, ours: dict, sgd: dict) -> None:
    """The floor of the L1 = 10 % step (as issue 23 defines it): the larger of the L1 = 100 %
    step (``all_hits``, its fastest way) and the time ``ours``'s row moves a step take at the
    DMA rates measured now (fills host to device, writebacks device to host, both at once),
    beside what the target over torch + SGD asks."""
    rates = common.dma_rates()
    fills, wbs = ours["moved_bytes"]
    pcie = common.floor_ms(0.0, fills, wbs, rates)  # the moves alone
    floor = max(all_hits["value"], pcie)
    asks = sgd["value"] / 1.5
    table.row(
        "floor of the collection's L1 = 10 % step",
        floor,
        baseline=f"all in L1 {all_hits['value']:.3f}; moves {pcie:.3f} ms",
        target=f"1.5x asks {asks:.3f} ms",
    )
    note(
        f"DMA rates now: {rates['h2d']:.1f} GB/s host to device, {rates['d2h']:.1f} device to "
        f"host, {rates['both']:.1f} both at once; moves a step {fills / 1e6:.1f} MB in, "
        f"{wbs / 1e6:.1f} MB out; the target is {'under' if asks < floor else 'above'} the floor"
    )


def describe(sizes: Sequence[int]) -> str:
    rows = sum(sizes)
    return f"{len(sizes)} tables, {rows:,} rows x {D} fp32 ({rows * D * 4 / 1e9:.2f} GB a copy)"


# --- sections -----------------------------------------------------------------------------------


def bench_criteo26(run: Run) -> StepTable:
    sizes = [scaled(n, run.scale) for n in CRITEO_ROWS]
    b = scaled(CRITEO_BATCH, run.scale)
    table = StepTable(
        "criteo26: 26 Criteo Kaggle tables, training step",
        f"{describe(sizes)}, int64 ids",
        f"{b} samples x 26 tables, one id each, Zipf({ALPHA})",
        "ms",
        device=device_name(run.device),
    )
    batches = run.batches(sizes, b)
    dev = run.device
    full = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 100 %",
        lambda: collection(sizes, 1.0, b, dev),
        batches,
        fill=False,
    )
    full_graphed = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 100 %, GraphedStep",
        lambda: collection(sizes, 1.0, b, dev, graphed=True),
        batches,
        fill=False,
    )
    ours = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 10 %",
        lambda: collection(sizes, L1_SHARE, b, dev),
        batches,
    )
    _launches_26["collection"] = ours["launches"]
    graphed = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 10 %, GraphedStep",
        lambda: collection(sizes, L1_SHARE, b, dev, graphed=True),
        batches,
    )
    pipelined = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 10 %, prefetching(depth=1)",
        lambda: collection(sizes, L1_SHARE, b, dev, prefetched=batches),
        batches,
    )
    # the fastest documented way
    ours = min(ours, graphed, pipelined, key=lambda row: row["value"])
    sep = run.time_row(
        table,
        "26 TieredEmbeddingBag, RowWiseAdagrad, L1 = 10 % each",
        lambda: tiered_tables(sizes, L1_SHARE, b, dev),
        batches,
    )
    ada = run.time_row(
        table,
        "26 nn.EmbeddingBag(sparse) + torch.optim.Adagrad",
        lambda: torch_tables(sizes, b, dev, "adagrad"),
        batches,
    )
    sgd = run.time_row(
        table,
        "26 nn.EmbeddingBag(sparse) + torch.optim.SGD",
        lambda: torch_tables(sizes, b, dev, "sgd"),
        batches,
    )
    speedups(
        table,
        ours,
        {"torch + Adagrad": ada, "torch + SGD": sgd, "26 TieredEmbeddingBag": sep},
        {"torch + Adagrad": ">= 5x", "torch + SGD": ">= 1.5x"},
    )
    run.done()  # the distributions, before the DMA rates' buffers
    if dev.type == "cuda":
        floor_row(table, min(full, full_graphed, key=lambda r: r["value"]), ours, sgd)
    note(
        f"L1 = 100 %: {full['value']:.3f} ms; all steps median host wall time, synchronised, "
        f"after {run.warm} warm-up steps, over {run.timed} steps"
    )
    return table


def bench_mixed856(run: Run) -> StepTable:
    sizes = [scaled(n, run.scale) for n in mixed_sizes()]
    b = scaled(MIXED_BATCH, run.scale)
    table = StepTable(
        "mixed856: 856 tables of mixed sizes, training step",
        f"{describe(sizes)}, int64 ids",
        f"{b} samples x 856 tables, one id each, Zipf({ALPHA})",
        "ms",
        device=device_name(run.device),
    )
    batches = run.batches(sizes, b)
    dev = run.device
    ours = run.time_row(
        table,
        "collection, RowWiseAdagrad, L1 = 10 %",
        lambda: collection(sizes, L1_SHARE, b, dev),
        batches,
    )
    ada = run.time_row(
        table,
        "856 nn.EmbeddingBag(sparse) + torch.optim.Adagrad",
        lambda: torch_tables(sizes, b, dev, "adagrad"),
        batches,
    )
    sgd = run.time_row(
        table,
        "856 nn.EmbeddingBag(sparse) + torch.optim.SGD",
        lambda: torch_tables(sizes, b, dev, "sgd"),
        batches,
    )
    speedups(table, ours, {"torch + Adagrad": ada, "torch + SGD": sgd}, {})
    del batches
    run.done()
    if ours["launches"] is None:
        note("launches per step: n/a (torch.profiler counts CUDA kernels)")
        return table
    at26, where = _launches_26.get("collection"), "criteo26's collection at L1 = 10 %, this run"
    if at26 is None:  # criteo26 not run: the first 26 of these tables, at this batch
        where = "a collection of the first 26 of these tables at L1 = 10 %"
        few = sizes[:26]
        small = run.batches(few, b)
        runner = collection(few, L1_SHARE, b, dev)
        for x in small[: run.warm]:
            runner.step(x)
        at26 = launches_per_step(runner.step, small[-1], dev)
        del runner, small
        run.done()
    table.row(
        "collection launches per step at 856 tables",
        float(ours["launches"]),
        "launches",
        f"{at26} at 26 tables",
        f"= {at26}",
    )
    note(f"launches at 26 tables: {where}")
    return table


SECTIONS: dict[str, Callable[[Run], StepTable]] = {
    "criteo26": bench_criteo26,
    "mixed856": bench_mixed856,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (as ``common.main``'s, with ``--scale`` and ``--device``); returns the
    exit status: 1 if a section failed (its traceback printed, the others still run)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (3 warm-up, 5 timed)")
    parser.add_argument(
        "--steps", default=None, help="WARM,TIMED steps per row (default 10,20; --quick 3,5)"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument(
        "--fill-steps",
        type=int,
        default=300,
        help="at most this many steps on fresh batches before a cached model's warm-up, until "
        "its L1 writes back half what it fills (full: the steady state); 0: none (default 300)",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies every table's rows and the batches (each at least 1)",
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda where available"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not args.scale > 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    warm, timed = (3, 5) if args.quick else (10, 20)
    if args.steps is not None:
        try:
            warm, timed = (int(k) for k in args.steps.split(","))
        except ValueError:
            parser.error(f"--steps takes WARM,TIMED (two ints), got {args.steps!r}")
        if warm < 0 or timed < 1:
            parser.error(f"--steps needs WARM >= 0 and TIMED >= 1, got {args.steps!r}")
    if args.fill_steps < 0:
        parser.error(f"--fill-steps must be >= 0, got {args.fill_steps}")
    run = Run(device, warm, timed, args.scale, args.fill_steps)
    print(
        f"{device_line(device)}; scale {args.scale:g}; {warm} warm-up + {timed} timed steps",
        flush=True,
    )
    passed = common.run_sections(
        lambda name: SECTIONS[name](run),
        names,
        args.json,
        lambda: {
            "gpu": device_name(device),
            "device": device.type,
            "scale": args.scale,
            "warm": warm,
            "timed": timed,
            "fill_steps": args.fill_steps,
        },
        after=lambda: free(device),
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
