"""``TieredEmbeddingBag``: a drop-in ``torch.nn.EmbeddingBag`` whose table lives in the tiers.

Shapes: ``B`` bags, ``L`` indices per bag (2-D input), ``n`` indices in all, ``D`` embedding dim.
The module only translates the user's calls: validation (``validate.py``), the batch step
(``store.py``) and the kernels (``cpu.py`` / ``cuda.py``) do the work.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import deque

import torch
from torch import nn

from . import cpu, graphs
from .cache import cache_shape
from .errors import InvalidInputError
from .optim import SGD, Optimizer
from .policy import Policy
from .stats import CacheStats
from .store import Batch, RowLayout, TieredStore, initial_rows
from .validate import normalize_batch

_MODES = ("sum", "mean")


def _backend_for(device: torch.device):
    """The kernels for ``device``: CuPy kernels on CUDA when CuPy is there, torch ops otherwise."""
    if device.type == "cuda":
        try:
            from . import cuda

            if cuda.available():
                return cuda
        except ImportError:
            pass
    return cpu


class _BatchHandle:
    """Keeps a training batch's rows locked until its backward runs or its graph is freed."""

    def __init__(self, store: TieredStore, batch: Batch):
        self.batch = batch
        weakref.finalize(self, store.release, batch)


class _TieredBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, per_sample_weights, module, handle, offsets):
        ctx.module, ctx.handle, ctx.offsets = module, handle, offsets
        ctx.save_for_backward(per_sample_weights)
        store = module.store
        return store.backend.forward(store, handle.batch, offsets, per_sample_weights, module.mode)

    @staticmethod
    def backward(ctx, grad_out):
        module, batch = ctx.module, ctx.handle.batch
        if batch.released:
            raise RuntimeError(
                "TieredEmbeddingBag: backward ran twice through one batch (retain_graph) or after "
                "its rows were released; the fused optimizer updates each batch once"
            )
        (psw,) = ctx.saved_tensors
        store = module.store
        try:
            psw_grad = store.backend.backward(
                store,
                batch,
                grad_out.contiguous(),
                ctx.offsets,
                psw,
                module.mode,
                module.optimizer,
                ctx.needs_input_grad[1],
            )
        finally:
            store.release(batch)
        return None, psw_grad, None, None, None


