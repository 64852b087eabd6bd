"""Training steps with an SSD tier (issue 23): a DLRM-shaped model, and one large table.

Sections (``--only dlrm,big``):

``dlrm``: the shape of Meta's DLRM reference run of issue 23, built here (DLRM's own script
    needs sklearn and a data set): bottom MLP 13-512-256-64 over random dense features, 4
    tables of 2 M x 64 rows (``ts.TieredEmbeddingBag``, sum pooling, the fused SGD), one
    Zipf(1.05) id per bag, pairwise dot interactions, top MLP 512-256-1, sigmoid and BCE loss;
    the MLPs trained by ``torch.optim.SGD``; batch 2 048. Every table is first written whole
    (``write_rows`` of DLRM's initial weights, uniform on +-sqrt(1/rows), in chunks) and, with
    an SSD tier, flushed, so that L3 holds every row. Rows: the tables in L2 (no SSD tier);
    with an SSD tier whose L2 holds 50 % of the rows; the same L3 reopened with L2 = 20 %
    (its trained rows dropped: every run starts from the initial weights). L1 = 10 % of the
    rows throughout; each as a plain loop and under ``ts.prefetching(depth=2)`` (one per
    table). Every run trains on the same batches from the same weights in the same order of
    plain and pipelined steps, so its losses must be those of the run without an SSD tier at
    every step (checked and printed: the pipeline and the tiers are transparent). L2 starts
    empty (the initial rows go to L3), and the warm-up alone would take thousands of steps to
    fill it, so an SSD run first fills L2 as a long run leaves it: full, every row dirty (each
    was trained since it came in), so that from the first timed step an L2 miss evicts a
    dirty row into L3 (:func:`fill_l2`: zero-gradient steps over a random L2's worth of
    rows, which leave every value as it was; the L3 rows written a step show the writes).
``big``: a 20 M x 128 fp32 table trained by RowWiseAdagrad, L1 = 5 % and L2 = 20 % of the
    rows, L3 on this machine's disk; bench_steady's batch (65 536 bags x 32 Zipf(1.05) ids,
    one fixed popularity order; a quarter of the bags with ``--quick``); plain and under
    ``ts.prefetching(depth=2)``, beside the same table without an SSD tier (all in L2). L3 is
    not written first (20 M rows would take minutes): a row never written is a function of
    its id and the seed, so L3 starts empty and fills as L2 evicts dirty rows; an L3 read of a
    row not there still costs its LMDB lookup. L2 is first filled with dirty rows, as for
    ``dlrm`` (:func:`fill_l2`). ``--prewrite F`` writes the first F of the ids
    (a random F of the rows by popularity) and flushes before the run. Printed: the rows read
    from L3 per step (L2 misses, ``stats().l2_misses``) and how many of them L3 held (found
    blocks, one row a block), the time L3 reads took and their rate, and the share of the SSD
    tier's cost that the pipeline hides::

        hidden = 1 - (SSD pipelined - L2-only pipelined) / (SSD plain - L2-only plain)

    i.e. the SSD tier's extra step time (its L3 reads, the L2 cache's work over L3, the dirty
    L2 victims staged into L3) with the pipeline against without it, each against the same
    loop without an SSD tier. (The engine's stats count no time; the time of L3 reads and of
    the dirty L2 victims' writes to L3 shown beside it is measured by timing the SSD tier's
    ``read`` and ``write``, engine internals.)

Every step time is the median of per-step wall times, each step synchronised (the pipeline's
host work, done in the ``prefetching`` iterator's ``next``, counted in the step). After the
warm-up (30 plain steps, 40 without ``--quick``; twice that in ``big``), the plain loop and the
pipelined loop take turns in blocks of 5 timed steps on fresh batches (each block one more
step, untimed, that fills the pipeline), 10 timed steps each (20 without ``--quick``), so that
both see the caches and L3 in the same state. Per-step counts are over every step of the
blocks. Runs on CUDA where available, else on the CPU.

    python3 bench/bench_ssd_step.py [--quick] [--only dlrm,big] [--json out.json]
    python3 bench/bench_ssd_step.py --quick --scale 0.01      # CPU, under a minute

``--scale F`` multiplies every table's rows and the batches (for a small machine; at least
1 024 rows, 128 DLRM samples and 64 bags); ``--dir PATH`` puts the tables in a fresh
temporary directory under PATH (default under ``/tmp``), deleted at the end;
``--io-threads`` and ``--io-processes`` are ``ts.SSDConfig``'s; ``--torch-threads N`` is
torch's intra-op threads (default: 1 on the CPU, where the steps' ops are small and more
threads fight the SSD tier's I/O threads: on 2 loaded cores a step took 5-20x longer with
torch's default; torch's own default with CUDA).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 (puts the checkout on sys.path)
from common import Table, note  # noqa: E402

import tierstore as ts  # noqa: E402

# DLRM reference shape (issue 23) and the large table (bench_steady's)
DLRM_ROWS, DLRM_DIM, DLRM_TABLES, DLRM_BATCH, DENSE = 2_000_000, 64, 4, 2048, 13
BIG_ROWS, BIG_DIM, BIG_BAGS, BIG_L = 20_000_000, 128, 65_536, 32
ZIPF = 1.05
CHUNK = 1 << 18  # rows per write_rows call of the initial weights


@dataclass(frozen=True)
class Run:
    """This run's options (the command line).

    Args:
        device: where L1, the MLPs and the batches live.
        scale: factor on every table's rows and on the batches.
        quick: fewer timed steps (and a quarter of the big section's bags).
        root: the temporary directory the SSD tables go in.
        io_threads / io_processes: the SSD tier's (``ts.SSDConfig``).
        prewrite: share of the big table's rows written before its run.
    """

    device: torch.device
    scale: float
    quick: bool
    root: Path
    io_threads: int = 4
    io_processes: int = 0
    prewrite: float = 0.0

    @property
    def warm(self) -> int:
        return 30 if self.quick else 40

    @property
    def timed(self) -> int:
        return 10 if self.quick else 20

    def rows(self, n: int) -> int:
        return max(1024, round(n * self.scale))

    def ssd(self, name: str, host_rows: int) -> ts.SSDConfig:
        return ts.SSDConfig(
            self.root / name,
            host_rows=host_rows,
            block_rows=1,
            io_threads=self.io_threads,
            io_processes=self.io_processes,
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- batches and timing -------------------------------------------------------------------------


class Zipf:
    """Zipf(``ZIPF``) ids over ``rows`` rows: ranks drawn by inverse CDF, mapped through one fixed
    random permutation (the popularity order), so the hot rows are scattered over the ids."""

    def __init__(self, rows: int, seed: int, device: torch.device):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        w = torch.arange(1, rows + 1, device=device, dtype=torch.float64).pow_(-ZIPF)
        self.cdf = torch.cumsum(w / w.sum(), 0)
        self.order = torch.randperm(rows, device=device, generator=self.gen)

    def __call__(self, *shape: int) -> torch.Tensor:
        u = torch.rand(
            math.prod(shape), device=self.cdf.device, dtype=torch.float64, generator=self.gen
        )
        rank = torch.searchsorted(self.cdf, u).clamp_(max=self.order.numel() - 1)
        return self.order[rank].view(*shape)


# --- the engine's internals this benchmark reaches ----------------------------------------------
# The stats count rows, not time: the time of L3 reads and writes is measured by timing the SSD
# tier's ``read`` and ``write`` (``store.host.ssd``), and the rows L3 held by its found-block
# counter (one row a block).


class L3Clock:
    """Time spent in a table's L3 reads (misses of L2, on its I/O thread or not) and writes
    (dirty L2 victims staged into L3), by wrapping its SSD tier's ``read`` and ``write``."""

    def __init__(self, emb: ts.TieredEmbeddingBag):
        self.ssd = emb.store.host.ssd
        self.read_s, self.write_s = 0.0, 0.0
        self._lock = threading.Lock()
        read, write = self.ssd.read, self.ssd.write

        def timed(call, counter: str):
            def run(*args):
                t0 = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    with self._lock:
                        setattr(self, counter, getattr(self, counter) + time.perf_counter() - t0)

            return run

        self.ssd.read, self.ssd.write = timed(read, "read_s"), timed(write, "write_s")

    def snapshot(self) -> tuple[float, float, int]:
        """(seconds reading, seconds writing, rows L3 held of those read) so far."""
        return self.read_s, self.write_s, self.ssd.stats["blocks_read"]


# --- timing and counting ------------------------------------------------------------------------

BLOCK = 5  # timed steps per block: the plain and the pipelined loop take turns, block by block


@dataclass
class Counted:
    """One loop's timed steps, and what its tables did per step of its blocks."""

    times: list[float] = field(default_factory=list)  # wall ms of each timed step
    steps: int = 0  # steps counted (the blocks' first steps too)
    l3_rows: int = 0  # L2 misses: rows read from L3
    l3_found: int = 0  # of them, rows L3 held (the others were never written)
    l3_read_s: float = 0.0  # time in L3 reads
    l3_written: int = 0  # dirty L2 victims written (staged) into L3
    l3_write_s: float = 0.0  # time in those writes
    hits: int = 0  # L1 hits and unique rows looked up
    unique: int = 0

    @property
    def ms(self) -> float:
        """The median step."""
        return statistics.median(self.times)

    def per_step(self, value: float) -> float:
        return value / max(1, self.steps)

    @property
    def l1_hit(self) -> float:
        return self.hits / max(1, self.unique)

    def block(self, run: Run, tables: list, clocks: list, loop: Iterable, step) -> None:
        """Runs ``step`` over ``loop`` (one block), adding its steps but the first to the timed
        ones (that one fills the pipeline) and every step to the counts. A step is timed from
        the loop's ``next`` (where ``prefetching`` pushes a later batch) to the device idle."""
        stats0 = [t.stats() for t in tables]
        clock0 = [c.snapshot() for c in clocks]
        run.sync()
        it, k = iter(loop), 0
        while True:
            t0 = time.perf_counter()
            x = next(it, None)
            if x is None:
                break
            step(x)
            run.sync()
            if k:
                self.times.append(1e3 * (time.perf_counter() - t0))
            k += 1
        self.steps += k
        for a, b in zip(stats0, (t.stats() for t in tables)):
            self.l3_rows += b.l2_misses - a.l2_misses
            self.l3_written += b.l2_writebacks - a.l2_writebacks
            self.hits += b.hits - a.hits
            self.unique += b.unique - a.unique
        for c, (r0, w0, f0) in zip(clocks, clock0):
            r1, w1, f1 = c.snapshot()
            self.l3_read_s += r1 - r0
            self.l3_write_s += w1 - w0
            self.l3_found += f1 - f0


def measure(
    run: Run,
    tables: list,
    clocks: list,
    batches: Callable[[int], list],
    step,
    pipelined: Callable[[list], Iterable],
    warm: int,
) -> tuple[Counted, Counted]:
    """``warm`` plain steps, then ``run.timed`` timed steps of the plain loop and as many under
    ``pipelined`` (a loop over a block's batches), in turns of :data:`BLOCK` steps (each block
    one more step, untimed), so that both see the tables in the same state. ``batches(n)``:
    the next ``n`` batches (fresh ones for every block)."""
    for x in batches(warm):
        step(x)
    plain, piped = Counted(), Counted()
    for _ in range(max(1, run.timed // BLOCK)):
        plain.block(run, tables, clocks, batches(BLOCK + 1), step)
        piped.block(run, tables, clocks, pipelined(batches(BLOCK + 1)), step)
    return plain, piped


def hidden_share(plain: float, pipelined: float, base_plain: float, base_pipelined: float):
    """1 - (the SSD tier's extra step time pipelined) / (its extra time in the plain loop)."""
    extra = plain - base_plain
    return 1.0 - (pipelined - base_pipelined) / extra if extra > 0 else float("nan")


def close_dropping(tables: list) -> None:
    """Closes SSD tables without flushing: the rows trained by the run are not kept (the next
    run reopens L3 as it was written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TieredEmbeddingBag.close", UserWarning)
        for t in tables:
            t.close()


# --- section dlrm -------------------------------------------------------------------------------


def _mlp(sizes: list[int], last_relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*(layers if last_relu else layers[:-1]))


class DLRMShaped(nn.Module):
    """DLRM's shape: a bottom MLP over ``DENSE`` dense features to ``D``, one summed bag per
    table, the pairwise dot products of those ``tables + 1`` vectors, and a top MLP to one
    logit. ``forward(dense (B, DENSE), sparse: [(ids (B,), offsets (B,))] per table) -> (B,)``."""

    def __init__(self, tables: list[ts.TieredEmbeddingBag], dim: int, device: torch.device):
        super().__init__()
        torch.manual_seed(0)  # the same MLPs for every run
        self.bottom = _mlp([DENSE, 512, 256, dim]).to(device)
        self.tables = nn.ModuleList(tables)
        features = len(tables) + 1
        pairs = torch.tril_indices(features, features, offset=-1, device=device)
        self.register_buffer("pairs", pairs)
        self.top = _mlp([dim + pairs.shape[1], 512, 256, 1], last_relu=False).to(device)

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.bottom.parameters(), *self.top.parameters()]

    def forward(self, dense: torch.Tensor, sparse: list) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [t(ids, offsets) for t, (ids, offsets) in zip(self.tables, sparse)]
        feats = torch.stack([x, *pooled], 1)  # (B, tables + 1, D)
        dots = torch.bmm(feats, feats.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], 1)).squeeze(1)


def write_initial(tables: list[ts.TieredEmbeddingBag]) -> None:
    """Writes every row once, as DLRM initialises its tables: uniform on +-sqrt(1/rows), the
    same values for every run (a generator per table), in chunks; then flushes."""
    for k, t in enumerate(tables):
        n, bound = t.num_embeddings, math.sqrt(1 / t.num_embeddings)
        gen = torch.Generator().manual_seed(1000 + k)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            values = torch.rand(hi - lo, t.embedding_dim, generator=gen) * (2 * bound) - bound
            t.write_rows(torch.arange(lo, hi), values)
        t.flush()


FILL_BAGS = 1 << 16  # bags (one id each) of a fill_l2 step


def fill_l2(run: Run, tables: list[ts.TieredEmbeddingBag], l2_rows: int, seed: int = 5) -> float:
    """Fills each SSD table's L2 as a long run leaves it, and returns the seconds it took:
    ``l2_rows`` random rows (of a generator per table) brought in through L1 by training
    steps of one id a bag whose gradients are zero, so that every row ends dirty (the L1 rows
    written back to L2 are marked so) while SGD leaves every value exactly as it was."""
    t0 = time.perf_counter()
    for k, t in enumerate(tables):
        gen = torch.Generator().manual_seed(seed + k)
        ids = torch.randperm(t.num_embeddings, generator=gen)[:l2_rows].to(run.device)
        for chunk in ids.split(FILL_BAGS):
            offsets = torch.arange(chunk.numel(), device=run.device)
            t(chunk, offsets).sum().mul(0.0).backward()
    run.sync()
    return time.perf_counter() - t0


class DLRMBatches:
    """A stream of batches ``(dense (B, 13), target (B,), [(ids (B,), offsets (B,))] * tables)``,
    one Zipf id per bag, each table its own popularity order; ``self(n)`` gives the next
    ``n``. Streams made with the same arguments give the same batches."""

    def __init__(self, run: Run, rows: int, batch: int, seed: int = 1):
        dev = run.device
        self.zipfs = [Zipf(rows, seed + k, dev) for k in range(DLRM_TABLES)]
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.offsets = torch.arange(batch, device=dev)
        self.batch, self.device = batch, dev

    def __call__(self, n: int) -> list:
        out = []
        for _ in range(n):
            dense = torch.rand(self.batch, DENSE, device=self.device, generator=self.gen)
            target = torch.randint(0, 2, (self.batch,), device=self.device, generator=self.gen)
            sparse = [(z(self.batch), self.offsets) for z in self.zipfs]
            out.append((dense, target.float(), sparse))
        return out


def dlrm(run: Run) -> Table:
    rows, batch = run.rows(DLRM_ROWS), max(128, round(DLRM_BATCH * run.scale))
    l1, lr = max(1, rows // 10), 0.05
    table = Table(
        f"DLRM-shaped training step, {DLRM_TABLES} tables of {rows:,} x {DLRM_DIM}, L1 = 10 %",
        f"fp32 rows of {DLRM_DIM}, int64 ids; SGD (fused) + torch.optim.SGD; {run.device}",
        f"{batch:,} samples, 1 Zipf({ZIPF}) id a table",
        "ms",
    )

    def train(tables: list, clocks: list) -> tuple[Counted, Counted, list[torch.Tensor]]:
        """The model over ``tables``, trained on the same batches each time; the losses of
        every step."""
        model = DLRMShaped(tables, DLRM_DIM, run.device)
        opt = torch.optim.SGD(model.dense_parameters(), lr=lr)
        losses: list[torch.Tensor] = []

        def step(b):
            dense, target, sparse = b
            p = torch.sigmoid(model(dense, sparse))
            loss = nn.functional.binary_cross_entropy(p, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        def pipelined(block: list):  # one prefetching per table, each over its own ids
            per_table = [
                ts.prefetching([b[2][k] for b in block], t, depth=2) for k, t in enumerate(tables)
            ]
            return ((b[0], b[1], list(sparse)) for b, *sparse in zip(block, *per_table))

        batches = DLRMBatches(run, rows, batch)
        plain, piped = measure(run, tables, clocks, batches, step, pipelined, run.warm)
        return plain, piped, losses

    def make(ssd: Callable[[int], ts.SSDConfig] | None) -> list[ts.TieredEmbeddingBag]:
        return [
            ts.TieredEmbeddingBag(
                rows,
                DLRM_DIM,
                mode="sum",
                device=run.device,
                cache=ts.CacheConfig(rows=l1),
                ssd=None if ssd is None else ssd(k),
                optimizer=ts.SGD(lr=lr),
            )
            for k in range(DLRM_TABLES)
        ]

    # the tables in L2, no SSD tier
    tables = make(None)
    write_initial(tables)
    base, base_piped, base_losses = train(tables, [])
    del tables
    table.row("tables in L2 (no SSD tier), plain loop", base.ms)
    table.row("tables in L2 (no SSD tier), prefetching(depth=2)", base_piped.ms)
    note(f"no SSD tier: L1 unique-row hit ratio {base.l1_hit:.3f}")
    best_base = min(base.ms, base_piped.ms)

    # an SSD tier: L3 written whole, then L2 = 50 % and L2 = 20 % of the rows over it
    t0 = time.perf_counter()
    tables = make(lambda k: run.ssd(f"dlrm{k}", rows // 2))
    write_initial(tables)
    table.row(
        "L3 written: every row (write_rows in chunks), flushed", time.perf_counter() - t0, "s"
    )
    for share in (0.5, 0.2):
        if share != 0.5:  # the same L3, as written (the rows trained above are dropped)
            close_dropping(tables)
            tables = [
                ts.TieredEmbeddingBag.open(
                    run.ssd(f"dlrm{k}", round(share * rows)),
                    mode="sum",
                    device=run.device,
                    cache=ts.CacheConfig(rows=l1),
                    optimizer=ts.SGD(lr=lr),
                )
                for k in range(DLRM_TABLES)
            ]
        what = f"SSD tier, L2 = {share:.0%}"
        took = fill_l2(run, tables, round(share * rows))
        note(f"{what}: L2 filled with dirty rows first ({took:.1f} s)")
        plain, piped, losses = train(tables, [L3Clock(t) for t in tables])
        table.row(f"{what}, plain loop", plain.ms, baseline=f"{base.ms:.2f} ms no SSD")
        table.row(
            f"{what}, prefetching(depth=2)", piped.ms, baseline=f"{base_piped.ms:.2f} ms no SSD"
        )
        ratio = min(plain.ms, piped.ms) / best_base
        table.row(
            f"{what} / no SSD tier, fastest loop each",
            ratio,
            "x",
            baseline=f"{best_base:.2f} ms",
            target="<= 2x" if share == 0.5 else "",
        )
        l3_rows(table, what, plain, piped)
        hidden = hidden_share(plain.ms, piped.ms, base.ms, base_piped.ms)
        table.row(
            f"{what}: share of its extra time hidden by prefetching",
            hidden,
            "share",
            baseline="1 - extra pipelined / extra plain",
        )
        same = len(losses) == len(base_losses) and all(map(torch.equal, losses, base_losses))
        worst = max((float((a - b).abs()) for a, b in zip(losses, base_losses)), default=0.0)
        note(
            f"{what}: L1 hit ratio {plain.l1_hit:.3f}; losses equal to the no-SSD run's at "
            f"every step: {'yes' if same else f'no (max difference {worst:.2e})'}"
        )
    close_dropping(tables)
    return table


def l3_rows(table: Table, what: str, plain: Counted, piped: Counted) -> None:
    """A table's L3 traffic, plain and pipelined: rows read a step, of them rows L3 held, their
    time and rate; dirty L2 victims written to L3 a step and their time."""
    for mode, c in (("plain", plain), ("prefetching", piped)):
        rows, secs = c.per_step(c.l3_rows), c.per_step(c.l3_read_s)
        table.row(f"{what}, {mode}: L3 rows read a step", rows, "rows")
        table.row(f"{what}, {mode}: of them, rows L3 held", c.per_step(c.l3_found), "rows")
        table.row(f"{what}, {mode}: L3 read time a step", 1e3 * secs, "ms")
        table.row(
            f"{what}, {mode}: L3 read rate",
            rows / secs / 1e6 if secs else 0.0,
            "M rows/s",
            target=">= 2 M rows/s",
        )
        table.row(f"{what}, {mode}: L3 rows written a step", c.per_step(c.l3_written), "rows")
        table.row(f"{what}, {mode}: L3 write time a step", 1e3 * c.per_step(c.l3_write_s), "ms")


# --- section big --------------------------------------------------------------------------------


class BigBatches:
    """A stream of ``(bags, BIG_L)`` Zipf id batches over ``rows`` (``self(n)``: the next n)."""

    def __init__(self, run: Run, rows: int, bags: int, seed: int = 7):
        self.zipf, self.bags = Zipf(rows, seed, run.device), bags

    def __call__(self, n: int) -> list[torch.Tensor]:
        return [self.zipf(self.bags, BIG_L) for _ in range(n)]


def big(run: Run) -> Table:
    rows = run.rows(BIG_ROWS)
    bags = max(64, round(BIG_BAGS * run.scale) // (4 if run.quick else 1))
    l1, l2 = max(1, rows // 20), max(1, rows // 5)
    warm = 2 * run.warm  # L3 fills as L2 evicts dirty rows: more of its reads find rows later
    gen = torch.Generator(device=run.device).manual_seed(0)
    grad = torch.randn(bags, BIG_DIM, device=run.device, generator=gen)
    table = Table(
        f"one {rows:,} x {BIG_DIM} table, L1 = 5 %, L2 = 20 %, L3 on disk, RowWiseAdagrad",
        f"fp32 rows of {BIG_DIM} + 1 state, int64 ids; {run.device}",
        f"{bags:,} bags x {BIG_L} Zipf({ZIPF}) ids",
        "ms",
    )
    opt = ts.RowWiseAdagrad(lr=0.01)

    def train(emb: ts.TieredEmbeddingBag, clocks: list) -> tuple[Counted, Counted]:
        def step(x):
            emb(x).backward(grad)

        def pipelined(block):
            return ts.prefetching(block, emb, depth=2)

        batches = BigBatches(run, rows, bags)
        return measure(run, [emb], clocks, batches, step, pipelined, warm)

    emb = ts.TieredEmbeddingBag(
        rows, BIG_DIM, mode="sum", device=run.device, cache=ts.CacheConfig(rows=l1), optimizer=opt
    )
    base, base_piped = train(emb, [])
    del emb
    table.row("whole table in L2 (no SSD tier), plain loop", base.ms)
    table.row("whole table in L2 (no SSD tier), prefetching(depth=2)", base_piped.ms)

    emb = ts.TieredEmbeddingBag(
        rows,
        BIG_DIM,
        mode="sum",
        device=run.device,
        cache=ts.CacheConfig(rows=l1),
        ssd=run.ssd("big", l2),
        optimizer=opt,
    )
    if run.prewrite > 0:
        t0 = time.perf_counter()
        upto, wgen = round(run.prewrite * rows), torch.Generator().manual_seed(3)
        for lo in range(0, upto, CHUNK):
            hi = min(upto, lo + CHUNK)
            values = torch.randn(hi - lo, BIG_DIM, generator=wgen) * 0.01
            emb.write_rows(torch.arange(lo, hi), values)
        emb.flush()
        table.row(
            f"L3 pre-written: the first {run.prewrite:.0%} of the ids, flushed",
            time.perf_counter() - t0,
            "s",
        )
    took = fill_l2(run, [emb], l2)
    note(f"SSD tier: L2 filled with dirty rows first ({took:.1f} s)")
    plain, piped = train(emb, [L3Clock(emb)])
    close_dropping([emb])
    table.row("SSD tier, plain loop", plain.ms, baseline=f"{base.ms:.2f} ms no SSD")
    table.row("SSD tier, prefetching(depth=2)", piped.ms, baseline=f"{base_piped.ms:.2f} ms no SSD")
    table.row("SSD tier, step rate, fastest loop", 1e3 / min(plain.ms, piped.ms), "steps/s")
    l3_rows(table, "SSD tier", plain, piped)
    hidden = hidden_share(plain.ms, piped.ms, base.ms, base_piped.ms)
    table.row(
        "SSD tier: share of its extra time hidden by prefetching",
        hidden,
        "share",
        baseline="1 - extra pipelined / extra plain",
    )
    extra = plain.ms - base.ms
    note(
        f"L1 unique-row hit ratio {plain.l1_hit:.3f} (no SSD tier: {base.l1_hit:.3f}); "
        f"{warm} warm-up steps; the SSD tier's extra step time: {extra:.2f} ms plain, "
        f"{piped.ms - base_piped.ms:.2f} ms pipelined; of a plain step, its L3 reads take "
        f"{1e3 * plain.per_step(plain.l3_read_s):.2f} ms and its writes to L3 "
        f"{1e3 * plain.per_step(plain.l3_write_s):.2f} ms"
    )
    return table


# --- command line -------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Run], Table]] = {"dlrm": dlrm, "big": big}


def main(argv: list[str] | None = None) -> int:
    """Runs the sections; one that fails prints its traceback and the others still run.
    Returns 1 if any failed (2 for a bad command line, as argparse)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed steps, smaller batch")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--scale", type=float, default=1.0, help="factor on rows and batches")
    parser.add_argument("--dir", default=None, help="where the tables go (default: /tmp)")
    parser.add_argument("--io-threads", type=int, default=4, help="SSDConfig.io_threads")
    parser.add_argument("--io-processes", type=int, default=0, help="SSDConfig.io_processes")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 1 on the CPU, torch's own with CUDA)",
    )
    parser.add_argument(
        "--prewrite",
        type=float,
        default=0.0,
        help="share of the big table's ids written before its run",
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not 0 < args.scale <= 1 or not 0 <= args.prewrite <= 1:
        parser.error("--scale must be in (0, 1] and --prewrite in [0, 1]")
    if args.dir is not None and not Path(args.dir).is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_threads is not None or device.type == "cpu":
        torch.set_num_threads(args.torch_threads or 1)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{where}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"scale {args.scale}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="bench_ssd_step.", dir=args.dir))
    run = Run(
        device, args.scale, args.quick, root, args.io_threads, args.io_processes, args.prewrite
    )
    try:
        passed = common.run_sections(
            lambda name: SECTIONS[name](run),
            args.only.split(","),
            args.json,
            lambda: {"device": where, "scale": args.scale},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
