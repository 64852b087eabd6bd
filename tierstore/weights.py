"""A table's weights as one dense tensor: ``TieredEmbeddingBag.weight`` and ``_weight``.

A table that fits in memory can be read whole into a copy and written whole, as
``nn.EmbeddingBag.weight`` is (DLRM initialises its tables with ``emb.weight.data = W``). Both
go through the tiers in chunks of :data:`CHUNK_ROWS` rows, so no second copy of the table is
ever made; each row's optimizer state is kept.

Shapes: ``N`` rows (``num_embeddings``), ``D`` embedding dim.
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError
from .validate import check_has_data

CHUNK_ROWS = 1 << 20  # rows per read or write of the whole table


class WeightCopy(torch.Tensor):
    """What ``TieredEmbeddingBag.weight`` returns: a plain copy ``(N, D)`` of the weights,
    except that assigning its ``.data`` writes the table (``emb.weight.data = W``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors

    def __new__(cls, data: torch.Tensor, table):
        copy = torch.Tensor._make_subclass(cls, data, False)
        copy._table = table
        return copy

    @property
    def data(self) -> torch.Tensor:
        """The copy as a plain tensor."""
        return self.as_subclass(torch.Tensor).detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._table.weight = value
        torch.Tensor.data.__set__(self, self._table.weight.data)  # the table's rows, re-read


def check_whole_table(table, what: str) -> None:
    """Refuses a whole-table copy of a table of ``num_embeddings=None`` or one larger than its
    ``weight_max_bytes``."""
    if table.num_embeddings is None:
        raise InvalidInputError(
            f"{what}: a table with num_embeddings=None has no dense weight; use read_rows / "
            "write_rows"
        )
    size = table.num_embeddings * table.embedding_dim * 4
    if size > table.weight_max_bytes:
        raise InvalidInputError(
            f"{what}: the table's weights take {size} bytes, above weight_max_bytes="
            f"{table.weight_max_bytes} (a copy is made); raise it or use read_rows / write_rows"
        )


def read_all(table) -> torch.Tensor:
    """Every row's weights ``(N, D)``, on the table's device."""
    check_whole_table(table, "weight")
    out = torch.empty((table.num_embeddings, table.embedding_dim), device=table.device)
    for lo in range(0, table.num_embeddings, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, table.num_embeddings)
        out[lo:hi] = table.read_rows(torch.arange(lo, hi))
    return out


def check_weight_value(table, value) -> None:
    """Refuses a value for ``weight`` that is not an ``(N, D)`` floating-point tensor."""
    check_whole_table(table, "weight")
    shape = (table.num_embeddings, table.embedding_dim)
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InvalidInputError(f"weight must have shape {shape}, got {got}")
    if not value.is_floating_point():
        raise InvalidInputError(f"weight must be floating point, got {value.dtype}")
    check_has_data(value, "weight")


def write_weights(store, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
    """Writes ``weight (len(ids), D)`` (detached) into rows ``ids`` of ``store`` (default:
    every row, :data:`CHUNK_ROWS` at a time), keeping their optimizer state."""
    if ids is not None:
        parts = [(ids, weight)]
    else:
        parts = (
            (torch.arange(lo, min(lo + CHUNK_ROWS, weight.shape[0])), weight[lo : lo + CHUNK_ROWS])
            for lo in range(0, weight.shape[0], CHUNK_ROWS)
        )
    dim = store.layout.dim
    for part_ids, values in parts:
        values = values.detach()
        if not store.layout.state_width:  # nothing to keep: no read (with L3, a lookup a row)
            store.write_rows(part_ids, values.to(store.device, torch.float32))
            continue
        rows = store.read_rows(part_ids)
        rows[:, :dim] = values.to(rows.device, torch.float32)
        store.write_rows(part_ids, rows)
