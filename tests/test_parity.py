"""TieredEmbeddingBag as a drop-in nn.EmbeddingBag: its signature and defaults, padding_idx,
mode="max", from_pretrained, _weight, the arguments it refuses, and .to() / .half().

Every numeric test compares against torch.nn.EmbeddingBag and torch.optim on inputs that
hypothesis draws afresh."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_module import snapshot

import tierstore as ts
from tierstore import graphs

SLOW_DRAWS = settings(max_examples=12, deadline=None)


@st.composite
def bags(draw, num: int, padding_idx: int | None = None, max_bags: int = 8, max_len: int = 7):
    """``(indices, offsets)`` of a 1-D batch: random bag lengths (empty bags too), ids with
    repeats, and where ``padding_idx`` is given, many entries equal to it (whole bags too)."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_bags))
    n = sum(lengths)
    pool = st.integers(0, num - 1)
    if padding_idx is not None:
        pool = st.one_of(pool, st.just(padding_idx % num))
    ids = draw(st.lists(pool, min_size=n, max_size=n))
    offsets = [0]
    for length in lengths[:-1]:
        offsets.append(offsets[-1] + length)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def generator(data) -> torch.Generator:
    """torch's random numbers for a hypothesis example, from a drawn seed (replayable)."""
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- the signature
def test_positional_arguments_and_defaults_are_torchs():
    """The constructor's and from_pretrained's positional parameters are nn.EmbeddingBag's, in
    its order and with its defaults; tierstore's own options are keyword-only."""
    for ours, theirs in [
        (ts.TieredEmbeddingBag.__init__, torch.nn.EmbeddingBag.__init__),
        (ts.TieredEmbeddingBag.from_pretrained, torch.nn.EmbeddingBag.from_pretrained),
    ]:
        mine = inspect.signature(ours).parameters
        torchs = inspect.signature(theirs).parameters
        positional = [p for p in mine.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [p.name for p in positional] == list(torchs)
        assert [p.default for p in positional] == [p.default for p in torchs.values()]
        kinds = {p.kind for p in mine.values()} - {inspect.Parameter.POSITIONAL_OR_KEYWORD}
        assert kinds <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}
    forward = inspect.signature(ts.TieredEmbeddingBag.forward).parameters
    assert list(forward) == list(inspect.signature(torch.nn.EmbeddingBag.forward).parameters)


@SLOW_DRAWS
@given(data=st.data(), num=st.integers(2, 40), dim=st.integers(1, 9))
def test_the_default_mode_is_mean(data, num, dim):
    emb = ts.TieredEmbeddingBag(
        num, dim, None, 2.0, False, cache=ts.CacheConfig(rows=5, ways=2), device="cpu"
    )
    assert emb.mode == "mean"
    ref = torch.nn.EmbeddingBag.from_pretrained(emb.read_rows(torch.arange(num)))
    idx, offs = data.draw(bags(num))
    torch.testing.assert_close(emb(idx, offs), ref(idx, offs), rtol=1e-6, atol=1e-7)


def test_an_unknown_keyword_is_a_type_error_and_never_reaches_the_ssd_tier(tmp_path):
    with pytest.raises(TypeError, match="bogus"):
        ts.TieredEmbeddingBag(10, 4, bogus=1, device="cpu")
    with pytest.raises(TypeError, match="bogus"):
        ts.TieredEmbeddingBag(10, 4, ssd=ts.SSDConfig(tmp_path / "t"), bogus=1, device="cpu")
    assert not (tmp_path / "t").exists()
    with pytest.raises(TypeError, match="bogus"):
        ts.TieredEmbeddingBag.from_pretrained(torch.randn(5, 2), bogus=1)


@pytest.mark.parametrize(
    "kwargs",
    [{"block_rows": 4}, {"compression_level": 0}, {"map_size": 1 << 30}, {"io_threads": 2},
     {"host_ways": 8}, {"host_rows": 64}],
)  # fmt: skip
def test_ssd_options_without_a_path_are_refused_by_name(kwargs):
    """(The deprecated flat keywords; an SSDConfig always has its path: tests/test_config.py.)"""
    match = rf"{next(iter(kwargs))}.*SSD tier: give ssd=ts.SSDConfig\(path"
    with pytest.warns(DeprecationWarning), pytest.raises(ts.InvalidInputError, match=match):
        ts.TieredEmbeddingBag(100, 4, device="cpu", **kwargs)


