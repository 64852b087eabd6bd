"""The fused optimizer as torch code sees it: train()/eval(), ``fused_optimizer`` under
``torch.optim.lr_scheduler`` (against ``nn.EmbeddingBag`` + ``torch.optim`` with the same
schedule), ``CombinedOptimizer``, ``torch.optim`` classes as ``optimizer=``, ``.weight`` and
``close()``. Fresh random batches each run; the seed is in every failure message."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import tierstore as ts
from tierstore.errors import InvalidInputError

N, D = 200, 8


def _seeded():
    seed = random.randrange(1 << 32)
    return seed, torch.Generator().manual_seed(seed)


def _batch(gen, bags=10, max_len=6):
    lengths = torch.randint(1, max_len + 1, (bags,), generator=gen)
    w = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.05  # repeats within a batch
    idx = torch.multinomial(w, int(lengths.sum()), replacement=True, generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    return idx, offsets


def _table(device, optimizer=ts.SGD(lr=0.1), **kw):  # noqa: B008
    return ts.TieredEmbeddingBag(N, D, mode="sum", cache=ts.CacheConfig(rows=24, ways=8),
                                 optimizer=optimizer, device=device, seed=5, **kw)  # fmt: skip


def _rows(emb):
    return emb.read_rows(torch.arange(N)).cpu()


def _reference(emb):
    """``nn.EmbeddingBag`` with the same initial weights, sparse gradients (as DLRM's)."""
    w0 = _rows(emb)
    return torch.nn.EmbeddingBag.from_pretrained(w0, freeze=False, mode="sum", sparse=True)


# ----------------------------------------------------------------------- train() and eval()
def test_eval_and_no_grad_never_change_rows(device):
    seed, gen = _seeded()
    emb = _table(device)
    dense = torch.nn.Parameter(torch.randn(D, generator=gen).to(device))
    before = _rows(emb)
    emb.eval()
    idx, offs = _batch(gen)
    y = emb(idx, offs)
    assert not y.requires_grad  # an inference step for the table: nothing to update
    assert int(emb.store.l1.locks.sum()) == 0, f"eval forward holds locks (seed {seed})"
    (y * dense).sum().backward()  # the dense part still trains
    assert dense.grad is not None
    assert torch.equal(_rows(emb), before), f"eval() changed rows (seed {seed})"
    emb.train()
    with torch.no_grad():
        emb(idx, offs)
    assert torch.equal(_rows(emb), before), f"no_grad changed rows (seed {seed})"
    emb(idx, offs).sum().backward()  # back in train(): the rows move
    assert not torch.equal(_rows(emb), before)


def test_eval_forward_then_train_backward_does_not_update(device):
    """The mode is read at forward: a batch looked up in eval() never updates its rows."""
    seed, gen = _seeded()
    emb = _table(device)
    psw = torch.rand(40, generator=gen)
    idx, offs = _batch(gen, bags=8, max_len=5)
    psw = psw[: idx.numel()].to(device).requires_grad_(True)
    before = _rows(emb)
    ref = _reference(emb)
    emb.eval()
    y = emb(idx, offs, psw)  # per-sample weights want a grad: the batch keeps its rows
    emb.train()
    g = torch.randn(y.shape, generator=gen)
    y.backward(g.to(device))
    assert torch.equal(_rows(emb), before), f"eval-mode forward updated rows (seed {seed})"
    p2 = psw.detach().cpu().clone().requires_grad_(True)
    ref(idx, offs, per_sample_weights=p2).backward(g)
    torch.testing.assert_close(psw.grad.cpu(), p2.grad, rtol=1e-5, atol=1e-6)
    assert int(emb.store.l1.locks.sum()) == 0


# ----------------------------------------------------------------------- schedulers
SCHEDULES = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4),
    "exp": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (ts.SGD(lr=0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
        (ts.Adagrad(lr=0.3, eps=1e-6), lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-6)),
    ],
    ids=["sgd", "adagrad"],
)
def test_scheduler_on_fused_optimizer_matches_torch(device, schedule, ours, theirs):
    seed, gen = _seeded()
    emb = _table(device, optimizer=ours)
    ref = _reference(emb)
    ref_opt = theirs(ref.parameters())
    sched, ref_sched = SCHEDULES[schedule](emb.fused_optimizer), SCHEDULES[schedule](ref_opt)
    for step in range(6):
        idx, offs = _batch(gen)
        g = torch.randn(offs.numel(), D, generator=gen)
        emb(idx.to(device), offs.to(device)).backward(g.to(device))
        emb.fused_optimizer.step()
        sched.step()
        ref_opt.zero_grad()
        ref(idx, offs).backward(g)
        ref_opt.step()
        ref_sched.step()
        assert emb.fused_optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        torch.testing.assert_close(
            _rows(emb), ref.weight.detach(), rtol=1e-5, atol=1e-6,
            msg=lambda m, step=step: f"step {step} (seed {seed}): {m}",
        )  # fmt: skip
    assert emb.optimizer.lr == pytest.approx(ref_opt.param_groups[0]["lr"])


