"""The hash functions against an independent uint64 implementation in plain Python ints."""

import numpy as np
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
