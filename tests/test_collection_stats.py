"""``col.stats()`` per table against a brute-force count: for every step, each table's ids
are uniqued and looked up in the set of rows its group's L1 held just before the step (a
hit) or just after it (a miss that was not filled there is a conflict miss). Tables share
groups, caches are small, and the per-table counters must sum to each group's."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_collection import as_keyword, make_batch

import tierstore as ts
from tierstore.cache import EMPTY, by_slot

FIELDS = ("requested", "unique", "hits", "misses", "conflict_misses")


def cached_rows(group) -> set[int]:
    tags = by_slot(group.store.l1.tags)
    return set(tags[tags != EMPTY].tolist())


@st.composite
def shared_tables(draw):
    """Two to five tables, most of them sharing a dim (and so a group)."""
    tables = []
    for i in range(draw(st.integers(2, 5))):
        tables.append(
            ts.TableConfig(
                name=f"t{i}",
                embedding_dim=draw(st.sampled_from([4, 4, 4, 8])),
                num_embeddings=draw(st.integers(1, 25)),
                feature_names=[f"t{i}f{j}" for j in range(draw(st.integers(1, 2)))],
            )
        )
    return tables


@settings(max_examples=25, deadline=None)
@given(
    tables=shared_tables(),
    cache_rows=st.integers(2, 30),
    ways=st.sampled_from([1, 2, 4]),
    policy=st.sampled_from(["lru", "lfu"]),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_table_counts_match_a_brute_force_count(tables, cache_rows, ways, policy, train, seed):
    gen = torch.Generator().manual_seed(seed)
    col = ts.TieredEmbeddingBagCollection(
        tables, cache=ts.CacheConfig(rows=cache_rows, ways=ways, policy=policy), device="cpu"
    )
    col.train(train)
    want = {t.name: dict.fromkeys(FIELDS, 0) for t in tables}
    where = {t.name: col._layout.table_at[t.name] for t in tables}
    for _ in range(4):
        batch = make_batch(gen, tables, int(torch.randint(0, 6, (1,), generator=gen)))
        before = {g.name: cached_rows(g) for g in col.groups}
        kt = col(**as_keyword(batch, col.feature_keys))
        after = {g.name: cached_rows(g) for g in col.groups}  # rows stay locked until backward
        for t in tables:
            g, k = where[t.name]
            ids = torch.cat([batch[f][0] for f in t.feature_names]) + g.bases[k]
            unique = set(ids.tolist())
            hits = unique & before[g.name]
            misses = unique - hits
            w = want[t.name]
            w["requested"] += ids.numel()
            w["unique"] += len(unique)
            w["hits"] += len(hits)
            w["misses"] += len(misses)
            w["conflict_misses"] += len(misses - after[g.name])
        if train:
            kt.values().sum().backward()
    stats = col.stats()
    for t in tables:
        got = {f: getattr(stats.tables[t.name], f) for f in FIELDS}
        assert got == want[t.name], f"table {t.name} (seed {seed})"
        assert stats.table(t.name) is stats.tables[t.name]
        assert stats.requested[t.name] == want[t.name]["requested"]
    for g in col.groups:  # a group's tables together make the group's counts
        for f in FIELDS:
            total = sum(getattr(stats.tables[t.name], f) for t in g.tables)
            assert total == getattr(stats.groups[g.name], f), f"{f} of group {g.name}"
    rb = {t.name: where[t.name][0].store.layout.row_bytes for t in tables}
    for t in tables:
        s = stats.tables[t.name]
        assert s.bytes_l2_to_l1 == (s.misses - s.conflict_misses) * rb[t.name]
        assert s.bytes_l2_read_direct == s.conflict_misses * rb[t.name]
    col.reset_stats()
    assert all(s.requested == 0 and s.hits == 0 for s in col.stats().tables.values())
