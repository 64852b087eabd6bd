"""The main job: train a tiered table on a synthetic skewed trace at several cache sizes and
report hit rate and throughput against cache size (``tierstore run``).

It doubles as a check of docs/DESIGN.md's one rule: every configuration trains the same rows, so
the job ends by comparing a checksum of the trained table across all of them.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from .cache import cache_shape
from .config import CacheConfig, SSDConfig
from .errors import InvalidInputError
from .module import TieredEmbeddingBag
from .optim import SGD, Adagrad, RowWiseAdagrad
from .policy import POLICIES
from .progress import progress
from .report import format_table, plot_lines, write_csv
from .trace.generate import zipf_trace

OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rowwise": RowWiseAdagrad}
COLUMNS = [
    "policy",
    "cache_pct",
    "asked_rows",
    "cache_rows",
    "hit_ratio",
    "unique_hit_ratio",
    "conflict_misses",
    "step_ms",
    "req_per_s",
]


@dataclass
class JobConfig:
    """The synthetic table and trace (defaults fit a laptop CPU in about a minute).

    ``cache_pcts`` are L1 sizes in % of ``rows`` (each in (0, 100], rounded up to whole rows);
    ``policies`` names of ``tierstore.policy.POLICIES``; ``optimizer`` a key of
    :data:`OPTIMIZERS`. Invalid values raise :class:`~tierstore.errors.InvalidInputError`.
    """

    rows: int = 1_000_000
    dim: int = 64
    bags: int = 4096  # B
    pooling: int = 16  # L: ids per bag
    steps: int = 20
    zipf: float = 1.05
    cache_pcts: tuple[float, ...] = (1.0, 5.0, 20.0, 100.0)
    policies: tuple[str, ...] = ("lru", "lfu")
    ways: int = 32  # L1 associativity
    optimizer: str = "rowwise"
    lr: float = 0.05
    device: str | None = None
    ssd: bool = False  # put an SSD tier under L2 (host_rows = 2x the cache)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "dim", "bags", "pooling", "steps", "ways"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.zipf) or self.zipf < 0:
            raise InvalidInputError(f"zipf must be a finite exponent >= 0, got {self.zipf}")
        if not self.cache_pcts:
            raise InvalidInputError("cache_pcts needs at least one cache size")
        bad = [p for p in self.cache_pcts if not 0 < p <= 100]
        if bad:
            raise InvalidInputError(f"cache sizes must lie in (0, 100] % of rows, got {bad}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise InvalidInputError(
                f"unknown policies {unknown or list(self.policies)}; known: {sorted(POLICIES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInputError(
                f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}"
            )


def zipf_batches(cfg: JobConfig) -> list[torch.Tensor]:
    """``steps`` batches of ``bags * pooling`` ids, Zipf(``zipf``) over a shuffled id space
    (so that the hot rows are scattered over the table, as hashed ids are)."""
    n = cfg.bags * cfg.pooling
    ids = torch.from_numpy(zipf_trace(n * cfg.steps, cfg.rows, cfg.zipf, seed=cfg.seed))
    return list(ids.split(n))


def run_one(cfg: JobConfig, policy: str, cache_rows: int, batches, workdir) -> tuple[dict, float]:
    """Trains one configuration; returns its result row and a checksum of the trained rows."""
    ssd = None
    if cfg.ssd:
        ssd = SSDConfig(
            pathlib.Path(workdir) / f"{policy}-{cache_rows}",
            host_rows=max(2 * cache_rows, 4 * cfg.bags * cfg.pooling),
        )
    emb = TieredEmbeddingBag(
        cfg.rows,
        cfg.dim,
        mode="sum",
        cache=CacheConfig(rows=cache_rows, ways=cfg.ways, policy=policy),
        ssd=ssd,
        optimizer=OPTIMIZERS[cfg.optimizer](lr=cfg.lr),
        device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        seed=cfg.seed,
    )
    offsets = torch.arange(0, cfg.bags * cfg.pooling, cfg.pooling, device=emb.device)
    grad = torch.randn(cfg.bags, cfg.dim, generator=torch.Generator().manual_seed(1)).to(emb.device)
    times = []
    for ids in batches:
        ids = ids.to(emb.device)
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        emb(ids, offsets).backward(grad)
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = emb.stats()
    step = statistics.median(times[1:] if len(times) > 1 else times)
    checksum = float(emb.read_rows(torch.unique(torch.cat(batches))).double().sum())
    if cfg.ssd:
        with warnings.catch_warnings():  # a temporary table: its unflushed rows may go
            warnings.simplefilter("ignore", UserWarning)
            emb.close()
    sets, ways = cache_shape(cache_rows, cfg.ways)
    held = sets * ways  # what the L1 really holds: whole sets of ``ways`` rows
    row = {
        "policy": policy,
        "cache_pct": round(100 * cache_rows / cfg.rows, 3),  # asked
        "asked_rows": cache_rows,
        "cache_rows": held,
        "hit_ratio": s.hit_ratio,
        "unique_hit_ratio": s.unique_hit_ratio,
        "conflict_misses": s.conflict_misses,
        "step_ms": 1e3 * step,
        "req_per_s": cfg.bags * cfg.pooling / step,
    }
    return row, checksum


def run_job(cfg: JobConfig, out: str | pathlib.Path | None = "tierstore-run") -> list[dict]:
    """Runs every policy and cache size, prints the table, writes ``out.csv`` and ``out.png``."""
    batches = zipf_batches(cfg)
    configs = [
        (p, max(1, math.ceil(cfg.rows * pct / 100))) for p in cfg.policies for pct in cfg.cache_pcts
    ]
    rows, sums = [], []
    with tempfile.TemporaryDirectory(prefix="tierstore-job-") as workdir:
        for policy, cache_rows in progress(configs, desc="configurations"):
            row, checksum = run_one(cfg, policy, cache_rows, batches, workdir)
            rows.append(row)
            sums.append(checksum)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    title = (
        f"tierstore: {cfg.rows} rows x {cfg.dim} fp32, {cfg.bags} bags x {cfg.pooling} ids, "
        f"Zipf({cfg.zipf}), {cfg.optimizer}, {device}{' +SSD' if cfg.ssd else ''}"
    )
    same = all(s == sums[0] for s in sums)
    drew = False
    if out is not None:  # the files first: a closed stdout (`| head`) must not lose them
        write_csv(rows, COLUMNS, f"{out}.csv")
        drew = plot_lines(
            rows,
            "cache_pct",
            ["hit_ratio", "req_per_s"],
            "policy",
            f"{out}.png",
            title,
            "cache size (% of rows)",
        )
    print(format_table(rows, COLUMNS, title))
    print(
        "hit_ratio: requests whose row was in L1 (repeats inside a batch count as hits); "
        "unique_hit_ratio: per distinct row of each batch; cache_rows: rows L1 holds (whole "
        f"sets of {cfg.ways} ways)"
    )
    print(f"trained rows identical across every cache size and policy: {'yes' if same else 'NO'}")
    if out is not None:
        print(
            f"wrote {out}.csv"
            + (f" and {out}.png" if drew else " (pip install matplotlib for the plot)")
        )
    if not same:
        raise RuntimeError("the trained rows differ between cache configurations")
    return rows
