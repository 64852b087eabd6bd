"""``TableConfig``: one embedding table of a
:class:`~tierstore.collection.TieredEmbeddingBagCollection`, as TorchRec's
``EmbeddingBagConfig``: a frozen dataclass, validated in ``__post_init__``."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from .errors import InvalidInputError
from .optim import Optimizer

_POOLINGS = ("sum", "mean")


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """One embedding table of a :class:`TieredEmbeddingBagCollection` (as TorchRec's
    ``EmbeddingBagConfig``).

    Args:
        name: the table's name (unique in the collection).
        embedding_dim: ``D_t``, a multiple of 4 (rows then fill whole 16-byte words).
        num_embeddings: rows; ``None`` for any id in ``[0, 2**47)`` (needs the collection's
            ``path``: an SSD tier).
        feature_names: the input features looked up in this table (default: ``(name,)``);
            unique across the collection. Each gives one ``(B, D_t)`` output.
        pooling: ``"sum"`` (default, as TorchRec) or ``"mean"``.
        seed: never-written rows are a deterministic function of (seed, row id); default: the
            CRC-32 of ``name``, so that tables start apart and a table keeps its rows whatever
            its place in the list.
        init_scale: never-written rows are uniform on ``[-init_scale, init_scale)`` (default
            ``1/sqrt(D_t)``).
        optimizer: this table's optimizer, overriding the collection's (tables with different
            optimizers or hyper-parameters go to different groups).
    """

    name: str
    embedding_dim: int
    num_embeddings: int | None
    feature_names: tuple[str, ...] = ()
    pooling: str = "sum"
    seed: int | None = None
    init_scale: float | None = None
    optimizer: Optimizer | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InvalidInputError(f"TableConfig: name must be a non-empty str, got {self.name!r}")
        where = f"table {self.name!r}"
        dim = self.embedding_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 4 or dim % 4:
            raise InvalidInputError(
                f"{where}: embedding_dim must be a positive multiple of 4, got {dim!r}"
            )
        rows = self.num_embeddings
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise InvalidInputError(
                f"{where}: num_embeddings must be a positive int or None, got {rows!r}"
            )
        names = (self.name,) if not self.feature_names else self.feature_names
        if isinstance(names, str) or not all(isinstance(f, str) and f for f in names):
            raise InvalidInputError(
                f"{where}: feature_names must be a list of non-empty str, got {names!r}"
            )
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{where}: feature_names repeat a name: {list(names)}")
        object.__setattr__(self, "feature_names", tuple(names))
        if self.pooling not in _POOLINGS:
            raise InvalidInputError(
                f"{where}: pooling must be one of {_POOLINGS}, got {self.pooling!r}"
            )
        if self.seed is None:
            object.__setattr__(self, "seed", zlib.crc32(self.name.encode()))
        elif not isinstance(self.seed, int):
            raise InvalidInputError(f"{where}: seed must be an int, got {self.seed!r}")
        scale = 1.0 / math.sqrt(dim) if self.init_scale is None else self.init_scale
        if not isinstance(scale, int | float) or not scale > 0:
            raise InvalidInputError(f"{where}: init_scale must be positive, got {scale!r}")
        object.__setattr__(self, "init_scale", float(scale))
        if self.optimizer is not None and not isinstance(self.optimizer, Optimizer):
            raise InvalidInputError(
                f"{where}: optimizer must be a tierstore optimizer, got {self.optimizer!r}"
            )

    def manifest(self, optimizer: Optimizer | None) -> dict:
        """What a collection's directory records of the table (with its optimizer in use)."""
        return {
            "name": self.name,
            "embedding_dim": self.embedding_dim,
            "num_embeddings": self.num_embeddings,
            "feature_names": list(self.feature_names),
            "pooling": self.pooling,
            "seed": self.seed,
            "init_scale": self.init_scale,
            "optimizer": optimizer.to_dict() if optimizer is not None else None,
        }
