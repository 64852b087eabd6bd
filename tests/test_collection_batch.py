"""The collection's batch layout (tierstore/collection_batch.py): the sample-major order of a
group's values against a brute-force reordering of its bags."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore.collection_batch import _sample_major_order


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
