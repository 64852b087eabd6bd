"""``examples/dlrm/launch.py``'s swap on a small DLRM-shaped model (no DLRM checkout needed):
the same code run with stock ``nn.EmbeddingBag`` (sparse gradients, ``torch.optim.SGD`` over
``model.parameters()`` and a warm-up/decay scheduler over it) and inside ``swapped()`` gives
the same loss at every step, and the tables end with the same weights. Fresh random data and
initial weights each run; the seed is in every failure message."""

from __future__ import annotations

import importlib.util
import io
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tierstore as ts

LAUNCH = Path(__file__).resolve().parents[1] / "examples" / "dlrm" / "launch.py"
ROWS, DIM, DENSE, BATCH = (40, 90, 25), 4, 5, 16


def _launcher():
    spec = importlib.util.spec_from_file_location("tierstore_dlrm_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlp(sizes, rng, last=None):
    """Linear layers initialised from ``rng`` (as DLRM does, so that the torch RNG, which a
    stock nn.EmbeddingBag's own initialisation consumes, plays no part)."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layer = nn.Linear(n_in, n_out)
        w = rng.normal(0.0, math.sqrt(2 / (n_in + n_out)), (n_out, n_in)).astype(np.float32)
        layer.weight.data = torch.tensor(w, requires_grad=True)
        layer.bias.data = torch.tensor(rng.normal(0.0, 0.1, n_out).astype(np.float32))
        layers += [layer, nn.ReLU()]
    if last is not None:
        layers[-1] = last
    return nn.Sequential(*layers)


class TinyDLRM(nn.Module):
    """Bottom MLP over dense features, one summed bag per table, pairwise dot interactions,
    top MLP to a click probability: DLRM's shape at toy size."""

    def __init__(self, rng: np.random.Generator, rows: tuple[int, ...] = ROWS):
        super().__init__()
        self.bottom = _mlp([DENSE, 8, DIM], rng)
        self.tables = nn.ModuleList()
        for n in rows:
            table = nn.EmbeddingBag(n, DIM, mode="sum", sparse=True)  # what the launcher swaps
            w = rng.uniform(-math.sqrt(1 / n), math.sqrt(1 / n), (n, DIM)).astype(np.float32)
            table.weight.data = torch.tensor(w, requires_grad=True)
            self.tables.append(table)
        features = len(rows) + 1
        self.register_buffer("pairs", torch.tril_indices(features, features, offset=-1))
        self.top = _mlp([DIM + self.pairs.shape[1], 8, 1], rng, last=nn.Sigmoid())

    def forward(self, dense, offsets, indices):
        x = self.bottom(dense)
        pooled = [t(i, o) for t, i, o in zip(self.tables, indices, offsets)]
        feats = torch.stack([x, *pooled], 1)  # (B, tables + 1, DIM)
        dots = torch.bmm(feats, feats.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], 1)).squeeze(1)


def _batches(seed: int, count: int, rows: tuple[int, ...] = ROWS):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        dense = torch.rand(BATCH, DENSE, generator=gen)
        offsets, indices = [], []
        for n in rows:
            lengths = torch.randint(1, 4, (BATCH,), generator=gen)
            offsets.append(torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]))
            indices.append(torch.randint(0, n, (int(lengths.sum()),), generator=gen))
        out.append((dense, offsets, indices, torch.randint(0, 2, (BATCH,), generator=gen)))
    return out


