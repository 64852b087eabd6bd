"""A table's options: the L1 cache's and the SSD tier's as dataclasses, and the checks of the
``nn.EmbeddingBag`` arguments, all made before anything is built.

``CacheConfig`` (L1) and ``SSDConfig`` (L3 and the L2 cache over it) hold documented defaults
and check their values in ``__post_init__``, in the manner of TorchRec's configs: a bad value
raises :class:`InvalidInputError` naming the config and the option. They are plain frozen
values, so one config may serve several tables.

The flat keywords of earlier versions (``cache_rows=``, ``ways=``, ``policy=``, ``path=``,
``host_rows=``, ...) still work, through :func:`from_flat_keywords`, with a
``DeprecationWarning`` that names the config to use instead.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import warnings
from dataclasses import KW_ONLY, dataclass

import torch

from .cache import EMPTY, cache_shape
from .errors import InvalidInputError, TableMismatchError
from .policy import Policy, make_policy
from .ssd import SSDTier

MODES = ("sum", "mean", "max")
DEFAULT_CACHE_FRACTION = 0.2  # L1's share of a table's rows unless told (FBGEMM's load factor)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(config, name: str, low: int, high: int | None = None) -> None:
    """Refuses ``config.name`` unless an integer in ``[low, high]``; keeps it as an ``int``
    (numpy integers are taken)."""
    value = getattr(config, name)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"in [{low}, {high}]"
        where = type(config).__name__
        raise InvalidInputError(f"{where}: {name} must be an int {span}, got {value!r}")
    object.__setattr__(config, name, int(value))


@dataclass(frozen=True)
class CacheConfig:
    """L1: the set-associative cache of hot rows on the table's device.

    Args:
        rows: rows L1 holds, rounded up to whole sets of ``ways`` (default ``None``: 20 % of
            the table's rows, FBGEMM's cache load factor; required for a table of
            ``num_embeddings=None``).
        ways: associativity (default 32; ``ways >= rows`` is fully associative). The CUDA
            kernels take at most 64.
        policy: the replacement policy, ``"lru"`` (default) or ``"lfu"``, or a
            :class:`~tierstore.Policy`.

    Example::

        >>> import tierstore as ts
        >>> ts.CacheConfig(rows=5_000, policy="lfu")
        CacheConfig(rows=5000, ways=32, policy='lfu')
    """

    rows: int | None = None
    ways: int = 32
    policy: str | Policy = "lru"

    def __post_init__(self):
        if self.rows is not None:
            _check_int(self, "rows", 1)
        _check_int(self, "ways", 1)
        try:
            make_policy(self.policy)
        except InvalidInputError as e:
            raise InvalidInputError(f"CacheConfig: {e}") from None

    def rows_for(self, num_embeddings: int | None) -> int:
        """L1's rows for a table of ``num_embeddings`` rows (``rows``, or the default share)."""
        if self.rows is not None:
            return self.rows
        if num_embeddings is None:
            raise InvalidInputError(
                "a table of num_embeddings=None needs CacheConfig(rows=...): 20 % of an "
                "unbounded table is no size"
            )
        return max(1, math.ceil(DEFAULT_CACHE_FRACTION * num_embeddings))


