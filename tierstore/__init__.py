"""tierstore: embedding tables larger than GPU memory, at nearly full GPU speed.

A table lives in three tiers: a set-associative LRU/LFU cache of hot rows on the device (L1),
host DRAM (L2) and, optionally, zstd-compressed LMDB on SSD (L3). ``TieredEmbeddingBag`` is a
drop-in ``torch.nn.EmbeddingBag`` whose backward applies a fused sparse optimizer to the rows
wherever they live.
"""

from .cache import SetAssociativeCache
from .checkpoint import (
    dcp_load,
    incremental_state_dict,
    mark_checkpoint,
    sparse_state_dict,
    spill_state_dict,
)
from .collection import CollectionStats, TableConfig, TieredEmbeddingBagCollection
from .config import CacheConfig, SSDConfig
from .errors import (
    CapacityError,
    CorruptBlockError,
    InvalidInputError,
    NotATableError,
    NotPicklableError,
    ReadOnlyTableError,
    StorageError,
    StorageFullError,
    TableLockedError,
    TableMismatchError,
    TierstoreError,
)
from .fused_optimizer import CombinedOptimizer, FusedOptimizer
from .graphs import GraphedStep
from .keyed import KeyedTensor
from .module import TieredEmbeddingBag
from .optim import SGD, Adagrad, Optimizer, RowWiseAdagrad
from .pipeline import prefetching
from .policy import LFU, LRU, Policy
from .stats import CacheStats

__all__ = [
    "TieredEmbeddingBag",
    "TieredEmbeddingBagCollection",
    "TableConfig",
    "CacheConfig",
    "SSDConfig",
    "KeyedTensor",
    "CollectionStats",
    "GraphedStep",
    "prefetching",
    "SetAssociativeCache",
    "CacheStats",
    "SGD",
    "Adagrad",
    "RowWiseAdagrad",
    "Optimizer",
    "FusedOptimizer",
    "CombinedOptimizer",
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
    "NotPicklableError",
    "incremental_state_dict",
    "mark_checkpoint",
    "spill_state_dict",
    "sparse_state_dict",
    "dcp_load",
    "ReadOnlyTableError",
]
__version__ = "0.1.0"