def test_ssd_options_reach_the_tier_and_are_checked_on_reopening(tmp_path):
    path = tmp_path / "t"
    emb = ts.TieredEmbeddingBag(
        100, 4, mode="sum", cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(path, host_rows=64, host_ways=8, block_rows=4, compression_level=0,
                         map_size=1 << 26, io_threads=2),
        device="cpu",
    )  # fmt: skip
    assert emb.store.host.cache.ways == 8
    assert emb.store.host.ssd.meta["block_rows"] == 4
    assert emb.store.host.ssd.meta["compression_level"] == 0
    emb(torch.tensor([1, 2, 3]), torch.tensor([0])).sum().backward()
    emb.flush()
    want = emb.read_rows(torch.arange(100))
    emb.close()
    with pytest.raises(ts.TableMismatchError, match="block_rows=4"):
        ts.TieredEmbeddingBag(
            100, 4, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path, host_rows=64, block_rows=8)
        )
    again = ts.TieredEmbeddingBag(
        100,
        4,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(path, host_rows=64, block_rows=4, compression_level=0),
    )
    assert torch.equal(again.read_rows(torch.arange(100)), want)
    again.close()


# ---------------------------------------------------------------------------- refused arguments
REFUSED = [
    ({"max_norm": 1.0}, "max_norm"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
    ({"mode": "median"}, "mode"),
    ({"dtype": torch.float64}, "dtype"),
    ({"padding_idx": 50}, "padding_idx"),
    ({"padding_idx": -51}, "padding_idx"),
    ({"padding_idx": 1.5}, "padding_idx"),
    ({"_weight": torch.zeros(49, 4)}, "_weight"),
    ({"_weight": torch.zeros(50, 4, dtype=torch.int64)}, "_weight"),
    ({"cache": {"policy": "fifo"}}, "policy"),
    ({"cache": {"ways": 0}}, "ways"),
]


@pytest.mark.parametrize(
    "kwargs, message", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)]
)
def test_refused_arguments_say_why_and_create_nothing(tmp_path, kwargs, message):
    path = tmp_path / "t"
    kwargs = dict(kwargs)
    cache = kwargs.pop("cache", {})  # CacheConfig's options, refused when it is made
    with pytest.raises(ts.InvalidInputError, match=message):
        ts.TieredEmbeddingBag(
            50, 4, cache=ts.CacheConfig(rows=8, **cache), ssd=ts.SSDConfig(path, host_rows=64),
            **kwargs,
        )  # fmt: skip
    assert not path.exists()
    with pytest.raises(ts.InvalidInputError, match=message):
        ts.TieredEmbeddingBag(
            50, 4, cache=ts.CacheConfig(rows=8, **cache), device="cpu", **kwargs
        )  # fmt: skip


def test_refused_from_pretrained_arguments_say_why():
    w = torch.randn(20, 3)
    with pytest.raises(ts.InvalidInputError, match="max_norm"):
        ts.TieredEmbeddingBag.from_pretrained(w, max_norm=2.0)
    with pytest.raises(ts.InvalidInputError, match="scale_grad_by_freq"):
        ts.TieredEmbeddingBag.from_pretrained(w, scale_grad_by_freq=True)
    with pytest.raises(ts.InvalidInputError, match="freeze=False"):
        ts.TieredEmbeddingBag.from_pretrained(w, optimizer=ts.SGD(0.1))
    with pytest.raises(ts.InvalidInputError, match="2-D"):
        ts.TieredEmbeddingBag.from_pretrained(torch.randn(20))


@SLOW_DRAWS
@given(data=st.data(), num=st.integers(2, 30), mode=st.sampled_from(["sum", "mean", "max"]))
def test_sparse_true_is_accepted_and_changes_nothing(data, num, mode):
    idx, offs = data.draw(bags(num))
    g = torch.randn(offs.numel(), 3, generator=generator(data))
    rows = []
    for sparse in (False, True):
        emb = ts.TieredEmbeddingBag(
            num, 3, mode=mode, sparse=sparse, cache=ts.CacheConfig(rows=4, ways=2),
            optimizer=ts.SGD(0.3), device="cpu",
        )  # fmt: skip
        emb(idx, offs).backward(g)
        rows.append(emb.read_rows(torch.arange(num), with_state=True))
    assert torch.equal(rows[0], rows[1])


