"""The key of a row of a multi-table trace in one cache shared by the tables: (table, id) in
one int64.

The key is ``(table << 47) | id``, the key :class:`~tierstore.TieredEmbeddingBagCollection`
gives a row in a group that holds an unbounded table (``collection.TAG_SHIFT``), exact while
every id of the trace lies in ``[0, 2**47)``. Otherwise (hashed 64-bit feature ids, Criteo's
16-digit hex) the low 47 bits are a hash of the id (``mix64``, a bijection, cut to 47 bits),
and two distinct ids of one table share a key with probability about ``n**2 / 2**48`` for ``n``
distinct ids in the table. Either way ``key >> 47`` is the table, and keys are non-negative
(never the caches' empty tag).
"""

from __future__ import annotations

import numpy as np

from ..collection import MAX_TAGGED_TABLES, TAG_SHIFT
from ..errors import InvalidInputError
from ..hashing import mix64_np

KEY_SHIFT = TAG_SHIFT
MAX_TABLES = MAX_TAGGED_TABLES


def table_keys(tables: np.ndarray, ids: np.ndarray, n_tables: int) -> tuple[np.ndarray, bool]:
    """The shared cache's key of each request (``tables``, ``ids``: ``(n,)`` int64 each) and
    whether the keys are exact (every id in ``[0, 2**47)``) rather than hashed. One table
    keeps its ids as they are (the single-table replay's keys)."""
    if n_tables == 1:
        return ids, True
    if n_tables > MAX_TABLES:
        raise InvalidInputError(f"a shared replay keys at most {MAX_TABLES} tables, got {n_tables}")
    exact = ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 1 << KEY_SHIFT)
    if exact:
        low = ids
    else:
        low = (mix64_np(ids.view(np.uint64)) >> np.uint64(64 - KEY_SHIFT)).view(np.int64)
    return (tables.astype(np.int64) << KEY_SHIFT) | low, exact


def key_tables(keys, n_tables: int):
    """The table of each key (numpy or torch, on its device)."""
    return keys * 0 if n_tables == 1 else keys >> KEY_SHIFT
