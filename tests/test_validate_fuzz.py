"""Random inputs, good and bad, against the four CPU table configurations (forward, and
prefetch then forward).

Every input is either accepted, and then the output is ``nn.EmbeddingBag``'s over the rows the
table held (the independent reference), or refused with a tierstore error that leaves the
table exactly as it was: rows, optimizer state, stats, and every tensor and counter of the L1
cache, the L2 cache and its frequency sketch. An input that torch refuses must be refused.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import tierstore as ts
from tierstore.errors import TierstoreError

N, D = 64, 4
CASES = 80  # per table; two tables (with and without include_last_offset) per configuration


def make_table(config: str, policy: str, include_last_offset: bool, tmp_path):
    opts = dict(
        mode="sum",
        cache=ts.CacheConfig(rows=8, ways=4, policy=policy),
        device="cpu",
        optimizer=ts.Adagrad(0.1),
        include_last_offset=include_last_offset,
    )
    if config == "ssd":
        opts.update(
            ssd=ts.SSDConfig(tmp_path / f"{policy}{int(include_last_offset)}", host_rows=24)
        )
    return ts.TieredEmbeddingBag(N, D, **opts)


def _state_of(obj, prefix: str, out: dict) -> None:
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.clone()
        elif isinstance(value, (int, float, bool)):
            out[prefix + name] = value


def snapshot(emb) -> dict:
    """Everything a refused input must leave unchanged."""
    store = emb.store
    out = {
        "rows": emb.read_rows(torch.arange(N), with_state=True),
        "stats": dataclasses.asdict(emb.stats()),
        "prefetched": len(emb._queue),
    }
    parts = {"store.": store, "l1.": store.l1, "host.": store.host}
    if getattr(store.l1, "sketch", None) is not None:
        parts["l1.sketch."] = store.l1.sketch
    host_cache = getattr(store.host, "cache", None)
    if host_cache is not None:
        parts["l2."] = host_cache
        if getattr(host_cache, "sketch", None) is not None:
            parts["l2.sketch."] = host_cache.sketch
    for prefix, obj in parts.items():
        _state_of(obj, prefix, out)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.flatten().view(torch.uint8)


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):  # bit for bit (unused slots may hold NaNs)
            assert torch.equal(_bits(value), _bits(after[key])), key
        else:
            assert value == after[key], key


def _ids(rng: random.Random, n: int, dtype) -> torch.Tensor:
    """``n`` ids of ``dtype``, one of them out of the table now and then."""
    values = [rng.randrange(N) for _ in range(n)]
    pick = rng.random()
    if n and pick < 0.1:
        values[rng.randrange(n)] = -rng.randrange(1, 5)
    elif n and pick < 0.2:
        values[rng.randrange(n)] = N + rng.randrange(3)
    return torch.tensor(values, dtype=torch.int64).to(dtype)


def random_input(rng: random.Random) -> tuple:
    """``(indices, offsets, per_sample_weights, train)``: mostly plausible, often wrong."""
    dtype = rng.choice([torch.int64] * 12 + [torch.int32] * 6 + [torch.int16, torch.float32])
    if rng.random() < 0.2:  # 2-D (B, L)
        bags, length = rng.randrange(0, 4), rng.randrange(0, 4)
        indices = _ids(rng, bags * length, dtype).reshape(bags, length)
        offsets = None if rng.random() < 0.9 else torch.tensor([0])
    else:
        n = rng.choice([0, 1, 2, 5, 9, 9, 24])  # 24: may overflow an L2 set (CapacityError)
        indices = _ids(rng, n, dtype)
        kind = rng.choice(
            ["valid"] * 16
            + ["empty", "only_n", "only_0", "not_from_0", "decreasing", "past_n", "none", "2d"]
            + ["int16", "meta"]
        )
        cuts = sorted(rng.randrange(0, n + 1) for _ in range(rng.randrange(0, 4)))
        offs = [0, *cuts]
        if rng.random() < 0.6:
            offs.append(n)
        if kind == "empty":
            offs = []
        elif kind == "only_n":
            offs = [n]
        elif kind == "only_0":
            offs = [0]
        elif kind == "not_from_0":
            offs = [1 + rng.randrange(3), *offs[1:]]
        elif kind == "decreasing" and len(offs) > 1:
            offs = [0, n + 1, n]
        elif kind == "past_n":
            offs = [*offs, n + 1 + rng.randrange(3)]
        offsets = torch.tensor(offs, dtype=torch.int64)
        if kind == "none":
            offsets = None
        elif kind == "2d":
            offsets = offsets.reshape(1, -1)
        elif kind == "int16":
            offsets = offsets.to(torch.int16)
        elif kind == "meta":
            offsets = offsets.to("meta")
    if rng.random() < 0.02:
        indices = indices.to("meta")
    psw = None
    if rng.random() < 0.3:
        shape = tuple(indices.shape)
        if rng.random() < 0.1:
            shape = (indices.numel() + 1,)
        wdtype = rng.choice([torch.float32] * 8 + [torch.float64, torch.int64])
        psw = torch.rand(shape).to(wdtype)
    return indices, offsets, psw, rng.random() < 0.6


def torch_reference(rows, indices, offsets, psw, include_last_offset):
    """``nn.EmbeddingBag``'s output over ``rows``, or the exception it raises."""
    if indices.dim() == 2 and indices.shape[1] == 0 and offsets is None:
        # B empty bags: torch fails making their offsets (a step of 0); each pools to zeros
        return torch.zeros(indices.shape[0], D)
    bag = torch.nn.EmbeddingBag.from_pretrained(
        rows[:, :D].clone(), mode="sum", include_last_offset=include_last_offset
    )
    try:
        return bag(indices, offsets, psw)
    except Exception as e:  # noqa: BLE001 - torch's refusal, compared below
        return e