@dataclass(frozen=True)
class SSDConfig:
    """L3, the table on SSD (an LMDB environment), and L2, the cache in host memory over it.

    Args:
        path: the table's directory: created if it holds no table, else reopened.

    Keyword-only:
        host_rows: L2's rows (default ``None``: ``max(4 * L1 capacity, 65536)``). L2 must hold
            every row L1 holds plus the unique rows of every batch in flight.
        host_ways: L2's associativity (default 32).
        block_rows: rows per compressed block, a power of two in ``[1, 65536]``. Fixed when
            the table is created: ``None`` (default) is 1 for a new table and the stored value
            for an existing one, which a value given must equal.
        compression_level: the blocks' zstd level in ``[-7, 22]``, 0 = stored raw. Fixed at
            creation as ``block_rows``: ``None`` (default) is 3 for a new table.
        map_size: the LMDB map's size in bytes (default 1 TiB: address space, not disk).
        io_threads: threads reading and compressing blocks (default 4).
        io_processes: reader processes that look up the block keys of large L3 reads (default
            0: none, all in this process). py-lmdb holds the GIL per key, so more threads do
            not speed lookups up; processes do (spawned at the first read of a few thousand
            blocks, stopped when the table closes; see ``tierstore.ssd_readers``).
        read_only: open an existing table without its writer lock, beside a process that may
            be writing it (default ``False``): reads see the latest completed flush;
            training, ``write_rows`` and ``flush`` raise :class:`ReadOnlyTableError`.

    Example::

        >>> import tierstore as ts
        >>> ts.SSDConfig("/tmp/users.tier", host_rows=1 << 16).host_ways
        32
    """

    path: str | os.PathLike
    _: KW_ONLY
    host_rows: int | None = None
    host_ways: int = 32
    block_rows: int | None = None
    compression_level: int | None = None
    map_size: int = 1 << 40
    io_threads: int = 4
    read_only: bool = False
    io_processes: int = 0

    def __post_init__(self):
        where = "SSDConfig"
        if not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path):
            raise InvalidInputError(f"{where}: path must be a directory path, got {self.path!r}")
        object.__setattr__(self, "path", pathlib.Path(self.path))
        if self.host_rows is not None:
            _check_int(self, "host_rows", 1)
        _check_int(self, "host_ways", 1)
        if self.block_rows is not None:
            _check_int(self, "block_rows", 1, 1 << 16)
            if self.block_rows & (self.block_rows - 1):
                raise InvalidInputError(
                    f"{where}: block_rows must be a power of two, got {self.block_rows}"
                )
        if self.compression_level is not None:
            _check_int(self, "compression_level", -7, 22)
        _check_int(self, "map_size", 1)
        _check_int(self, "io_threads", 1)
        _check_int(self, "io_processes", 0)
        if not isinstance(self.read_only, bool):
            raise InvalidInputError(f"{where}: read_only must be a bool, got {self.read_only!r}")

    def holds_table(self) -> bool:
        """Whether ``path`` is something to reopen (a table, or an error) rather than to
        create: the rule of ``host_cache.open_host_cache``."""
        path = self.path
        return path.exists() and (not path.is_dir() or any(path.iterdir()))

    def tier_options(self, fresh: bool) -> dict:
        """The SSD tier's keywords for ``host_cache.open_host_cache`` (all but ``host_rows``).
        A table to reopen (not ``fresh``) keeps its block format: a ``block_rows`` or
        ``compression_level`` given must be its own (:class:`TableMismatchError`)."""
        created = {
            name: value
            for name in ("block_rows", "compression_level")
            if (value := getattr(self, name)) is not None
        }
        if not fresh and created:
            stored = SSDTier.read_meta(self.path)
            for name, value in created.items():
                if stored.get(name) != value:
                    raise TableMismatchError(
                        f"{self.path}: the table was created with {name}={stored.get(name)!r}, "
                        f"not {value!r} (fixed at creation: leave {name} out to reopen it)"
                    )
        options = {"host_ways": self.host_ways, "read_only": self.read_only}
        options.update(map_size=self.map_size, io_threads=self.io_threads)
        if self.io_processes:
            options.update(io_processes=self.io_processes)
        if fresh:
            options.update(created)
        return options


# ----------------------------------------------------------------- the deprecated flat keywords
_CACHE_KEYWORDS = {"cache_rows": "rows", "ways": "ways", "policy": "policy"}
_SSD_KEYWORDS = (
    "path", "host_rows", "host_ways", "block_rows", "compression_level", "map_size",
    "io_threads", "read_only",
)  # fmt: skip
# Flat values that meant "the default" (``None``), left out of the config they go to
_NONE_MEANT_DEFAULT = {"cache_rows", "path", "host_rows", "block_rows", "compression_level",
                       "map_size"}  # fmt: skip
# SSD keywords that were accepted without a path at these values (their defaults then)
_HARMLESS_WITHOUT_PATH = {"host_ways": 32, "io_threads": 4, "read_only": False}