def _schedule(optimizer):
    """Linear warm-up from lr 0 over 3 steps, then a squared decay: DLRM's policy in spirit."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / 3 if s < 3 else max(0.05, (1 - (s - 3) / 8) ** 2)
    )


def _train(model, batches, lr, optimizer=None, scheduler=None, kind="sgd"):
    """DLRM's loop: loss, zero_grad, backward, step, scheduler step. Returns the losses and the
    optimizer and scheduler (to continue). The optimizer class is looked up at call time, as
    DLRM does (``torch.optim.SGD`` or ``torch.optim.Adagrad``: the launcher's, when swapped)."""
    cls = {"sgd": lambda: torch.optim.SGD, "adagrad": lambda: torch.optim.Adagrad}[kind]()
    optimizer = optimizer or cls(model.parameters(), lr=lr)
    scheduler = scheduler or _schedule(optimizer)
    losses = []
    for dense, offsets, indices, target in batches:
        loss = nn.functional.binary_cross_entropy(model(dense, offsets, indices), target.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
    return losses, optimizer, scheduler


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_swapped_dlrm_trains_as_stock_dlrm(kind):
    seed = random.randrange(1 << 32)
    launch, batches, lr = _launcher(), _batches(seed, 12), 0.5
    stock = TinyDLRM(np.random.default_rng(seed))
    assert type(stock.tables[0]) is torch.nn.EmbeddingBag
    stock_losses, _, _ = _train(stock, batches, lr, kind=kind)
    with launch.swapped(kind, lr, cache_fraction=0.3):
        swapped = TinyDLRM(np.random.default_rng(seed))
        assert all(isinstance(t, ts.TieredEmbeddingBag) for t in swapped.tables)
        assert type(swapped.tables[0].optimizer).__name__.lower() == kind
        losses, _, _ = _train(swapped, batches, lr, kind=kind)
    assert torch.nn.EmbeddingBag is not launch.DLRMEmbeddingBag  # put back on exit
    for step, (ours, theirs) in enumerate(zip(losses, stock_losses)):
        torch.testing.assert_close(ours, theirs, msg=f"loss at step {step} (seed {seed})")
    # The fused update and torch.optim round in different orders, and the MLP's gradients
    # differ by rounding too; element-wise Adagrad divides each gradient by the root of its
    # own small sum, which magnifies those differences to ~1e-5 over 12 steps at lr 0.5
    # (measured over many seeds), where a wrong update is off by the lr's scale.
    tol = {"sgd": 1e-5, "adagrad": 2e-4}[kind]
    for k, (ours, theirs) in enumerate(zip(swapped.tables, stock.tables)):
        torch.testing.assert_close(
            ours.weight, theirs.weight.detach(), rtol=tol, atol=tol / 10,
            msg=lambda m, k=k: f"table {k} (seed {seed}): {m}",
        )  # fmt: skip
    # the schedule reached the tables: lr 0 at the first step, the decayed lr at the end
    assert swapped.tables[0].fused_optimizer.param_groups[0]["lr"] == pytest.approx(
        lr * max(0.05, (1 - (11 - 3) / 8) ** 2)
    )


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_collected_dlrm_trains_as_stock_dlrm(kind):
    """``swapped(collect=True)``: every table of the model in one collection (one group: one
    L1, one L2 for all), with the same losses and trained tables as the stock run."""
    seed = random.randrange(1 << 32)
    launch, batches, lr = _launcher(), _batches(seed, 12), 0.5
    stock = TinyDLRM(np.random.default_rng(seed))
    stock_losses, _, _ = _train(stock, batches, lr, kind=kind)
    with launch.swapped(kind, lr, cache_fraction=0.1, collect=True):
        collected = TinyDLRM(np.random.default_rng(seed))
        assert all(isinstance(t, launch.CollectedEmbeddingBag) for t in collected.tables)
        losses, _, _ = _train(collected, batches, lr, kind=kind)
    col = collected.tables[0].collection
    assert all(t.collection is col for t in collected.tables) and len(col.groups) == 1
    assert [t.name for t in col.tables] == ["table0", "table1", "table2"]
    assert col.groups[0].store.l1.capacity < sum(ROWS)  # a shared cache smaller than the rows
    for step, (ours, theirs) in enumerate(zip(losses, stock_losses)):
        torch.testing.assert_close(ours, theirs, msg=f"loss at step {step} (seed {seed})")
    tol = {"sgd": 1e-5, "adagrad": 2e-4}[kind]  # as in the test above
    for k, (ours, theirs) in enumerate(zip(collected.tables, stock.tables)):
        torch.testing.assert_close(
            ours.weight, theirs.weight.detach(), rtol=tol, atol=tol / 10,
            msg=lambda m, k=k: f"table {k} (seed {seed}): {m}",
        )  # fmt: skip
    assert col.groups[0].optimizer.lr == pytest.approx(lr * max(0.05, (1 - (11 - 3) / 8) ** 2))
    stats = col.stats()  # every table's lookups counted in the one shared cache
    assert all(stats.tables[t.name].requested > 0 for t in col.tables)


@pytest.mark.parametrize("collect", [False, True])
def test_dlrm_over_an_ssd_tier_trains_as_stock_dlrm(tmp_path, collect):
    """``--tierstore-ssd DIR --tierstore-host F``: every table (or the collection) over an SSD
    tier in DIR whose L2 holds F of its rows; DLRM's initial weights are written to L3 and read
    back from it, and the losses and trained tables are the stock run's. Tables ten times the
    other tests' rows: L2 must hold L1's rows and a batch's."""
    seed, rows = random.randrange(1 << 32), tuple(10 * n for n in ROWS)
    launch, batches, lr = _launcher(), _batches(seed, 12, rows), 0.5
    stock = TinyDLRM(np.random.default_rng(seed), rows)
    stock_losses, _, _ = _train(stock, batches, lr)
    with launch.swapped("sgd", lr, cache_fraction=0.1, collect=collect, ssd_dir=tmp_path,
                        host_fraction=0.5):  # fmt: skip
        swapped = TinyDLRM(np.random.default_rng(seed), rows)
        losses, _, _ = _train(swapped, batches, lr)
    if collect:
        col = swapped.tables[0].collection
        assert col.path == tmp_path / "collection"
        l2_misses = col.stats().overall.l2_misses
    else:
        for k, (t, n) in enumerate(zip(swapped.tables, rows)):
            assert t.ssd_config.path == tmp_path / f"table{k}"
            assert t.ssd_config.host_rows == math.ceil(0.5 * n)
        l2_misses = sum(t.stats().l2_misses for t in swapped.tables)
    assert l2_misses > 0  # rows were read from L3
    for step, (ours, theirs) in enumerate(zip(losses, stock_losses)):
        torch.testing.assert_close(ours, theirs, msg=f"loss at step {step} (seed {seed})")
    for k, (ours, theirs) in enumerate(zip(swapped.tables, stock.tables)):
        torch.testing.assert_close(
            ours.weight, theirs.weight.detach(), rtol=1e-5, atol=1e-6,
            msg=lambda m, k=k: f"table {k} (seed {seed}): {m}",
        )  # fmt: skip


@pytest.mark.parametrize("collect", [False, True])
def test_swapped_dlrm_checkpoint_continues_training(collect):
    """DLRM's --save-model / --load-model: model.state_dict() and the optimizer's, loaded into a
    freshly built model, continue exactly as the uninterrupted run."""
    seed = random.randrange(1 << 32)
    launch, batches, lr = _launcher(), _batches(seed, 8), 0.5
    with launch.swapped("sgd", lr, collect=collect):
        model = TinyDLRM(np.random.default_rng(seed))
        state = model.state_dict()
        if not any(key.startswith("tables.") for key in state):
            pytest.skip("TieredEmbeddingBag.state_dict() holds no rows in this tree")
        _, opt, sched = _train(model, batches[:4], lr)
        # through bytes, as DLRM's torch.save / torch.load (torch's default weights_only=True)
        buffer = io.BytesIO()
        torch.save((model.state_dict(), opt.state_dict(), sched.state_dict()), buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        straight, _, _ = _train(model, batches[4:], lr, opt, sched)
        fresh = TinyDLRM(np.random.default_rng(seed + 1))
        fresh.load_state_dict(saved[0])
        opt = torch.optim.SGD(fresh.parameters(), lr=lr)
        sched = _schedule(opt)  # before loading: its first step sets the lr
        opt.load_state_dict(saved[1])
        sched.load_state_dict(saved[2])
        resumed, _, _ = _train(fresh, batches[4:], lr, opt, sched)
    for step, (a, b) in enumerate(zip(resumed, straight)):
        assert torch.equal(a, b), f"step {step} after loading differs (seed {seed})"


def test_launcher_refuses_what_it_cannot_run(tmp_path, capsys):
    launch = _launcher()
    assert launch.main([str(tmp_path)]) == 2
    assert "dlrm_s_pytorch.py not found" in capsys.readouterr().err
    with pytest.raises(ts.InvalidInputError, match="rwsadagrad"):
        with launch.swapped("rwsadagrad"):
            pass
    with launch.swapped("sgd"):
        with pytest.raises(ts.InvalidInputError, match="max_norm"):
            torch.nn.EmbeddingBag(10, 4, max_norm=1.0)
    with pytest.raises(ts.InvalidInputError, match="only with --tierstore-ssd"):
        with launch.swapped("sgd", host_fraction=0.5):
            pass
    with pytest.raises(ts.InvalidInputError, match="--tierstore-host must be in"):
        with launch.swapped("sgd", cache_fraction=0.2, ssd_dir=tmp_path, host_fraction=0.2):
            pass
    assert torch.nn.EmbeddingBag is not launch.DLRMEmbeddingBag  # nothing left swapped
    assert "tierstore_dlrm_launch" not in sys.modules  # the test loads it by path only
