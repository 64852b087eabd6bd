"""The exceptions tierstore raises. Every message names the argument, path or limit at fault.

All derive from :class:`TierstoreError`; input problems are also ``ValueError`` and storage
problems also ``OSError``, so code written against torch's exceptions keeps working.
"""

from __future__ import annotations


class TierstoreError(Exception):
    """Base class of every error tierstore raises on purpose."""


class InvalidInputError(TierstoreError, ValueError):
    """Indices, offsets, weights or rows that the table cannot accept (nothing was changed)."""


class CapacityError(TierstoreError, MemoryError):
    """A tier is too small for what was asked: host memory for L2, or ``host_rows`` for a batch."""


class StorageError(TierstoreError, OSError):
    """A problem with the SSD tier's LMDB directory; the message names the path."""


class NotATableError(StorageError):
    """The directory exists but holds no tierstore table."""


class TableMismatchError(StorageError):
    """The table on disk was made with another shape, dtype, optimizer or format version."""


class CorruptBlockError(StorageError):
    """Stored data is damaged: a block or metadata value fails its checksum or does not
    decode, the B-tree around a block is damaged, metadata is out of range, or ``data.mdb``
    is shorter than LMDB's own header says. Nothing read from it is returned."""


class StorageFullError(StorageError):
    """The LMDB map or the disk is full; the write was rolled back."""


class TableLockedError(StorageError):
    """Another process holds the table open for writing."""


class InternalError(TierstoreError, RuntimeError):
    """An invariant of the engine does not hold (a bug in tierstore, not in the caller's input);
    the message names the invariant and the values found."""


class NotPicklableError(TierstoreError, TypeError):
    """A table was pickled or deep-copied: its rows live in the tiers; use ``state_dict``."""


class ReadOnlyTableError(StorageError):
    """The table was opened read-only: training, ``write_rows`` and ``flush`` are refused."""


class FallbackWarning(UserWarning):
    """A policy or optimizer declares no implementation for a fast path (``cuda_functor``,
    ``compiled_score``): its torch specification runs there instead, with the same results,
    more slowly (and, on CUDA, reading the device: no CUDA graph)."""