# ---------------------------------------------------------------------------- padding_idx
@SLOW_DRAWS
@given(
    data=st.data(),
    num=st.integers(2, 40),
    dim=st.integers(1, 6),
    mode=st.sampled_from(["sum", "mean", "max"]),
    cache_rows=st.sampled_from([1, 5, 64]),
    negative=st.booleans(),
    lr=st.floats(0.05, 1.0),
)
def test_padding_idx_forward_and_training_match_torch(
    data, num, dim, mode, cache_rows, negative, lr
):
    """Forward, per-sample-weight gradients and the rows after SGD steps equal
    nn.EmbeddingBag(padding_idx=...) trained by torch.optim.SGD; the padding row never moves."""
    pad = data.draw(st.integers(0, num - 1))
    padding_idx = pad - num if negative else pad
    gen = generator(data)
    w0 = torch.randn(num, dim, generator=gen)
    emb = ts.TieredEmbeddingBag.from_pretrained(
        w0, freeze=False, mode=mode, padding_idx=padding_idx,
        cache=ts.CacheConfig(rows=cache_rows, ways=4), optimizer=ts.SGD(lr), device="cpu",
    )  # fmt: skip
    ref = torch.nn.EmbeddingBag.from_pretrained(
        w0.clone(), freeze=False, mode=mode, sparse=mode != "max", padding_idx=padding_idx
    )
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for _ in range(3):
        idx, offs = data.draw(bags(num, padding_idx))
        g = torch.randn(offs.numel(), dim, generator=gen)
        psw = mine = theirs = None
        if mode == "sum" and data.draw(st.booleans()):
            psw = torch.rand(idx.shape, generator=gen)
            mine, theirs = psw.clone().requires_grad_(), psw.clone().requires_grad_()
        y = emb(idx, offs, mine)
        opt.zero_grad()
        want = ref(idx, offs, per_sample_weights=theirs)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        y.backward(g)
        want.backward(g)
        opt.step()
        if psw is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    got = emb.read_rows(torch.arange(num))
    torch.testing.assert_close(got, ref.weight.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[pad], w0[pad])
    assert int(emb.store.l1.locks.sum()) == 0


def test_a_new_tables_padding_row_is_zero_as_torchs(tmp_path):
    emb = ts.TieredEmbeddingBag(30, 4, padding_idx=-2, cache=ts.CacheConfig(rows=8), device="cpu")
    assert emb.padding_idx == 28
    assert torch.equal(emb.read_rows(torch.tensor([28])), torch.zeros(1, 4))
    assert emb.read_rows(torch.tensor([27])).abs().sum() > 0
    path = tmp_path / "t"
    ssd = ts.TieredEmbeddingBag(
        30, 4, padding_idx=3, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path, host_rows=64)
    )
    assert torch.equal(ssd.read_rows(torch.tensor([3])), torch.zeros(1, 4))
    ssd.write_rows(torch.tensor([3]), torch.ones(1, 4))
    ssd.flush()
    ssd.close()  # a reopened table keeps its row: only a new one starts at zero
    again = ts.TieredEmbeddingBag(
        30, 4, padding_idx=3, cache=ts.CacheConfig(rows=8), ssd=ts.SSDConfig(path, host_rows=64)
    )
    assert torch.equal(again.read_rows(torch.tensor([3])), torch.ones(1, 4))
    again.close()