@pytest.mark.parametrize("config", ["memory", "ssd"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_refused_inputs_change_nothing(config, policy, tmp_path):
    rng = random.Random(f"{config}-{policy}")
    refused = accepted = capacity = 0
    for include_last_offset in (False, True):
        emb = make_table(config, policy, include_last_offset, tmp_path)
        for case in range(CASES):
            indices, offsets, psw, train = random_input(rng)
            before = snapshot(emb)
            try:
                if psw is None and rng.random() < 0.2:  # a prefetch checks as forward does
                    emb.prefetch(indices, offsets)
                with torch.set_grad_enabled(train):
                    out = emb(indices, offsets, psw)
            except TierstoreError as e:
                refused += 1
                capacity += isinstance(e, ts.CapacityError)
                assert_same(before, snapshot(emb))
                continue
            accepted += 1
            want = torch_reference(before["rows"], indices, offsets, psw, include_last_offset)
            assert not isinstance(want, Exception), f"case {case}: torch refuses: {want}"
            assert torch.allclose(out, want, rtol=1e-6, atol=1e-6), f"case {case}"
            if train:
                out.backward(torch.randn_like(out))
        emb.close()
    assert refused > 30 and accepted > 30  # the generator covers both kinds
    assert capacity > 0 or config == "memory"  # and batches that overflow an L2 set


@pytest.mark.parametrize("config", ["memory", "ssd"])
def test_refused_row_writes_change_nothing(config, tmp_path):
    emb = make_table(config, "lru", False, tmp_path)
    emb(torch.tensor([1, 2, 3]), torch.tensor([0, 2])).backward(torch.ones(2, D))
    before = snapshot(emb)
    bad = [
        (torch.tensor([1, 1]), torch.ones(2, D)),  # duplicate ids
        (torch.tensor([1, N]), torch.ones(2, D)),  # out of range
        (torch.tensor([-1]), torch.ones(1, D)),
        (torch.tensor([1, 2]), torch.ones(2, D + 1)),  # wrong shape
        (torch.tensor([1]), torch.ones(1, D, dtype=torch.int64)),  # not floating point
        (torch.tensor([1], device="meta"), torch.ones(1, D)),
        (torch.tensor([1]), torch.ones(1, D, device="meta")),
        (torch.tensor([1.0]), torch.ones(1, D)),
    ]
    for ids, values in bad:
        with pytest.raises(TierstoreError):
            emb.write_rows(ids, values)
        assert_same(before, snapshot(emb))
    emb.close()


def test_write_rows_detaches_values_that_require_grad():
    emb = make_table("memory", "lru", False, None)
    w = torch.randn(3, D, requires_grad=True)
    values = w * 2  # a non-leaf with an autograd history
    emb.write_rows(torch.tensor([4, 5, 6]), values)
    got = emb.read_rows(torch.tensor([4, 5, 6]))
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, values.detach())
    assert not emb.store.l1.weights.requires_grad and not emb.store.host.data.requires_grad
    # training goes on with no graph growing through the table's storage
    emb(torch.tensor([4, 5]), torch.tensor([0])).backward(torch.ones(1, D))
    assert emb.read_rows(torch.tensor([4, 5])).grad_fn is None
    pre = ts.TieredEmbeddingBag.from_pretrained(values, device="cpu", cache=ts.CacheConfig(rows=2))
    assert pre.read_rows(torch.arange(3)).grad_fn is None
    assert torch.equal(pre.read_rows(torch.arange(3)), values.detach())


def test_meta_tensors_are_refused_clearly():
    emb = make_table("memory", "lru", False, None)
    for call in (
        lambda: emb(torch.tensor([1, 2], device="meta"), torch.tensor([0])),
        lambda: emb(torch.tensor([[1, 2]], device="meta")),
        lambda: emb(torch.tensor([1, 2]), torch.tensor([0], device="meta")),
        lambda: emb.read_rows(torch.tensor([1], device="meta")),
        lambda: ts.TieredEmbeddingBag.from_pretrained(torch.ones(4, D, device="meta")),
    ):
        with pytest.raises(ts.InvalidInputError, match="meta"):
            call()