def test_lr_is_read_at_backward(device):
    """A change between forward and backward applies to that backward (as torch.optim.step)."""
    seed, gen = _seeded()
    emb = _table(device, optimizer=ts.SGD(lr=0.1))
    ref = _reference(emb)
    idx, offs = _batch(gen)
    y = emb(idx.to(device), offs.to(device))
    emb.fused_optimizer.param_groups[0]["lr"] = 0.0  # a warm-up's first step
    y.sum().backward()
    assert torch.equal(_rows(emb), ref.weight.detach()), f"lr 0 moved rows (seed {seed})"
    emb.fused_optimizer.param_groups[0]["lr"] = 2.0
    emb(idx.to(device), offs.to(device)).sum().backward()
    ref(idx, offs).sum().backward()
    expected = ref.weight.detach() - 2.0 * ref.weight.grad.to_dense()
    torch.testing.assert_close(_rows(emb), expected, rtol=1e-5, atol=1e-6)


def test_bad_hyper_parameters_raise_before_anything_changes():
    emb = _table("cpu", optimizer=ts.Adagrad(lr=0.1, initial_accumulator_value=0.5))
    idx, offs = _batch(torch.Generator().manual_seed(0))
    before = emb.read_rows(torch.arange(N), with_state=True)
    group = emb.fused_optimizer.param_groups[0]
    group["lr"] = -1.0
    with pytest.raises(InvalidInputError, match="lr"):
        emb(idx, offs).sum().backward()
    group["lr"] = 0.1
    group["initial_accumulator_value"] = 0.0
    with pytest.raises(InvalidInputError, match="initial_accumulator_value"):
        emb(idx, offs).sum().backward()
    assert torch.equal(emb.read_rows(torch.arange(N), with_state=True), before)
    assert int(emb.store.l1.locks.sum()) == 0


# ----------------------------------------------------------------------- optimizer object
def test_fused_optimizer_is_a_torch_optimizer():
    emb = _table("cpu", optimizer=ts.Adagrad(lr=0.2, eps=1e-8))
    opt = emb.fused_optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert (group["params"], group["lr"], group["eps"]) == ([], 0.2, 1e-8)
    before = _rows(emb)
    opt.zero_grad()
    assert opt.step() is None
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0  # a closure runs; the rows do not move
    assert torch.equal(_rows(emb), before)
    with pytest.raises(InvalidInputError, match="one param group"):
        opt.add_param_group({"params": [], "lr": 1.0})
    with pytest.raises(InvalidInputError, match="set when the table is made"):
        emb.optimizer = ts.SGD(lr=1.0)


