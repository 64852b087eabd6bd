"""The hash functions against an independent uint64 implementation in plain Python ints."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore.hashing import initial_weights, mix64, seed_key, set_index

M64 = (1 << 64) - 1


def py_mix64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def to_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


ids64 = st.integers(min_value=-(1 << 63) + 1, max_value=(1 << 63) - 1)


@given(st.lists(ids64, min_size=1, max_size=50))
def test_mix64_matches_unsigned_reference(xs):
    got = mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [to_signed(py_mix64(x)) for x in xs]


@given(st.lists(ids64, min_size=1, max_size=50), st.integers(1, (1 << 31) - 1))
def test_set_index_is_multiply_shift_of_high_bits(xs, sets):
    got = set_index(torch.tensor(xs, dtype=torch.int64), sets).tolist()
    assert got == [((py_mix64(x) >> 32) * sets) >> 32 for x in xs]
    assert all(0 <= s < sets for s in got)


@settings(deadline=None)  # the first example loads the compiled loop
@given(
    st.lists(ids64, min_size=1, max_size=20, unique=True), st.integers(0, 2**40), st.integers(1, 40)
)
def test_initial_weights_match_reference(xs, seed, dim):
    scale = 0.37
    got = initial_weights(torch.tensor(xs), dim, seed, scale)
    key = seed_key(seed) & M64
    golden = 0x9E3779B97F4A7C15
    want = np.empty((len(xs), dim), dtype=np.float32)
    for i, x in enumerate(xs):
        row_key = py_mix64((x & M64) ^ key)
        for j in range(dim):
            u = py_mix64(row_key + (j + 1) * golden) >> 40
            want[i, j] = (np.float32(u) * np.float32(2.0**-23) - np.float32(1.0)) * np.float32(
                scale
            )
    assert np.array_equal(got.numpy(), want)
    assert got.abs().max() <= scale


def test_initial_weights_depend_on_seed_and_look_uniform():
    ids = torch.arange(20000)
    a = initial_weights(ids, 16, seed=1, scale=1.0)
    assert torch.equal(a, initial_weights(ids, 16, seed=1, scale=1.0))
    assert not torch.equal(a, initial_weights(ids, 16, seed=2, scale=1.0))
    assert abs(float(a.mean())) < 0.01 and abs(float(a.var()) - 1 / 3) < 0.01


@given(st.lists(ids64, min_size=1, max_size=50))
def test_numpy_mix64_matches(xs):
    from tierstore.hashing import mix64_np

    got = mix64_np(np.array(xs, dtype=np.int64).view(np.uint64)).tolist()
    assert got == [py_mix64(x) for x in xs]


@settings(deadline=None)  # a wide sketch allocates up to 256 MB of counters: no timing here
@given(st.lists(ids64, min_size=1, max_size=50), st.integers(1, 1 << 24))
def test_sketch_positions_match_reference(xs, width):
    """The count-min sketch's counter positions (numpy on the CPU) are the multiply-shift of
    mix64(id ^ salt), the formula kernels/sketch.cu computes."""
    from tierstore.policy import FrequencySketch

    sketch = FrequencySketch(width, sample_size=10)
    got = sketch.positions(torch.tensor(xs, dtype=torch.int64)).tolist()
    salts = [s & M64 for s in sketch.salts.tolist()]
    assert got == [[((py_mix64(x ^ s) >> 32) * width) >> 32 for x in xs] for s in salts]


@settings(deadline=None)  # the first example compiles the loop
@given(
    st.lists(ids64, min_size=0, max_size=200),
    st.integers(0, 2**62),
    st.integers(1, 140),
    st.floats(2.0**-20, 8.0, width=32),
)
def test_compiled_initial_weights_are_the_torch_form_bit_for_bit(xs, seed, dim, scale):
    from tierstore.hashing import _initial_weights_torch

    ids = torch.tensor(xs, dtype=torch.int64)
    got = initial_weights(ids, dim, seed, scale)
    want = _initial_weights_torch(ids, dim, seed, scale)
    assert got.dtype == torch.float32 and got.shape == (len(xs), dim)
    assert torch.equal(got, want)
    fits = (ids >= -(2**31)) & (ids < 2**31)  # int32 ids give the rows of the same int64 ids
    assert torch.equal(initial_weights(ids[fits].to(torch.int32), dim, seed, scale), want[fits])


@pytest.mark.parametrize("width_extra", [0, 1, 5])
def test_host_table_holds_the_initial_rows(monkeypatch, width_extra):
    """The whole table filled in place, in many small chunks on several threads: every row
    is its hashed initial value (and the optimizer's initial state after it)."""
    from tierstore import host
    from tierstore.hashing import _initial_weights_torch
    from tierstore.store import RowLayout, initial_rows

    monkeypatch.setattr(host, "_INIT_CHUNK_BYTES", 4 * 64 * 37)  # 37 rows of 64 floats a chunk
    layout = RowLayout(64 - width_extra, width_extra, 0.25)
    num_rows = 37 * 11 + 5  # a part chunk at the end
    table = host.HostTable(
        num_rows,
        layout.width,
        lambda ids: initial_rows(ids, layout, 3, 0.5, torch.device("cpu")),
    )
    assert table.data.shape == (num_rows, 64)
    want = _initial_weights_torch(torch.arange(num_rows), layout.dim, 3, 0.5)
    assert torch.equal(table.data[:, : layout.dim], want)
    assert bool((table.data[:, layout.dim :] == 0.25).all())


def test_in_memory_table_starts_at_the_hashed_initial_rows():
    import tierstore as ts
    from tierstore.hashing import _initial_weights_torch

    emb = ts.TieredEmbeddingBag(5000, 24, device="cpu", seed=11, optimizer=ts.RowWiseAdagrad(0.1))
    rows = emb.read_rows(torch.arange(5000), with_state=True)
    assert torch.equal(rows[:, :24], _initial_weights_torch(torch.arange(5000), 24, 11, 24**-0.5))
    assert torch.equal(rows[:, 24:], torch.zeros(5000, 1))
