"""tierstore: embedding tables larger than GPU memory, at nearly full GPU speed.

A table lives in three tiers: a set-associative LRU/LFU cache of hot rows on the device (L1),
host DRAM (L2) and, optionally, zstd-compressed LMDB on SSD (L3). ``TieredEmbeddingBag`` is a
drop-in ``torch.nn.EmbeddingBag`` whose backward applies a fused sparse optimizer to the rows
wherever they live.
"""

from .cache import SetAssociativeCache
from .errors import (
    CapacityError,
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    ReadOnlyTableError,
    StorageError,
    StorageFullError,
    TableLockedError,
    TableMismatchError,
    TierstoreError,
)
from .graphs import GraphedStep
from .module import TieredEmbeddingBag
from .optim import SGD, Adagrad, Optimizer, RowWiseAdagrad
from .policy import LFU, LRU, Policy
from .stats import CacheStats

__all__ = [
    "TieredEmbeddingBag",
    "GraphedStep",
    "SetAssociativeCache",
    "CacheStats",
    "SGD",
    "Adagrad",
    "RowWiseAdagrad",
    "Optimizer",
    "Policy",
    "LRU",
    "LFU",
    "TierstoreError",
    "InvalidInputError",
    "CapacityError",
    "StorageError",
    "NotATableError",
    "TableMismatchError",
    "CorruptBlockError",
    "StorageFullError",
    "TableLockedError",
    "ReadOnlyTableError",
]
__version__ = "0.1.0"