def test_a_tensor_lr_changed_in_place_reaches_the_next_backward():
    """torch's schedulers fill a tensor lr in place; the rule reads its value each time."""
    seed, gen = _seeded()
    emb = _table("cpu", optimizer=ts.SGD(lr=0.1))
    ref = _reference(emb)
    emb.fused_optimizer.param_groups[0]["lr"] = torch.tensor(0.5)
    emb.fused_optimizer.param_groups[0]["lr"].fill_(0.25)
    idx, offs = _batch(gen)
    emb(idx, offs).sum().backward()
    ref(idx, offs).sum().backward()
    expected = ref.weight.detach() - 0.25 * ref.weight.grad.to_dense()
    torch.testing.assert_close(_rows(emb), expected, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


def test_fused_optimizer_state_dict_round_trip():
    emb = _table("cpu", optimizer=ts.Adagrad(lr=0.2, eps=1e-8))
    sched = torch.optim.lr_scheduler.StepLR(emb.fused_optimizer, step_size=1, gamma=0.5)
    emb.fused_optimizer.step()
    sched.step()
    saved = emb.fused_optimizer.state_dict()
    other = _table("cpu", optimizer=ts.Adagrad(lr=0.9))
    other.fused_optimizer.load_state_dict(saved)
    assert other.optimizer == ts.Adagrad(lr=0.1, eps=1e-8)
    sgd = _table("cpu", optimizer=ts.SGD(lr=0.9))
    sgd_saved = sgd.fused_optimizer.state_dict()
    with pytest.raises(InvalidInputError, match="eps"):
        other.fused_optimizer.load_state_dict(sgd_saved)
    assert other.optimizer == ts.Adagrad(lr=0.1, eps=1e-8)
    sgd.fused_optimizer.load_state_dict(saved)  # extra entries are ignored: lr is SGD's
    assert sgd.optimizer == ts.SGD(lr=0.1)


def test_combined_optimizer_trains_as_one_torch_optimizer(device):
    """A table and a dense layer under one scheduler, against nn.EmbeddingBag + nn.Linear
    under one torch.optim.SGD and the same scheduler: losses and weights equal every step."""
    seed, gen = _seeded()
    emb = _table(device, optimizer=ts.SGD(lr=0.2))
    ref_emb = _reference(emb)
    linear = torch.nn.Linear(D, 1)
    ref_linear = torch.nn.Linear(D, 1)
    ref_linear.load_state_dict(linear.state_dict())
    linear.to(device)
    combined = ts.CombinedOptimizer(
        [torch.optim.SGD(linear.parameters(), lr=0.2), emb.fused_optimizer]
    )
    ref_opt = torch.optim.SGD([*ref_emb.parameters(), *ref_linear.parameters()], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(combined, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for step in range(5):
        idx, offs = _batch(gen)
        target = torch.randn(offs.numel(), 1, generator=gen)
        combined.zero_grad()
        loss = torch.nn.functional.mse_loss(
            linear(emb(idx.to(device), offs.to(device))), target.to(device)
        )
        loss.backward()
        combined.step()
        sched.step()
        ref_opt.zero_grad()
        ref_loss = torch.nn.functional.mse_loss(ref_linear(ref_emb(idx, offs)), target)
        ref_loss.backward()
        ref_opt.step()
        ref_sched.step()
        torch.testing.assert_close(loss.cpu(), ref_loss, msg=f"step {step} (seed {seed})")
    assert [g["lr"] for g in combined.param_groups] == [0.05, 0.05]
    torch.testing.assert_close(_rows(emb), ref_emb.weight.detach(), rtol=1e-5, atol=1e-6)
    saved = combined.state_dict()
    fresh_emb = _table(device, optimizer=ts.SGD(lr=1.0))
    fresh = ts.CombinedOptimizer(
        [torch.optim.SGD(linear.parameters(), lr=1.0), fresh_emb.fused_optimizer]
    )
    fresh.load_state_dict(saved)
    assert fresh_emb.optimizer == ts.SGD(lr=0.05)
    assert fresh.param_groups[0]["lr"] == 0.05
    with pytest.raises(InvalidInputError, match="2 state"):
        fresh.load_state_dict({"optimizers": [saved["optimizers"][0]]})


# ----------------------------------------------------------------------- torch.optim classes
@pytest.mark.parametrize(
    "spec, theirs",
    [
        ((torch.optim.SGD, {"lr": 0.3}), lambda p: torch.optim.SGD(p, lr=0.3)),
        (torch.optim.SGD, lambda p: torch.optim.SGD(p)),  # torch's own default lr
        (
            (torch.optim.Adagrad, {"lr": 0.2, "eps": 1e-7, "initial_accumulator_value": 0.1}),
            lambda p: torch.optim.Adagrad(p, lr=0.2, eps=1e-7, initial_accumulator_value=0.1),
        ),
        (
            (torch.optim.SGD, {"lr": 0.3, "momentum": 0.0, "foreach": False}),
            lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.0, foreach=False),
        ),
    ],
    ids=["sgd", "sgd-defaults", "adagrad", "sgd-harmless"],
)
def test_torch_optim_class_trains_as_torch(device, spec, theirs):
    seed, gen = _seeded()
    emb = _table(device, optimizer=spec)
    ref = _reference(emb)
    ref_opt = theirs(ref.parameters())
    for _ in range(4):
        idx, offs = _batch(gen)
        g = torch.randn(offs.numel(), D, generator=gen)
        emb(idx.to(device), offs.to(device)).backward(g.to(device))
        ref_opt.zero_grad()
        ref(idx, offs).backward(g)
        ref_opt.step()
    torch.testing.assert_close(
        _rows(emb), ref.weight.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {seed}: {m}"
    )
    if isinstance(ref_opt, torch.optim.Adagrad):
        state = emb.read_rows(torch.arange(N), with_state=True)[:, D:].cpu()
        torch.testing.assert_close(state, ref_opt.state[ref.weight]["sum"].to_dense())


@pytest.mark.parametrize(
    "spec, message",
    [
        ((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), "momentum"),
        ((torch.optim.SGD, {"lr": 0.1, "weight_decay": 1e-4}), "weight_decay"),
        ((torch.optim.SGD, {"lr": 0.1, "maximize": True}), "maximize"),
        ((torch.optim.Adagrad, {"lr_decay": 0.1}), "lr_decay"),
        ((torch.optim.Adagrad, {"weight_decay": 0.1}), "weight_decay"),
        ((torch.optim.SGD, {"lr": 0.1, "betas": (0.9, 0.99)}), "takes no"),
        ((torch.optim.Adam, {"lr": 0.1}), "no fused update"),
        ((torch.optim.SGD, {"lr": -0.1}), "lr"),
        ("sgd", "optimizer must be"),
    ],
)
def test_unsupported_torch_optim_arguments_are_refused(spec, message):
    with pytest.raises(InvalidInputError, match=message):
        _table("cpu", optimizer=spec)


# ----------------------------------------------------------------------- .weight
def test_weight_reads_and_writes_every_row(device):
    seed, gen = _seeded()
    emb = _table(device, optimizer=ts.Adagrad(lr=0.1))
    idx, offs = _batch(gen)
    emb(idx.to(device), offs.to(device)).sum().backward()  # some rows in L1, dirty
    state = emb.read_rows(torch.arange(N), with_state=True)[:, D:].cpu()
    assert torch.equal(emb.weight.cpu(), _rows(emb))
    assert torch.equal(emb.weight.data.cpu(), _rows(emb))
    assert type(emb.weight.data) is torch.Tensor
    w = torch.randn(N, D, generator=gen, requires_grad=True)
    emb.weight.data = w * 2  # DLRM's initialisation: a tensor with autograd history
    assert torch.equal(_rows(emb), (w * 2).detach()), f"seed {seed}"
    assert torch.equal(emb.read_rows(torch.arange(N), with_state=True)[:, D:].cpu(), state)
    v = torch.randn(N, D, generator=gen, dtype=torch.float64)
    emb.weight = v
    assert torch.equal(_rows(emb), v.float())
    copy = emb.weight
    copy.add_(1.0)  # a copy: in-place changes stay there
    assert torch.equal(_rows(emb), v.float())
    y = emb(idx.to(device), offs.to(device))  # the forward reads what was written
    ref = torch.nn.EmbeddingBag.from_pretrained(v.float(), mode="sum")
    torch.testing.assert_close(y.cpu(), ref(idx, offs))


def test_weight_refuses_bad_values_and_unbounded_tables(tmp_path):
    emb = _table("cpu")
    before = _rows(emb)
    with pytest.raises(InvalidInputError, match=r"shape \(200, 8\)"):
        emb.weight = torch.zeros(N - 1, D)
    with pytest.raises(InvalidInputError, match="floating point"):
        emb.weight.data = torch.zeros(N, D, dtype=torch.int64)
    assert torch.equal(_rows(emb), before)
    emb.weight_max_bytes = N * D * 4 - 1
    with pytest.raises(InvalidInputError, match="weight_max_bytes"):
        emb.weight  # noqa: B018
    hashed = ts.TieredEmbeddingBag(
        None, D, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(tmp_path / "t"), device="cpu"
    )
    with pytest.raises(InvalidInputError, match="num_embeddings=None"):
        hashed.weight  # noqa: B018
    hashed.close()


# ----------------------------------------------------------------------- close()
def test_close_warns_when_it_drops_training_and_flushes_when_asked(tmp_path):
    seed, gen = _seeded()
    kw = dict(mode="sum", cache=ts.CacheConfig(rows=16), device="cpu", seed=5)
    emb = ts.TieredEmbeddingBag(
        N, D, ssd=ts.SSDConfig(tmp_path / "a", host_rows=64), optimizer=ts.SGD(lr=0.5), **kw
    )
    initial = _rows(emb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trained yet: nothing to warn about
        emb.close()
    emb = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "a", host_rows=64), cache=ts.CacheConfig(rows=16), device="cpu"
    )
    for _ in range(3):
        idx, offs = _batch(gen)
        emb(idx, offs).sum().backward()
    trained = _rows(emb)
    assert not torch.equal(trained, initial)
    with pytest.warns(UserWarning, match="flush"):
        emb.close()  # drops the training, and says so
    again = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "a", host_rows=64), cache=ts.CacheConfig(rows=16), device="cpu"
    )
    assert torch.equal(_rows(again), initial), f"seed {seed}"
    again.weight = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.close(flush=True)
    third = ts.TieredEmbeddingBag.open(
        ts.SSDConfig(tmp_path / "a", host_rows=64), cache=ts.CacheConfig(rows=16), device="cpu"
    )
    assert torch.equal(_rows(third), trained), f"close(flush=True) lost rows (seed {seed})"
    third.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flushed: nothing dropped
        third.close()