class TieredEmbeddingBag(nn.Module):
    """An ``nn.EmbeddingBag`` over a table kept in tiers: an L1 cache on the device, L2 in host
    memory and, with ``path``, L3 on SSD. The backward pass applies ``optimizer`` to the rows
    where they live (a fused, exact sparse update); the module has no dense weight parameter.

    Args:
        num_embeddings: rows in the table; ``None`` (with ``path``) for any int64 id.
        embedding_dim: ``D``.
        mode: ``"sum"`` or ``"mean"``, as ``nn.EmbeddingBag``.
        cache_rows: L1 size in rows (default: 20 % of the table, as FBGEMM's cache load factor).
        ways: L1 associativity (default 32).
        policy: ``"lru"`` or ``"lfu"``.
        host_rows: L2 size in rows with an SSD tier; ``None`` keeps the whole table in L2.
        path: directory of the SSD tier (an LMDB environment).
        optimizer: :class:`SGD`, :class:`Adagrad`, :class:`RowWiseAdagrad` or ``None`` (no training).
        dtype: ``torch.float32`` (the only row type so far).
        device: where L1 and the kernels live (default ``"cuda"`` when available, else ``"cpu"``).
        seed: never-written rows are a deterministic function of (seed, row id).
        init_scale: they are uniform on ``[-init_scale, init_scale)`` (default ``1/sqrt(D)``).
        include_last_offset: as ``nn.EmbeddingBag``.

    Example::

        >>> import torch, tierstore as ts
        >>> emb = ts.TieredEmbeddingBag(1000, 8, cache_rows=64, device="cpu")
        >>> y = emb(torch.tensor([1, 2, 3, 2]), torch.tensor([0, 2]))
        >>> y.shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        num_embeddings: int | None,
        embedding_dim: int,
        mode: str = "sum",
        *,
        cache_rows: int | None = None,
        ways: int = 32,
        policy: str | Policy = "lru",
        host_rows: int | None = None,
        path=None,
        optimizer: Optimizer | None = SGD(lr=0.01),  # noqa: B008 (frozen, immutable)
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        init_scale: float | None = None,
        include_last_offset: bool = False,
        **ssd_options,
    ):
        super().__init__()
        if mode not in _MODES:
            raise InvalidInputError(f"mode must be one of {_MODES}, got {mode!r}")
        if dtype != torch.float32:
            raise InvalidInputError(
                f"dtype must be torch.float32 (the only row type so far), got {dtype}"
            )
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise InvalidInputError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if num_embeddings is None and path is None:
            raise InvalidInputError(
                "num_embeddings=None (any int64 id) needs an SSD tier: give path="
            )
        if num_embeddings is not None and num_embeddings < 1:
            raise InvalidInputError(f"num_embeddings must be positive, got {num_embeddings}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise InvalidInputError(
                f"optimizer must be a tierstore optimizer or None, got {optimizer!r}"
            )
        if cache_rows is None:
            if num_embeddings is None:
                raise InvalidInputError("cache_rows is required when num_embeddings is None")
            cache_rows = max(1, math.ceil(0.2 * num_embeddings))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset = mode, include_last_offset
        self.optimizer = optimizer
        self.device = device
        layout = RowLayout(
            embedding_dim,
            optimizer.state_width(embedding_dim) if optimizer else 0,
            optimizer.initial_state if optimizer else 0.0,
        )
        init_scale = 1.0 / math.sqrt(embedding_dim) if init_scale is None else float(init_scale)
        host = None
        if path is not None:
            from .host_cache import open_host_cache, table_meta  # the SSD tier and its L2

            sets, l1_ways = cache_shape(cache_rows, ways)
            meta = table_meta(num_embeddings, layout, seed, init_scale, optimizer)
            init = functools.partial(
                initial_rows, layout=layout, seed=seed, init_scale=init_scale, device=device
            )
            host = open_host_cache(
                path,
                num_embeddings,
                layout,
                host_rows,
                sets * l1_ways,
                policy,
                device,
                init,
                meta,
                **ssd_options,
            )
        elif ssd_options or host_rows is not None:
            raise InvalidInputError(
                f"{sorted(ssd_options) or ['host_rows']} only apply with an SSD tier: give path="
            )
        self.store = TieredStore(
            num_embeddings,
            layout,
            cache_rows,
            ways,
            policy,
            device,
            seed,
            init_scale,
            _backend_for(device),
            host=host,
        )
        self._prefetched: deque[tuple[torch.Tensor, Batch]] = deque()

    # --------------------------------------------------------------- nn.EmbeddingBag API
    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings ``(B, D)``, as ``nn.EmbeddingBag.forward``."""
        captured = None
        if graphs.capturing():  # GraphedStep checks each batch at its replay instead
            captured = graphs.record_forward(self, input, offsets, per_sample_weights)
        elif self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            graphs.refuse_capture()
        flat, offs, psw, checks = self._prepare(
            input, offsets, per_sample_weights, values=captured is None
        )
        wants_psw_grad = psw is not None and psw.requires_grad
        training = torch.is_grad_enabled() and (self.optimizer is not None or wants_psw_grad)
        if training and self.optimizer is not None:
            self._check_writable("training")
        batch = self._take_prefetched(flat)
        if batch is None:  # waits for the checks before the first change (a capture ends its
            # head graph there instead); an inference batch is released right after its
            # forward: its L1 step need not lock its rows
            before_change = checks.wait if captured is None else graphs.before_first_change
            batch = self.store.lookup(flat, before_change, backward=training, hold=training)
        else:
            checks.wait()
        if captured is not None:
            captured.batch = batch
        if training:
            handle = _BatchHandle(self.store, batch)
            # A zero-size leaf that requires grad, so that autograd calls our backward even when
            # nothing else in the batch does; the fused optimizer takes the place of weight
            # grads. A new one per call: a leaf keeps the stream it was first used on, and a
            # step captured in a CUDA graph must not wait on an eager step's stream.
            anchor = torch.empty(0, device=self.device, requires_grad=True)
            return _TieredBagFunction.apply(anchor, psw, self, handle, offs)
        try:
            return self.store.backend.forward(self.store, batch, offs, psw, self.mode)
        finally:
            self.store.release(batch)

    def prefetch(self, input: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        """Looks up a future batch now (its rows are moved in and locked), so that its
        ``forward`` finds them in place. Batches are consumed in the order they were prefetched."""
        flat, _, _, checks = self._prepare(input, offsets, None)
        self._prefetched.append((flat, self.store.lookup(flat, checks.wait)))

    def _take_prefetched(self, flat: torch.Tensor) -> Batch | None:
        if not self._prefetched:
            return None
        ids, batch = self._prefetched[0]
        if not torch.equal(ids, flat):
            raise InvalidInputError(
                "forward's indices differ from the oldest prefetched batch: prefetch batches "
                "in the order forward will see them"
            )
        self._prefetched.popleft()
        return batch

    def _prepare(self, input, offsets, per_sample_weights, values: bool = True):
        # the value checks are read back later, while the device starts on the unique step
        return normalize_batch(
            input, offsets, per_sample_weights, self.mode, self.include_last_offset,
            self.device, self.num_embeddings, defer_checks=True, values=values,
        )  # fmt: skip

    # --------------------------------------------------------------- rows and tiers
    def read_rows(self, ids: torch.Tensor, with_state: bool = False) -> torch.Tensor:
        """Current weights ``(len(ids), D)`` of ``ids`` (and the optimizer state after them
        with ``with_state``), wherever they live. Changes nothing, counts nothing."""
        ids = self._check_row_ids(ids)
        rows = self.store.read_rows(ids)
        return rows if with_state else rows[:, : self.embedding_dim].contiguous()

    def write_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrites the weights of unique ``ids`` with ``values (len(ids), D)``; their
        optimizer state is kept."""
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
        if torch.unique(ids).numel() != ids.numel():
            raise InvalidInputError("write_rows: ids must be unique")
        rows = self.store.read_rows(ids)
        rows[:, : self.embedding_dim] = values.to(rows.device, torch.float32)
        self.store.write_rows(ids, rows)

    def _check_row_ids(self, ids) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError("ids must be an int32 or int64 tensor")
        ids = ids.reshape(-1).to(self.device, torch.int64)
        self.store.check_ids(ids, "ids")
        return ids

    def flush(self) -> None:
        """Writes every dirty row down to the lowest tier (durably, with an SSD tier)."""
        self._check_writable("flush")
        self.store.flush()

    def _check_writable(self, doing: str) -> None:
        """ReadOnlyTableError, before anything changes, for a table opened ``read_only=True``."""
        check = getattr(self.store.host, "check_writable", None)
        if check is not None:
            check(doing)

    def stats(self) -> CacheStats:
        """Counters of the caches and the bytes moved between tiers."""
        return self.store.stats()

    def reset_stats(self) -> None:
        """Zeroes the counters."""
        self.store.reset_stats()

    def close(self) -> None:
        """Closes the SSD tier (without flushing: call :meth:`flush` first to keep changes)."""
        self.store.host.close()

    @classmethod
    def open(cls, path, **options) -> TieredEmbeddingBag:
        """Reopens the SSD table at ``path``, taking its shape, optimizer (its hyper-parameters
        may be overridden with ``optimizer=``), seed and initialisation from its metadata.
        ``read_only=True`` opens it beside a process that may be writing it: reads only, from
        the latest completed flush; training, ``write_rows`` and ``flush`` are refused."""
        from .host_cache import read_table_meta
        from .optim import optimizer_from_dict

        meta = read_table_meta(path)
        options.setdefault("optimizer", optimizer_from_dict(meta.get("optimizer")))
        return cls(
            meta["num_embeddings"],
            meta["embedding_dim"],
            path=path,
            seed=meta["seed"],
            init_scale=meta["init_scale"],
            **options,
        )

    @classmethod
    def from_pretrained(cls, weight: torch.Tensor, **options) -> TieredEmbeddingBag:
        """A table initialised with ``weight (N, D)`` (the optimizer state starts fresh)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise InvalidInputError("weight must be a 2-D tensor (num_embeddings, embedding_dim)")
        emb = cls(weight.shape[0], weight.shape[1], **options)
        chunk = 1 << 20
        for lo in range(0, weight.shape[0], chunk):
            hi = min(lo + chunk, weight.shape[0])
            emb.write_rows(torch.arange(lo, hi), weight[lo:hi].detach())
        return emb

    def extra_repr(self) -> str:
        l1 = self.store.l1
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
            f"cache={l1.sets}x{l1.ways} {l1.policy.name}, device={self.device}, "
            f"optimizer={self.optimizer}"
        )