def test_padding_with_prefetch_2d_input_and_include_last_offset(device):
    num, dim, pad = 40, 5, 7
    w0 = torch.randn(num, dim)
    kw = dict(freeze=False, mode="mean", padding_idx=pad, include_last_offset=True)
    emb = ts.TieredEmbeddingBag.from_pretrained(
        w0, **kw, cache=ts.CacheConfig(rows=6, ways=2), optimizer=ts.SGD(0.5), device=device
    )
    ref = torch.nn.EmbeddingBag.from_pretrained(w0.clone(), **kw, sparse=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(4)
    x2 = torch.randint(0, num, (6, 3), generator=gen)
    x2[0] = pad  # a bag of padding alone
    x2[1, 1] = pad
    idx = torch.randint(0, num, (12,), generator=gen)
    idx[::3] = pad
    offs = torch.tensor([0, 3, 3, 12])
    emb.prefetch(idx.to(device), offs.to(device))
    for inputs in [(idx, offs), (x2.flatten(), torch.arange(0, 19, 3))]:
        y = emb(*(t.to(device) for t in inputs))
        want = ref(*inputs)
        torch.testing.assert_close(y.cpu(), want, rtol=1e-6, atol=1e-6)
        g = torch.randn(want.shape, generator=gen)
        y.backward(g.to(device))
        opt.zero_grad()
        want.backward(g)
        opt.step()
    torch.testing.assert_close(
        emb.read_rows(torch.arange(num)).cpu(), ref.weight.detach(), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------- mode="max"
@SLOW_DRAWS
@given(
    data=st.data(),
    num=st.integers(1, 40),
    dim=st.integers(1, 7),
    cache_rows=st.sampled_from([1, 3, 16, 64]),
    opt=st.sampled_from(["sgd", "adagrad"]),
    two_d=st.booleans(),
)
def test_max_mode_forward_and_training_match_torch(data, num, dim, cache_rows, opt, two_d):
    """mode="max" pools and trains as nn.EmbeddingBag(mode="max") with torch.optim (dense: torch
    has no sparse max), with caches small enough that rows are conflict misses."""
    lr = 0.2
    gen = generator(data)
    w0 = torch.randn(num, dim, generator=gen)
    ours = ts.SGD(lr) if opt == "sgd" else ts.Adagrad(lr)
    emb = ts.TieredEmbeddingBag(
        num, dim, mode="max", _weight=w0, cache=ts.CacheConfig(rows=cache_rows, ways=2),
        optimizer=ours, device="cpu",
    )  # fmt: skip
    ref = torch.nn.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode="max")
    theirs = (torch.optim.SGD if opt == "sgd" else torch.optim.Adagrad)(ref.parameters(), lr=lr)
    for _ in range(3):
        if two_d:
            bags_, length = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
            ids = data.draw(st.lists(st.integers(0, num - 1), min_size=bags_ * length,
                                     max_size=bags_ * length))  # fmt: skip
            inputs = (torch.tensor(ids).view(bags_, length),)
        else:
            inputs = data.draw(bags(num))
        y = emb(*inputs)
        theirs.zero_grad()
        want = ref(*inputs)
        # equal where the rows are (the first step); then as close as the two updates round
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        g = torch.randn(want.shape, generator=gen)
        y.backward(g)
        want.backward(g)
        theirs.step()
    torch.testing.assert_close(
        emb.read_rows(torch.arange(num)), ref.weight.detach(), rtol=1e-5, atol=1e-6
    )
    assert int(emb.store.l1.locks.sum()) == 0


def test_max_mode_on_each_backend_and_its_refusals(device):
    """The generic max path on the device's backend equals the CPU table, and max takes no
    per-sample weights (as torch)."""
    num, dim = 300, 33
    gen = torch.Generator().manual_seed(8)
    kw = dict(
        mode="max", cache=ts.CacheConfig(rows=24, ways=4), optimizer=ts.RowWiseAdagrad(0.1), seed=2
    )
    emb, ref = (
        ts.TieredEmbeddingBag(num, dim, device=device, **kw),
        ts.TieredEmbeddingBag(num, dim, device="cpu", **kw),
    )
    w0 = ref.read_rows(torch.arange(num))
    for step in range(4):
        idx = torch.randint(0, num, (200,), generator=gen)
        offs = torch.sort(torch.randint(0, 200, (20,), generator=gen)).values
        offs[0] = 0
        g = torch.randn(20, dim, generator=gen)
        y = emb(idx.to(device), offs.to(device))
        # Max selects, so the outputs are as equal as the rows: bitwise before the first
        # update, then to float rounding (each backend reduces a row's mean g*g in its order).
        tol = dict(rtol=0, atol=0) if step == 0 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y.cpu(), ref(idx, offs).detach(), **tol)
        y.backward(g.to(device))
        ref(idx, offs).backward(g)
    torch.testing.assert_close(
        emb.read_rows(torch.arange(num), with_state=True).cpu(),
        ref.read_rows(torch.arange(num), with_state=True), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert not torch.equal(ref.read_rows(torch.arange(num)), w0)  # and they trained
    with torch.no_grad():  # an inference forward takes the same path
        torch.testing.assert_close(emb(idx.to(device), offs.to(device)).cpu(), ref(idx, offs))
    before = snapshot(emb, num)
    with pytest.raises(ts.InvalidInputError, match="mode='sum'"):
        emb(idx.to(device), offs.to(device), torch.ones(200, device=device))
    assert same(before, snapshot(emb, num))


# ---------------------------------------------------------------------------- from_pretrained
@SLOW_DRAWS
@given(
    data=st.data(),
    num=st.integers(1, 30),
    dim=st.integers(1, 6),
    mode=st.sampled_from(["sum", "mean", "max"]),
)
def test_from_pretrained_freeze_semantics(data, num, dim, mode):
    """freeze=True (the default): forwards equal torch's frozen table, nothing requires grad
    and no row ever changes; freeze=False trains as torch.optim.SGD on the unfrozen table."""
    gen = generator(data)
    w = torch.randn(num, dim, generator=gen)
    frozen = ts.TieredEmbeddingBag.from_pretrained(
        w, mode=mode, cache=ts.CacheConfig(rows=4), device="cpu"
    )
    ref = torch.nn.EmbeddingBag.from_pretrained(w.clone(), mode=mode)
    assert frozen.optimizer is None
    idx, offs = data.draw(bags(num))
    y = frozen(idx, offs)
    assert not y.requires_grad and not ref(idx, offs).requires_grad
    assert torch.equal(y, ref(idx, offs))
    assert torch.equal(frozen.read_rows(torch.arange(num)), w)

    trained = ts.TieredEmbeddingBag.from_pretrained(
        w,
        freeze=False,
        mode=mode,
        cache=ts.CacheConfig(rows=4, ways=2),
        optimizer=ts.SGD(0.5),
        device="cpu",
    )
    ref = torch.nn.EmbeddingBag.from_pretrained(
        w.clone(), freeze=False, mode=mode, sparse=mode != "max"
    )
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    g = torch.randn(offs.numel(), dim, generator=gen)
    trained(idx, offs).backward(g)
    ref(idx, offs).backward(g)
    opt.step()
    torch.testing.assert_close(
        trained.read_rows(torch.arange(num)), ref.weight.detach(), rtol=1e-5, atol=1e-6
    )


def test_weight_initialises_the_rows(tmp_path):
    w = torch.randn(64, 5, dtype=torch.float64)
    emb = ts.TieredEmbeddingBag(
        64, 5, None, 2.0, False, "sum", False, w, cache=ts.CacheConfig(rows=8)
    )
    assert emb.device == torch.device("cpu")  # torch's default device
    assert torch.equal(emb.read_rows(torch.arange(64)), w.float())
    ssd = ts.TieredEmbeddingBag(
        64,
        5,
        _weight=w,
        cache=ts.CacheConfig(rows=8),
        ssd=ts.SSDConfig(tmp_path / "t", host_rows=64),
    )
    assert torch.equal(ssd.read_rows(torch.arange(64)), w.float())
    ssd.close()
    with pytest.raises(ts.InvalidInputError, match="_weight"):
        ts.TieredEmbeddingBag(
            None,
            5,
            _weight=w,
            cache=ts.CacheConfig(rows=8),
            ssd=ts.SSDConfig(tmp_path / "u", host_rows=64),
        )


# ---------------------------------------------------------------------------- device and dtype
def trained_table(device="cpu", **kw):
    num = 60
    emb = ts.TieredEmbeddingBag(
        num, 6, mode="sum", cache=ts.CacheConfig(rows=8, ways=4), optimizer=ts.Adagrad(0.2), seed=1,
        device=device, **kw,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        idx = torch.randint(0, num, (30,), generator=gen).to(device)
        emb(idx, torch.tensor([0, 10, 10], device=device)).sum().backward()
    return emb, num


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.double(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.float16),
        lambda m: m.to("cpu", torch.float64),
        lambda m: m.type(torch.float64),
        lambda m: torch.nn.Sequential(m).half(),
    ],
    ids=["half", "double", "bfloat16", "to-dtype", "to-device-dtype", "type", "parent"],
)
def test_dtype_conversions_raise_and_change_nothing(convert):
    emb, num = trained_table()
    before = snapshot(emb, num)
    with pytest.raises(ts.InvalidInputError, match="float32"):
        convert(emb)
    assert same(before, snapshot(emb, num))


