"""``TieredEmbeddingBag``: a drop-in ``torch.nn.EmbeddingBag`` whose table lives in the tiers.

Shapes: ``B`` bags, ``L`` indices per bag (2-D input), ``n`` indices in all, ``D`` embedding dim.
The module only translates the user's calls: its options (``config.py``), validation
(``validate.py``), the batch step (``store.py``) and the kernels (``cpu.py`` / ``cuda.py``) do
the work.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
from torch import nn

from . import bag_max, checkpoint, config, graphs, weights
from .autograd import BatchHandle, TieredBagFunction
from .backends import backend_for as _backend_for
from .backends import same_device
from .config import CacheConfig, SSDConfig
from .errors import InvalidInputError
from .fused_optimizer import FusedOptimizer, resolve_optimizer
from .host_cache import open_host_cache, read_table_meta, table_meta
from .optim import SGD, Optimizer, optimizer_from_dict
from .pipeline import PrefetchQueue
from .serial import SerialisedCalls
from .serial import serialised as _serialised
from .stats import CacheStats
from .store import BatchMode, RowLayout, TieredStore, initial_rows
from .validate import check_has_data, drop_padding, normalize_batch

_FROM_TABLE = object()  # open(): the optimizer stored with the table; from_pretrained: default


class TieredEmbeddingBag(nn.Module, SerialisedCalls):
    """An ``nn.EmbeddingBag`` over a table kept in tiers: an L1 cache on the device, L2 in host
    memory and, with ``ssd``, L3 on SSD. The backward pass applies ``optimizer`` to the rows
    where they live (a fused, exact sparse update); the module has no dense weight parameter.

    The positional arguments and their defaults are ``nn.EmbeddingBag``'s; tierstore's own
    options follow, keyword-only: the tiers as configs (:class:`~tierstore.CacheConfig`,
    :class:`~tierstore.SSDConfig`, ``tierstore/config.py``), the optimizer and the initial rows.

    Rows change only in training mode (``train()``, the default) in a backward: a forward in
    ``eval()`` or under ``torch.no_grad()`` is an inference step (no lock, no update).
    Threads: a table may be used from several threads. Its calls (forward with its lookup,
    backward, prefetch, read_rows, write_rows, flush, stats, state_dict, close) are serialised
    by a lock of the table, each one whole, in the order the threads reach it; training batches
    of several threads may be in flight at once, as with :meth:`prefetch`. On CUDA the lock
    orders the host's calls: threads that run a table's work on different CUDA streams must
    order those streams themselves, as for any tensor shared between streams.

    ``fused_optimizer`` is the update as a ``torch.optim.Optimizer`` (for schedulers and
    ``state_dict``; see ``tierstore/fused_optimizer.py``); ``weight`` reads and assigns every
    row of a table that fits in memory (a copy). ``cache_config`` and ``ssd_config`` are the
    configs in use (``cache_config.rows`` resolved).

    Args:
        num_embeddings: rows in the table; ``None`` (with ``ssd``) for any int64 id.
        embedding_dim: ``D``.
        max_norm: must be ``None``: renormalising rows as a forward reads them would write
            every tier on a lookup (refused with :class:`InvalidInputError`).
        norm_type: only used with ``max_norm``; ignored, as torch ignores it then.
        scale_grad_by_freq: must be ``False``: the fused optimizer sums each row's gradient
            over the batch unscaled (refused with :class:`InvalidInputError`).
        mode: ``"sum"``, ``"mean"`` (the default, as torch) or ``"max"``. ``"max"`` runs as
            torch ops on every backend (the kernels pool by sum and mean).
        sparse: accepted and without effect: the gradient never leaves the module (the fused
            optimizer applies it), so there is no dense or sparse weight gradient to choose.
        _weight: ``(num_embeddings, D)`` initial weights (as torch's ``_weight``).
        include_last_offset: as ``nn.EmbeddingBag``.
        padding_idx: entries equal to it add nothing to their bag, do not count in a mean and
            never update their row (as torch); in ``[-num_embeddings, num_embeddings)``,
            negative counted from the end. A new table's padding row starts at zero.
        device: where L1 and the kernels live (default: torch's default device, as torch's
            modules); ``.to(device)`` moves a built table.
        dtype: ``None`` or ``torch.float32`` (the only row type so far).

    Keyword-only (tierstore's own):
        cache: L1, a :class:`~tierstore.CacheConfig` (default ``CacheConfig()``: 20 % of the
            table, 32 ways, LRU).
        ssd: the SSD tier and L2 over it, a :class:`~tierstore.SSDConfig`; ``None`` (default):
            the whole table in host memory (L2), no L3.
        optimizer: the fused update applied in backward while the module is in training mode
            (``train()``, the default): :class:`SGD` (default ``SGD(lr=0.01)``),
            :class:`Adagrad`, :class:`RowWiseAdagrad`, a ``torch.optim`` class with its keyword
            arguments as ``(torch.optim.Adagrad, {"lr": 0.01})`` (see
            :func:`~tierstore.fused_optimizer.optimizer_from_torch`), or ``None`` (no training).
            Its hyper-parameters are ``self.fused_optimizer.param_groups[0]``.
        seed: never-written rows are a deterministic function of (seed, row id) (default 0).
        init_scale: they are uniform on ``[-init_scale, init_scale)`` (default ``1/sqrt(D)``).
            ``seed`` and ``init_scale`` stay flat, as in :class:`~tierstore.TableConfig`: they
            say what the table's rows are, not how a tier holds them.
        **deprecated: the flat keywords of earlier versions (``cache_rows``, ``ways``,
            ``policy``, ``path``, ``host_rows``, ...), each a config's field, accepted with a
            ``DeprecationWarning`` (:func:`tierstore.config.from_flat_keywords`).

    Example::

        >>> import torch, tierstore as ts
        >>> emb = ts.TieredEmbeddingBag(1000, 8, mode="sum", device="cpu",
        ...                             cache=ts.CacheConfig(rows=64))
        >>> y = emb(torch.tensor([1, 2, 3, 2]), torch.tensor([0, 2]))
        >>> y.shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        cache: CacheConfig | None = None,
        ssd: SSDConfig | None = None,
        optimizer: Optimizer | None = SGD(lr=0.01),  # noqa: B008 (frozen, immutable)
        seed: int = 0,
        init_scale: float | None = None,
        **deprecated,
    ):
        super().__init__()
        self._start_serialising()  # one call at a time per table (serial.py)
        cache, ssd = config.from_flat_keywords("TieredEmbeddingBag", deprecated, cache, ssd)
        config.check_configs(cache, ssd)
        cache = cache or CacheConfig()
        padding_idx = config.check_bag_arguments(
            num_embeddings, embedding_dim, max_norm, scale_grad_by_freq, mode, _weight,
            padding_idx, dtype, ssd,
        )  # fmt: skip
        init_scale = config.check_init(seed, init_scale, embedding_dim)
        optimizer = resolve_optimizer(optimizer)  # a tierstore rule or None
        # L1's options are refused before an SSD tier is made
        cache_rows, l1_capacity = config.check_l1(cache, num_embeddings)
        self.cache_config = dataclasses.replace(cache, rows=cache_rows)
        self.ssd_config = ssd
        fresh = ssd is None or not ssd.holds_table()  # a new table (else one to reopen)
        ssd_options = None if ssd is None else ssd.tier_options(fresh)
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset = mode, include_last_offset
        self.padding_idx, self.sparse = padding_idx, sparse
        self.max_norm, self.norm_type, self.scale_grad_by_freq = None, norm_type, False
        self.optimizer = optimizer
        self.device = device
        layout = RowLayout(
            embedding_dim,
            optimizer.state_width(embedding_dim) if optimizer else 0,
            optimizer.initial_state if optimizer else 0.0,
        )
        host = None
        if ssd is not None:
            meta = table_meta(num_embeddings, layout, seed, init_scale, optimizer)
            init = functools.partial(
                initial_rows, layout=layout, seed=seed, init_scale=init_scale, device=device
            )
            host = open_host_cache(
                ssd.path, num_embeddings, layout, ssd.host_rows, l1_capacity, cache.policy,
                device, init, meta, **ssd_options,
            )  # fmt: skip
        self.store = TieredStore(
            num_embeddings, layout, cache_rows, cache.ways, cache.policy, device, seed,
            init_scale, _backend_for(device), host=host,
        )  # fmt: skip
        self._queue = PrefetchQueue(self.store)  # batches prefetched, oldest first
        self._unflushed = False  # rows changed since the last flush (close() warns of them)
        if _weight is not None:
            weights.write_weights(self.store, _weight)
        elif padding_idx is not None and fresh:  # as torch: a new table's padding row is zero
            zero = torch.zeros(1, embedding_dim)
            weights.write_weights(self.store, zero, torch.tensor([padding_idx]))

    # --------------------------------------------------------------- nn.EmbeddingBag API
    @_serialised
    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings ``(B, D)``, as ``nn.EmbeddingBag.forward``."""
        captured = None
        if graphs.capturing():  # GraphedStep checks each batch at its replay instead
            self._refuse_capture()
            captured = graphs.record_forward(self, input, offsets, per_sample_weights)
        elif self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            graphs.refuse_capture()
        flat, offs, psw, checks = self._prepare(
            input, offsets, per_sample_weights, values=captured is None
        )
        wants_psw_grad = psw is not None and psw.requires_grad
        # Rows are updated only in training mode with grad enabled; an eval() forward is an
        # inference step for the table (no lock, no update) unless per-sample weights want a grad
        update = self.training and torch.is_grad_enabled() and self.fused_optimizer is not None
        training = update or (torch.is_grad_enabled() and wants_psw_grad)
        if update:
            self._check_writable("training")
        batch = self._queue.pop((input, offsets), flat)
        if batch is None:  # waits for the checks before the first change (a capture ends its
            # head graph there instead); an inference batch is released right after its
            # forward: its L1 step need not lock its rows
            before_change = checks.wait if captured is None else graphs.before_first_change
            mode = BatchMode.TRAIN if training else BatchMode.EVAL
            batch = self.store.lookup(flat, before_change, mode)
        else:
            checks.wait()
        if captured is not None:
            captured.batches.append(batch)
        if training:
            handle = BatchHandle(batch, functools.partial(self._release_soon, self.store.release))
            # A zero-size leaf that requires grad, so that autograd calls our backward even when
            # nothing else in the batch does; the fused optimizer takes the place of weight
            # grads. A new one per call: a leaf keeps the stream it was first used on, and a
            # step captured in a CUDA graph must not wait on an eager step's stream.
            anchor = torch.empty(0, device=self.device, requires_grad=True)
            out = TieredBagFunction.apply(anchor, psw, self, handle, offs, self.mode, update)
            self._queue.advance()  # the next batches' cache steps, beside this one's compute
            return out
        try:
            if self.mode == "max":
                out = bag_max.forward(self.store, batch, offs, keep_graph=False)[0]
            else:
                out = self.store.forward(batch, offs, psw, self.mode)
            self._queue.advance()
            return out
        finally:
            self.store.release(batch)

    def _refuse_capture(self) -> None:
        """The generic paths read the device (the padding filter's and max pooling's shapes
        depend on the batch's values): a CUDA graph cannot replay them."""
        why = "padding_idx" if self.padding_idx is not None else None
        why = 'mode="max"' if self.mode == "max" else why
        if why is not None:
            raise InvalidInputError(
                f"this TieredEmbeddingBag cannot be captured: {why} runs as torch ops whose "
                "shapes depend on the batch's values (the kernels do sum and mean alone)"
            )

    @_serialised
    def prefetch(self, input: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        """Starts the cache step of a later batch now, so that its ``forward`` finds its rows
        in place. On CUDA the step runs on a side stream while the current batch computes
        (``tierstore/pipeline.py``); its rows are locked until the batch's backward (or its
        inference forward) releases them. With an SSD tier its L3 reads start now, on L3's
        I/O threads, and the rest of its step runs at its forward. Batches are consumed in the order they were
        prefetched; :func:`tierstore.prefetching` keeps a loop's next batches prefetched."""
        flat, _, _, checks = self._prepare(input, offsets, None)
        self._queue.push((input, offsets), flat, checks)

    @property
    def prefetched(self) -> int:
        """Batches prefetched and not yet consumed by a forward."""
        return len(self._queue)

    @_serialised
    def clear_prefetched(self) -> None:
        """Drops every prefetched batch not yet consumed by a forward, releasing its rows."""
        self._queue.clear()

    def _prepare(self, input, offsets, per_sample_weights, values: bool = True):
        # the value checks are read back later, while the device starts on the unique step
        flat, offs, psw, checks = normalize_batch(
            input, offsets, per_sample_weights, self.mode, self.include_last_offset,
            self.device, self.num_embeddings, defer_checks=True, values=values,
        )  # fmt: skip
        if self.padding_idx is not None:  # padding entries leave the batch: checked first,
            checks.wait()  # since the offsets index the filter
            flat, offs, psw = drop_padding(flat, offs, psw, self.padding_idx)
        return flat, offs, psw, checks

    # --------------------------------------------------------------- optimizer and weight
    @property
    def optimizer(self) -> Optimizer | None:
        """The fused update rule with its current hyper-parameters (those of
        ``fused_optimizer.param_groups[0]``, which schedulers change), or None."""
        fused = self.__dict__.get("fused_optimizer")
        return None if fused is None else fused.rule

    @optimizer.setter
    def optimizer(self, rule: Optimizer | None) -> None:
        if "fused_optimizer" in self.__dict__:
            raise InvalidInputError(
                "optimizer is set when the table is made; change its hyper-parameters through "
                "fused_optimizer.param_groups (the rows hold the rule's state)"
            )
        rule = resolve_optimizer(rule)
        #: the ``torch.optim.Optimizer``-like face of the fused update (None without one)
        self.fused_optimizer = None if rule is None else FusedOptimizer(rule)

    #: ``weight`` reads or writes the whole table only up to this size in bytes (a copy is made)
    weight_max_bytes: int = 4 << 30

    @property
    def weight(self) -> torch.Tensor:
        """A copy ``(num_embeddings, D)`` of every row's weights, read through the tiers (on
        ``device``). Assigning ``emb.weight = W`` or ``emb.weight.data = W`` writes ``W``
        (detached) into every row, keeping the optimizer state; other in-place changes of the
        copy do not reach the table. Tables with ``num_embeddings=None`` or larger than
        :attr:`weight_max_bytes` raise: use :meth:`read_rows` / :meth:`write_rows`."""
        return weights.WeightCopy(weights.read_all(self), self)

    @weight.setter
    @_serialised
    def weight(self, value: torch.Tensor) -> None:
        weights.check_weight_value(self, value)
        weights.write_weights(self.store, value)
        self._unflushed = True

    # --------------------------------------------------------------- rows and tiers
    @_serialised
    def read_rows(self, ids: torch.Tensor, with_state: bool = False) -> torch.Tensor:
        """Current weights ``(len(ids), D)`` of ``ids`` (and the optimizer state after them
        with ``with_state``), wherever they live. Changes nothing, counts nothing."""
        ids = self._check_row_ids(ids)
        rows = self.store.read_rows(ids)
        return rows if with_state else rows[:, : self.embedding_dim].contiguous()

    @_serialised
    def write_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrites the weights of unique ``ids`` with ``values (len(ids), D)``; their
        optimizer state is kept. Values that require grad are detached: the table takes their
        values, never their autograd history."""
        ids = self._check_row_ids(ids)
        self._check_writable("write_rows")
        if not isinstance(values, torch.Tensor) or values.shape != (
            ids.numel(),
            self.embedding_dim,
        ):
            raise InvalidInputError(
                f"values must have shape ({ids.numel()}, {self.embedding_dim}), got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if not values.is_floating_point():
            raise InvalidInputError(f"values must be floating point, got {values.dtype}")
        check_has_data(values, "values")
        if torch.unique(ids).numel() != ids.numel():
            raise InvalidInputError("write_rows: ids must be unique")
        weights.write_weights(self.store, values, ids)
        self._unflushed = True

    def _check_row_ids(self, ids) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError("ids must be an int32 or int64 tensor")
        check_has_data(ids, "ids")
        ids = ids.reshape(-1).to(self.device, torch.int64)
        self.store.check_ids(ids, "ids")
        return ids

    @_serialised
    def flush(self) -> None:
        """Writes every dirty row down to the lowest tier (durably, with an SSD tier)."""
        self._check_writable("flush")
        self.store.flush()
        self._unflushed = False

    def _check_writable(self, doing: str) -> None:
        """ReadOnlyTableError, before anything changes, for a table opened ``read_only=True``."""
        self.store.host.check_writable(doing)

    @_serialised
    def stats(self) -> CacheStats:
        """Counters of the caches and the bytes moved between tiers."""
        return self.store.stats()

    @_serialised
    def reset_stats(self) -> None:
        """Zeroes the counters."""
        self.store.reset_stats()

    @_serialised
    def close(self, flush: bool = False) -> None:
        """Releases prefetched batches and closes the SSD tier. Rows changed since the last
        :meth:`flush` are dropped (the table reopens as of that flush, as after a crash), with a ``UserWarning`` naming
        ``flush``; ``close(flush=True)`` flushes first."""
        self.clear_prefetched()
        if flush:
            self.flush()
        elif self._unflushed:
            warnings.warn(
                "TieredEmbeddingBag.close(): the rows changed since the last flush() are "
                "dropped; call flush() or close(flush=True) to keep them",
                UserWarning,
                stacklevel=2,
            )
        self.store.host.close()

    @classmethod
    def open(
        cls,
        ssd: SSDConfig | str | os.PathLike,
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache: CacheConfig | None = None,
        optimizer: Optimizer | None | object = _FROM_TABLE,
        **deprecated,
    ) -> TieredEmbeddingBag:
        """Reopens the SSD table at ``ssd`` (its directory, or an :class:`SSDConfig` with the
        L2 and SSD options), taking its shape, optimizer (its hyper-parameters may be
        overridden with ``optimizer=``), seed and initialisation from its metadata; the other
        keywords are the constructor's. ``SSDConfig(path, read_only=True)`` opens it beside a
        process that may be writing it: reads only, from the latest completed flush; training,
        ``write_rows`` and ``flush`` are refused. ``**deprecated``: the constructor's flat
        keywords but ``path``, with a ``DeprecationWarning``."""
        cache, ssd_config = config.configs_to_open(
            "TieredEmbeddingBag.open", ssd, deprecated, cache
        )
        meta = read_table_meta(ssd_config.path)
        if optimizer is _FROM_TABLE:
            optimizer = optimizer_from_dict(meta.get("optimizer"))
        return cls(
            meta["num_embeddings"], meta["embedding_dim"], max_norm, norm_type,
            scale_grad_by_freq, mode, sparse, None, include_last_offset, padding_idx, device,
            dtype, cache=cache, ssd=ssd_config, optimizer=optimizer, seed=meta["seed"],
            init_scale=meta["init_scale"],
        )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        embeddings: torch.Tensor,
        freeze: bool = True,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache: CacheConfig | None = None,
        ssd: SSDConfig | None = None,
        optimizer: Optimizer | None | object = _FROM_TABLE,
        seed: int = 0,
        init_scale: float | None = None,
        **deprecated,
    ) -> TieredEmbeddingBag:
        """A table initialised with ``embeddings (N, D)``, as ``nn.EmbeddingBag.from_pretrained``:
        ``freeze=True`` (the default) trains nothing (no optimizer: a backward updates no row);
        ``freeze=False`` trains with ``optimizer=`` (default ``SGD(lr=0.01)``), its state fresh.
        The keyword-only arguments are the constructor's (``**deprecated`` too)."""
        cache, ssd = config.from_flat_keywords(
            "TieredEmbeddingBag.from_pretrained", deprecated, cache, ssd
        )
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise InvalidInputError(
                "embeddings must be a 2-D tensor (num_embeddings, embedding_dim)"
            )
        check_has_data(embeddings, "embeddings")
        if freeze:
            if optimizer is not _FROM_TABLE and optimizer is not None:
                raise InvalidInputError(
                    "freeze=True trains nothing, so it takes no optimizer: pass freeze=False "
                    "to train with optimizer="
                )
            optimizer = None
        elif optimizer is _FROM_TABLE:  # the constructor's default
            optimizer = SGD(lr=0.01)
        rows, dim = embeddings.shape
        return cls(
            rows, dim, max_norm, norm_type, scale_grad_by_freq, mode, sparse, embeddings,
            include_last_offset, padding_idx, device, dtype, cache=cache, ssd=ssd,
            optimizer=optimizer, seed=seed, init_scale=init_scale,
        )  # fmt: skip

    # --------------------------------------------------------------- device and dtype
    @_serialised
    def _apply(self, fn, recurse: bool = True):
        """Where ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()``, ``.double()`` and the like reach
        the table (also when a parent module calls them). The conversion is read off a probe
        tensor: another device moves the table (:meth:`_move_to`); another dtype is refused,
        since rows are float32 only so far."""
        probe = fn(torch.empty(0, device=self.device))
        if isinstance(probe, torch.Tensor):
            if probe.dtype != torch.float32:
                raise InvalidInputError(
                    f"a TieredEmbeddingBag's rows are torch.float32 (the only row type so far): "
                    f"it cannot be converted to {probe.dtype} (.half(), .double(), .bfloat16(), "
                    ".to(dtype)); the table is unchanged"
                )
            if not same_device(probe.device, self.device):
                self._move_to(probe.device)
        return super()._apply(fn, recurse)

    def _move_to(self, device: torch.device) -> None:
        """Moves L1 and the kernels to ``device`` (:meth:`TieredStore.moved_to`: rows,
        optimizer state and counters are kept, L1 starts empty). Refused while a batch is in
        flight (prefetched, or a forward whose backward has not run), with nothing changed."""
        if device.type not in ("cpu", "cuda"):
            raise InvalidInputError(
                f"a TieredEmbeddingBag runs on a CPU or CUDA device, not {device}"
            )
        if len(self._queue):
            raise InvalidInputError(
                f"the table cannot move to {device} while a batch is in flight (prefetched, or "
                "a training forward whose backward has not run): move it between steps"
            )
        l1 = self.cache_config
        self.store = self.store.moved_to(device, _backend_for(device), l1.rows, l1.ways, l1.policy)
        self.device = device
        self._queue = PrefetchQueue(self.store)

    # --------------------------------------------------------------- checkpoints
    # The rows and their optimizer state are the module's state: ``weight``, ``optimizer_state``
    # and, for a sparse table, ``ids`` (the forms and the memory bound: ``checkpoint.py``).
    @_serialised
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        checkpoint.save_table(self, destination, prefix)

    @_serialised
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        rest = checkpoint.load_table(self, state_dict, prefix, missing_keys)
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @_serialised
    def incremental_state_dict(self, prefix: str = "") -> dict:
        """The rows changed since :meth:`mark_checkpoint` or the last incremental checkpoint
        (sparse form: ``ids (R,)``, ``weight (R, D)``, ``optimizer_state (R, S)``), then flushes;
        ``load_state_dict`` applies it to a table restored to the previous checkpoint. Needs an
        SSD tier. See :func:`tierstore.checkpoint.incremental_state_dict`."""
        return checkpoint.incremental_state_dict(self, prefix)

    @_serialised
    def mark_checkpoint(self) -> None:
        """Flushes and makes now the base of the next :meth:`incremental_state_dict` (call it
        right after saving a full ``state_dict``). Needs an SSD tier."""
        checkpoint.mark_checkpoint(self)

    def __reduce_ex__(self, protocol):
        raise checkpoint.not_picklable(self)

    def extra_repr(self) -> str:
        l1 = self.store.l1
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
            + (f"padding_idx={self.padding_idx}, " if self.padding_idx is not None else "")
            + f"cache={l1.sets}x{l1.ways} {l1.policy.name}, device={self.device}, "
            f"optimizer={self.optimizer}"
        )