def from_flat_keywords(
    caller: str,
    flat: dict,
    cache: CacheConfig | None,
    ssd: SSDConfig | None,
    path: str | os.PathLike | None = None,
) -> tuple[CacheConfig | None, SSDConfig | None]:
    """``(cache, ssd)`` with the deprecated flat keywords ``flat`` of ``caller`` folded in,
    warning once per call (``DeprecationWarning``, pointing at the caller's caller). An
    unknown keyword is a ``TypeError``, as Python's own; a config and its flat keywords
    together, or SSD keywords without a path, are refused. ``path`` is where a
    :meth:`TieredEmbeddingBag.open` already knows the table is."""
    if not flat:
        return cache, ssd
    unknown = sorted(set(flat) - set(_CACHE_KEYWORDS) - set(_SSD_KEYWORDS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    cache_flat = {k: v for k, v in flat.items() if k in _CACHE_KEYWORDS}
    ssd_flat = {k: v for k, v in flat.items() if k in _SSD_KEYWORDS}
    wanted = []
    if cache_flat:
        fields = ", ".join(f"{v}=..." for k, v in _CACHE_KEYWORDS.items() if k in cache_flat)
        wanted.append(f"cache=ts.CacheConfig({fields})")
    if ssd_flat:
        fields = ", ".join(["path"] + [f"{k}=..." for k in _SSD_KEYWORDS[1:] if k in ssd_flat])
        wanted.append(f"{'open(' if path else 'ssd='}ts.SSDConfig({fields}){')' if path else ''}")
    warnings.warn(
        f"{caller}(): the keywords {', '.join(sorted(flat))} are deprecated; pass "
        + " and ".join(wanted),
        DeprecationWarning,
        stacklevel=3,
    )
    given = {k: v for k, v in flat.items() if not (k in _NONE_MEANT_DEFAULT and v is None)}
    cache_given = {_CACHE_KEYWORDS[k]: v for k, v in given.items() if k in _CACHE_KEYWORDS}
    ssd_given = {k: v for k, v in given.items() if k in _SSD_KEYWORDS}
    if cache_flat and cache is not None:
        raise InvalidInputError(
            f"{caller}(): give cache= or {sorted(cache_flat)}, not both (those are CacheConfig's)"
        )
    if cache_given:
        cache = CacheConfig(**cache_given)
    if ssd_flat and ssd is not None:
        raise InvalidInputError(
            f"{caller}(): give ssd= or {sorted(ssd_flat)}, not both (those are SSDConfig's)"
        )
    if path is not None:
        ssd_given.setdefault("path", path)
    if "path" not in ssd_given:
        harmless = _HARMLESS_WITHOUT_PATH
        ssd_given = {k: v for k, v in ssd_given.items() if k not in harmless or harmless[k] != v}
    if ssd_given:
        if "path" not in ssd_given:
            raise InvalidInputError(
                f"{sorted(ssd_given)} only apply with an SSD tier: give ssd=ts.SSDConfig(path, ...)"
            )
        ssd = SSDConfig(**ssd_given)
    return cache, ssd


def configs_to_open(
    caller: str, ssd: SSDConfig | str | os.PathLike, flat: dict, cache: CacheConfig | None
) -> tuple[CacheConfig | None, SSDConfig]:
    """``(cache, ssd)`` for an ``open(ssd, ...)`` of a table or collection: ``ssd`` is its
    directory or an :class:`SSDConfig` naming it, with the deprecated flat keywords ``flat``
    folded in (:func:`from_flat_keywords`; ``path`` among them is a ``TypeError``)."""
    if "path" in flat:
        raise TypeError(f"{caller}() got multiple values for the path (its first argument)")
    ssd_config, path = (ssd, None) if isinstance(ssd, SSDConfig) else (None, ssd)
    cache, ssd_config = from_flat_keywords(caller, flat, cache, ssd_config, path)
    return cache, ssd_config or SSDConfig(path)


# ----------------------------------------------------------------- nn.EmbeddingBag's arguments
def check_bag_arguments(
    num_embeddings: int | None,
    embedding_dim: int,
    max_norm: float | None,
    scale_grad_by_freq: bool,
    mode: str,
    weight: torch.Tensor | None,
    padding_idx: int | None,
    dtype: torch.dtype | None,
    ssd: SSDConfig | None,
) -> int | None:
    """Refuses what a table cannot take of ``nn.EmbeddingBag``'s arguments, each by name with
    the reason (:class:`InvalidInputError`); returns ``padding_idx`` as a row id (negative
    counted from the end, as torch) or ``None``."""
    if max_norm is not None:
        raise InvalidInputError(
            f"max_norm={max_norm!r} is not supported: nn.EmbeddingBag renormalises the rows a "
            "forward reads, in place, where tierstore's rows change only through the fused "
            "optimizer and write_rows (a lookup never writes a tier); leave max_norm=None"
        )
    if scale_grad_by_freq:
        raise InvalidInputError(
            "scale_grad_by_freq=True is not supported: the fused optimizer applies each row's "
            "gradient summed over the batch, unscaled; leave scale_grad_by_freq=False"
        )
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype is not None and dtype != torch.float32:
        raise InvalidInputError(
            f"dtype must be torch.float32 (the only row type so far), got {dtype}"
        )
    if not _is_int(embedding_dim) or embedding_dim < 1:
        raise InvalidInputError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if num_embeddings is None and ssd is None:
        raise InvalidInputError(
            "num_embeddings=None (any int64 id) needs an SSD tier: give ssd=ts.SSDConfig(path)"
        )
    if num_embeddings is not None and num_embeddings < 1:
        raise InvalidInputError(f"num_embeddings must be positive, got {num_embeddings}")
    _check_weight(weight, num_embeddings, embedding_dim)
    return _padding_row(padding_idx, num_embeddings)


def _padding_row(padding_idx, num_embeddings: int | None) -> int | None:
    if padding_idx is None:
        return None
    if not _is_int(padding_idx):
        raise InvalidInputError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if num_embeddings is None:  # any int64 id is a row
        if not EMPTY < padding_idx < 2**63:
            raise InvalidInputError(f"padding_idx must be an int64 above -2**63, got {padding_idx}")
        return padding_idx
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise InvalidInputError(
            f"padding_idx must be in [-{num_embeddings}, {num_embeddings}) (num_embeddings), "
            f"got {padding_idx}"
        )
    return padding_idx % num_embeddings


def _check_weight(weight, num_embeddings: int | None, embedding_dim: int) -> None:
    """Refuses a ``_weight`` that is not a ``(num_embeddings, embedding_dim)`` float tensor."""
    if weight is None:
        return
    if num_embeddings is None:
        raise InvalidInputError("_weight needs a table of num_embeddings rows, not None")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise InvalidInputError(
            f"_weight must be a floating-point tensor, got "
            f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if tuple(weight.shape) != (num_embeddings, embedding_dim):
        raise InvalidInputError(
            f"_weight must have shape ({num_embeddings}, {embedding_dim}) (num_embeddings, "
            f"embedding_dim), got {tuple(weight.shape)}"
        )


def check_l1(cache: CacheConfig, num_embeddings: int | None) -> tuple[int, int]:
    """L1's ``(rows, sets * ways)`` for the table, refused before an SSD tier is made."""
    rows = cache.rows_for(num_embeddings)
    sets, ways = cache_shape(rows, cache.ways)
    return rows, sets * ways


def check_configs(cache, ssd) -> None:
    """Refuses a ``cache`` or ``ssd`` that is not its config (or ``None``)."""
    for name, value, kind in (("cache", cache, CacheConfig), ("ssd", ssd, SSDConfig)):
        if value is not None and not isinstance(value, kind):
            raise InvalidInputError(
                f"{name} must be a ts.{kind.__name__} or None, got {type(value).__name__} {value!r}"
            )


def check_init(seed: int, init_scale: float | None, embedding_dim: int) -> float:
    """Refuses a ``seed`` that is not an int or an ``init_scale`` that is not positive;
    returns the scale (default ``1/sqrt(embedding_dim)``)."""
    if not _is_int(seed):
        raise InvalidInputError(f"seed must be an int, got {seed!r}")
    if init_scale is None:
        return 1.0 / math.sqrt(embedding_dim)
    if isinstance(init_scale, bool) or not isinstance(init_scale, int | float):
        raise InvalidInputError(f"init_scale must be a positive number, got {init_scale!r}")
    if not (math.isfinite(init_scale) and init_scale > 0):
        raise InvalidInputError(f"init_scale must be a positive number, got {init_scale!r}")
    return float(init_scale)
