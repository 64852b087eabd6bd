"""A collection of one group prepares its batch before reading the batch's checks (so that on
CUDA the host does not wait): any lengths, however wrong, must still give either the right
output or an ``InvalidInputError`` with nothing changed, never another error from an op that
left its bounds. Hypothesis draws the lengths, ids and key order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_collection import assert_same, snapshot

import tierstore as ts
from tierstore.errors import InvalidInputError
from tierstore.keyed import safe_lengths

TABLES = [
    ts.TableConfig(name="a", embedding_dim=4, num_embeddings=9, feature_names=["a1", "a2"]),
    ts.TableConfig(name="b", embedding_dim=4, num_embeddings=5, pooling="mean"),
]
FEATURES = ["a1", "a2", "b"]


@settings(max_examples=60, deadline=None)
@given(
    bags=st.integers(0, 3),
    lengths=st.lists(st.integers(-2, 3), min_size=9, max_size=9),
    extra=st.integers(-2, 2),
    ids=st.lists(st.integers(-1, 9), min_size=30, max_size=30),
    order=st.permutations(FEATURES),
)
def test_any_lengths_give_the_output_or_a_clean_refusal(bags, lengths, extra, ids, order):
    col = ts.TieredEmbeddingBagCollection(
        TABLES, cache=ts.CacheConfig(rows=4, ways=2), device="cpu"
    )
    ref = ts.TieredEmbeddingBagCollection(
        TABLES, cache=ts.CacheConfig(rows=40, ways=2), device="cpu"
    )
    assert len(col.groups) == 1
    lens = torch.tensor(lengths[: 3 * bags], dtype=torch.int64)
    n = max(0, int(lens.clamp(min=0).sum()) + extra)
    values = torch.tensor(ids[:n], dtype=torch.int64)
    if values.numel() < n:
        values = torch.cat([values, torch.zeros(n - values.numel(), dtype=torch.int64)])
    batch = dict(keys=list(order), values=values, lengths=lens)
    limits = {"a1": 9, "a2": 9, "b": 5}
    valid = bool((lens >= 0).all()) and int(lens.sum()) == n
    if valid:  # then each feature's ids against its table
        counts = lens.view(3, bags).sum(1).tolist() if bags else [0, 0, 0]
        for f, part in zip(order, values.split(counts), strict=True):
            valid = valid and bool(((part >= 0) & (part < limits[f])).all())
    before = snapshot(col)
    try:
        out = col(**batch)
    except InvalidInputError:
        assert not valid, "a valid batch was refused"
        assert_same(before, snapshot(col))
        return
    assert valid, "an invalid batch was accepted"
    want = ref(**batch)
    assert torch.equal(out.values(), want.values())


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(-5, 5), max_size=8), n=st.integers(0, 12))
def test_safe_lengths_are_in_bounds_and_exact_when_valid(lengths, n):
    lens = torch.tensor(lengths, dtype=torch.int64)
    safe = safe_lengths(lens, n)
    assert safe.shape == lens.shape
    if lens.numel():
        assert bool((safe >= 0).all()) and int(safe.sum()) == n
    if bool((lens >= 0).all()) and int(lens.sum()) == n:
        assert torch.equal(safe, lens)