# ----------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
def test_graphed_step_follows_the_scheduler_and_refuses_a_mode_change():
    """The kernels read lr from a device scalar: a GraphedStep replays each step with the lr a
    scheduler set since, bit for bit as the eager step; eval() after capture is refused."""
    seed, gen = _seeded()
    kw = dict(mode="sum", cache=ts.CacheConfig(rows=64, ways=8), device="cuda", seed=5,
              optimizer=ts.RowWiseAdagrad(lr=0.2))  # fmt: skip
    eager, graphed = ts.TieredEmbeddingBag(N, D, **kw), ts.TieredEmbeddingBag(N, D, **kw)
    scheds = [
        torch.optim.lr_scheduler.StepLR(t.fused_optimizer, step_size=1, gamma=0.5)
        for t in (eager, graphed)
    ]
    step = ts.GraphedStep(lambda ids, g: graphed(ids).backward(g))
    for _ in range(6):
        ids = torch.multinomial(torch.ones(N), 64, replacement=True, generator=gen)
        ids, g = ids.view(16, 4).cuda(), torch.randn(16, D, generator=gen).cuda()
        eager(ids).backward(g)
        step(ids, g)
        for t, s in zip((eager, graphed), scheds):
            t.fused_optimizer.step()
            s.step()
    torch.cuda.synchronize()
    ids = torch.arange(N, device="cuda")
    a, b = eager.read_rows(ids, with_state=True), graphed.read_rows(ids, with_state=True)
    assert torch.equal(a, b), f"graphed rows differ from eager (seed {seed})"
    graphed.eval()
    with pytest.raises(InvalidInputError, match=r"captured in train\(\) mode"):
        step(ids[:64].view(16, 4), g)