def test_to_the_same_device_train_and_eval_work():
    emb, num = trained_table()
    before = snapshot(emb, num)
    store = emb.store
    model = torch.nn.Sequential(emb)
    assert model.to("cpu") is model and emb.cpu() is emb and emb.to(torch.device("cpu")) is emb
    assert emb.float() is emb and model.to(torch.float32) is model
    assert emb.store is store  # nothing moved
    model.eval()
    assert not emb.training
    model.train()
    assert emb.training
    assert same(before, snapshot(emb, num))


@pytest.mark.parametrize("ssd", [False, True])
def test_moving_the_cache_keeps_every_row(tmp_path, ssd):
    """The move's rebuild (dirty L1 rows written back, L1 made anew over the same L2/L3),
    exercised from the CPU to the CPU: training goes on bitwise as a table that never moved."""
    kw = {"ssd": ts.SSDConfig(tmp_path / "t", host_rows=64)} if ssd else {}
    emb, num = trained_table(**kw)
    ref, _ = trained_table()
    stats = emb.stats()
    assert int(emb.store.l1.dirty.sum()) > 0
    old = emb.store
    emb._move_to(torch.device("cpu"))
    assert emb.store is not old and emb.store.host is old.host
    assert int(emb.store.l1.dirty.sum()) == 0
    assert emb.stats().requested == stats.requested
    if ssd:  # the old L1's pins on L2 went with it
        assert int(emb.store.host.cache.locks.sum()) == 0
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        idx = torch.randint(0, num, (30,), generator=gen)
        g = torch.randn(3, 6, generator=gen)
        emb(idx, torch.tensor([0, 4, 20])).backward(g)
        ref(idx, torch.tensor([0, 4, 20])).backward(g)
    rows = torch.arange(num)
    assert torch.equal(emb.read_rows(rows, with_state=True), ref.read_rows(rows, with_state=True))
    if ssd:
        emb.close()


