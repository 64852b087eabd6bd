"""The collection's batch layout (tierstore/collection_batch.py): the sample-major order of a
group's values against a brute-force reordering of its bags, and the names of a batch's parts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_collection import FakeKJT

from tierstore.collection_batch import (
    _per_value,
    _sample_major_order,
    batch_key,
    named_batch_parts,
)


@settings(max_examples=60, deadline=None)
@given(
    features=st.integers(1, 4),
    samples=st.integers(0, 6),
    data=st.data(),
)
def test_sample_major_order_moves_each_bag_whole(features, samples, data):
    lengths = torch.tensor(
        data.draw(
            st.lists(st.integers(0, 3), min_size=features * samples, max_size=features * samples)
        ),  # fmt: skip
        dtype=torch.int64,
    ).view(features, samples)
    n = int(lengths.sum())
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.reshape(-1).cumsum(0)])
    want = []  # bag (f, b) of the feature-major values, sample by sample
    for b in range(samples):
        for f in range(features):
            bag = f * samples + b
            want.extend(range(int(starts[bag]), int(starts[bag + 1])))
    assert _sample_major_order(lengths, n).tolist() == want


@settings(max_examples=80, deadline=None)
@given(
    segments=st.lists(
        st.tuples(st.integers(-(2**40), 2**40), st.integers(0, 4)), min_size=1, max_size=12
    )
)
def test_per_value_repeats_each_entry_over_its_segment(segments):
    """Empty segments anywhere (first, last, in runs) and entries of any sign: the values of
    ``repeat_interleave``, brute force."""
    per = torch.tensor([v for v, _ in segments], dtype=torch.int64)
    seg = torch.tensor([k for _, k in segments], dtype=torch.int64)
    want = [v for v, k in segments for _ in range(k)]
    assert _per_value(per, seg, len(want)).tolist() == want


def test_named_batch_parts_name_each_tensor_as_the_user_gave_it():
    """What a refusal names (``lengths``, a feature's offsets, a KeyedJaggedTensor's method),
    in the order of ``batch_key``, which identifies a prefetched batch by the same parts."""
    v, n, o, w = (torch.randperm(6) for _ in range(4))
    keyword = named_batch_parts(None, ["a", "b"], v, n, None, w)
    assert keyword == [("keys", ("a", "b")), ("values", v), ("lengths", n), ("offsets", None),
                       ("weights", w)]  # fmt: skip
    as_dict = named_batch_parts({"a": (v, o), "b": (n, o, w)}, None, None, None, None, None)
    assert [name for name, _ in as_dict] == [
        "feature names", "feature 'a' indices", "feature 'a' offsets",
        "feature names", "feature 'b' indices", "feature 'b' offsets", "feature 'b' weights",
    ]  # fmt: skip
    assert [part for _, part in as_dict][4] is n
    kjt = named_batch_parts(FakeKJT(["a"], v, n), None, None, None, None, None)
    assert [name for name, _ in kjt][:3] == [
        "KeyedJaggedTensor.keys()", "KeyedJaggedTensor.values()", "KeyedJaggedTensor.lengths()"
    ]  # fmt: skip
    assert kjt[1][1] is v and kjt[2][1] is n
    for batch in ((None, ["a", "b"], v, n, None, w), ({"a": (v, o)}, None, None, None, None, None)):
        assert batch_key(*batch) == tuple(part for _, part in named_batch_parts(*batch))