def test_moving_with_a_batch_in_flight_is_refused():
    emb, num = trained_table()
    y = emb(torch.tensor([1, 2, 3]), torch.tensor([0]))  # its backward has not run
    before = snapshot(emb, num)
    with pytest.raises(ts.InvalidInputError, match="in flight"):
        emb._move_to(torch.device("cpu"))
    assert same(before, snapshot(emb, num))
    y.sum().backward()
    emb.prefetch(torch.tensor([4, 5]), torch.tensor([0]))
    with pytest.raises(ts.InvalidInputError, match="in flight"):
        emb._move_to(torch.device("cpu"))


@pytest.mark.gpu
def test_to_cuda_and_back_keeps_training_exact():
    emb, num = trained_table("cpu")
    ref, _ = trained_table("cpu")
    model = torch.nn.Sequential(emb).to("cuda")
    assert emb.device.type == "cuda" and emb.store.l1.weights.is_cuda
    assert emb.store.host.data.is_pinned()
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        if step == 2:
            emb.cpu()
            assert emb.device.type == "cpu"
        idx = torch.randint(0, num, (30,), generator=gen)
        g = torch.randn(3, 6, generator=gen)
        offs = torch.tensor([0, 4, 20])
        emb(idx.to(emb.device), offs.to(emb.device)).backward(g.to(emb.device))
        ref(idx, offs).backward(g)
    torch.testing.assert_close(
        emb.read_rows(torch.arange(num), with_state=True).cpu(),
        ref.read_rows(torch.arange(num), with_state=True), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert model[0] is emb


def test_generic_paths_refuse_a_graph_capture(monkeypatch):
    """padding_idx and mode="max" run as torch ops that read the device: a GraphedStep capture
    of them is refused by name, before anything is recorded."""
    monkeypatch.setattr(graphs._capturing, "forwards", [], raising=False)
    for kw, name in [({"padding_idx": 0}, "padding_idx"), ({"mode": "max"}, "max")]:
        emb = ts.TieredEmbeddingBag(20, 4, cache=ts.CacheConfig(rows=8), device="cpu", **kw)
        with pytest.raises(ts.InvalidInputError, match=f"cannot be captured: .*{name}"):
            emb(torch.tensor([[1, 2]]))
    assert graphs._capturing.forwards == []
