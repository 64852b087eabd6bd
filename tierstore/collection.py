"""``TieredEmbeddingBagCollection``: many tables behind shared tiers, with TorchRec's input and
output layouts.

Shapes: ``B`` samples, ``F`` features, ``T`` tables, ``D_t`` the dim of table ``t``, ``n`` ids.

The module only translates the user's calls; its parts live apart, one job each:
:mod:`~tierstore.table_config` (``TableConfig``), :mod:`~tierstore.table_groups` (tables
grouped by row layout into one store each, and their row ids in it),
:mod:`~tierstore.collection_batch` (keyed input to each group's flat batch, and the
``KeyedTensor`` out), :mod:`~tierstore.collection_dir` (the directory and its manifest),
:mod:`~tierstore.collection_stats` (counters per table, group and overall) and
:mod:`~tierstore.table_views` (each table as checkpoints see a ``TieredEmbeddingBag``).

Checkpoints are per table: ``state_dict()`` holds, under ``tables.<name>.``, the keys a
``TieredEmbeddingBag`` of that table would hold (``weight (R, D_t)``, ``optimizer_state``,
sparse ``ids``, ``_extra_state``), with the table's own row ids, written and read by
:mod:`~tierstore.checkpoint` through a view of the table's part of its group. So a checkpoint
loads into a collection of other cache sizes, table order, grouping or tiers, and one table's
entries into a single ``TieredEmbeddingBag`` of the same seed, and back.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import checkpoint, collection_batch, graphs
from .autograd import BatchHandle, TieredBagFunction
from .backends import backend_for
from .collection_batch import FeatureLayout, GroupInput, PreparedBatch, batch_key, grad_signature
from .collection_dir import (
    MANIFEST,
    manifest,
    open_directory,
    read_manifest,
    remove_created,
    tables_of,
)
from .collection_stats import CollectionStats, collection_stats
from .config import CacheConfig, SSDConfig, configs_to_open, from_flat_keywords
from .errors import InvalidInputError, TierstoreError
from .keyed import KeyedTensor
from .optim import SGD, Optimizer
from .pipeline import PrefetchQueue
from .serial import SerialisedCalls, serialised
from .store import Batch, BatchMode
from .table_config import TableConfig
from .table_groups import (
    MAX_TAGGED_TABLES,
    TAG_SHIFT,
    TableGroup,
    build_store,
    check_tables,
    group_tables,
    row_shares,
    split_rows,
)
from .table_views import TableView

__all__ = [
    "MANIFEST",
    "MAX_TAGGED_TABLES",
    "TAG_SHIFT",
    "CollectionStats",
    "TableConfig",
    "TieredEmbeddingBagCollection",
    "split_rows",
]


class TieredEmbeddingBagCollection(nn.Module, SerialisedCalls):
    """Many embedding tables in shared tiers, fed and read as TorchRec's
    ``EmbeddingBagCollection`` (``KeyedJaggedTensor`` in, ``KeyedTensor`` out).

    Shapes: ``B`` samples, ``F`` features, ``D_t`` table ``t``'s dim; the output is
    ``(B, sum over features of their table's D_t)``.

    Tables of one dim and one optimizer form a group with one L1, one L2 and one SSD
    environment, so a collection of one dim and one optimizer has exactly one cache and runs
    one lookup, one forward and one backward per batch for all its tables; a row's identity in
    the cache is (table, id), and the hot rows of every table of a group compete for its
    space. Tables of other dims go to other groups, so that narrow rows never take a wide
    row's space in any tier. ``cache_rows`` and ``host_rows`` are split across groups in
    proportion to their rows (a ``num_embeddings=None`` table counts as the largest bounded
    table, or 1 if there is none): see :attr:`groups` for each group's share.

    Pooling is per table. A group whose tables all pool alike runs in that mode; a group that
    mixes ``"mean"`` and ``"sum"`` tables, or a ``"mean"`` group given per-sample weights,
    runs in ``"sum"`` with each id of a ``"mean"`` bag weighted by ``1/len`` (times its
    weight): equal to the mean up to rounding.

    With ``path``, the collection is a directory: ``collection.json`` lists its tables, and each
    group is an LMDB environment in a subdirectory named after the group (``dim64-sgd``; a
    second group of that dim and optimizer name, with other hyper-parameters, is
    ``dim64-sgd-2``). A flush is one transaction per group.

    :meth:`prefetch` (and :func:`tierstore.prefetching`) queues a later batch in one
    :class:`~tierstore.pipeline.PrefetchQueue` per group: on CUDA its cache steps run on each
    group's side stream while the current batch computes, and its forward recognises it by
    its tensors (the same objects, unchanged) without reading the device.

    Threads: a collection may be used from several threads, as a ``TieredEmbeddingBag``: each
    call (forward, the backward of its batches, prefetch, read_rows, write_rows, flush, stats,
    state_dict, close, ...) holds the collection's lock (``tierstore/serial.py``), so calls
    run one at a time, whole, in the order the threads reach it.

    Args:
        tables: the :class:`TableConfig` list; the output's keys are their features, tables in
            order and each table's features in order.
        cache: L1 (:class:`~tierstore.CacheConfig`): ``rows`` for all groups together
            (default ``None``: 20 % of each group's rows), ``ways`` and ``policy`` every
            group's.
        ssd: the SSD tier (:class:`~tierstore.SSDConfig`): ``path`` the collection's
            directory (an SSD tier for every group inside), ``host_rows`` L2's rows for all
            groups together (default per group: as ``TieredEmbeddingBag``'s); the other
            options each group's tier's.
        optimizer: the tables' optimizer unless a table gives its own; ``None``: no training.
        device: where L1 and the kernels live (default ``"cuda"`` when available).
        **deprecated: the flat keywords of earlier versions (``cache_rows``, ``ways``,
            ``policy``, ``path``, ``host_rows``, ``ssd_options``), with a
            ``DeprecationWarning`` naming the config to use.

    Example::

        >>> import torch, tierstore as ts
        >>> col = ts.TieredEmbeddingBagCollection(
        ...     tables=[ts.TableConfig(name="user", embedding_dim=8, num_embeddings=100),
        ...             ts.TableConfig(name="item", embedding_dim=4, num_embeddings=50,
        ...                            feature_names=["item", "last_item"])],
        ...     cache=ts.CacheConfig(rows=32), device="cpu")
        >>> kt = col(keys=["user", "item", "last_item"], values=torch.tensor([1, 2, 3, 4, 5]),
        ...          lengths=torch.tensor([1, 1, 2, 0, 1, 0]))
        >>> kt.values().shape, kt.keys(), kt.to_dict()["item"].shape
        (torch.Size([2, 16]), ['user', 'item', 'last_item'], torch.Size([2, 4]))
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        cache: CacheConfig | None = None,
        ssd: SSDConfig | None = None,
        optimizer: Optimizer | None = SGD(lr=0.01),  # noqa: B008 (frozen, immutable)
        device: torch.device | str | None = None,
        **deprecated,
    ):
        super().__init__()
        self._start_serialising()  # one call at a time (serial.py), backwards included
        tables = list(tables)
        if "ssd_options" in deprecated:  # the SSD keywords of an earlier version, as a dict
            deprecated.update(deprecated.pop("ssd_options") or {})
        cache, ssd = from_flat_keywords("TieredEmbeddingBagCollection", deprecated, cache, ssd)
        cache_rows, ways, policy = dataclasses.astuple(cache or CacheConfig())
        path, host_rows = (ssd.path, ssd.host_rows) if ssd is not None else (None, None)
        ssd_options = ssd.tier_options(fresh=True) if ssd is not None else {}  # the groups'
        check_tables(tables, path)
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise InvalidInputError(
                f"optimizer must be a tierstore optimizer or None, got {optimizer!r}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tables = tables
        self.groups: list[TableGroup] = group_tables(tables, optimizer)
        for g in self.groups:
            g.to(self.device)
            g._lock = self._lock  # which the backward of the group's batches holds
        # Where each feature and table lives, and the output's keys
        self._layout = FeatureLayout(tables, self.groups, self.device)
        self.feature_keys = self._layout.feature_keys
        self._feature_table = self._layout.feature_table
        caches, hosts = row_shares(self.groups, cache_rows, host_rows, path is not None)
        root = None if path is None else pathlib.Path(path)
        existed = root is not None and root.exists()
        created = root is not None and open_directory(root, manifest(tables, self.groups))
        opened: list[TableGroup] = []
        try:
            for g, c, h in zip(self.groups, caches, hosts, strict=True):
                build_store(g, c, ways, policy, h, root, self.device, backend_for(self.device),
                            ssd_options)  # fmt: skip
                opened.append(g)
        except BaseException:
            for g in opened:
                g.store.host.close()
            if created:  # a collection made by this call and not finished: leave no trace
                remove_created(root, existed)
            raise
        self.path = root
        # Prefetched batches: one queue per group (pipeline.py), and their prepared inputs
        self._queues = [PrefetchQueue(g.store) for g in self.groups]
        self._ahead: deque[PreparedBatch] = deque()

    @staticmethod
    def read_manifest(root: str | os.PathLike) -> dict:
        """The ``collection.json`` of the collection at ``root``."""
        return read_manifest(root)

    # ------------------------------------------------------------------ the batch
    @serialised
    def forward(
        self,
        features=None,
        *,
        keys: Sequence[str] | None = None,
        values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> KeyedTensor:
        """Pooled embeddings of every feature, ``(B, sum D)`` in a :class:`KeyedTensor`.

        The batch is a ``KeyedJaggedTensor`` (positional), a dict of feature name to
        ``(indices, offsets)`` (``nn.EmbeddingBag``'s input), or ``keys``, ``values (n,)``
        (feature-major), ``lengths (F * B,)`` or ``offsets (F * B + 1,)`` and ``weights (n,)``.
        Every feature of the collection must be given, each with the same ``B``. Bad input
        raises :class:`InvalidInputError` naming the feature and table, with nothing changed.
        A batch that was prefetched must come in the order it was prefetched.
        """
        given = (features, keys, values, lengths, offsets, weights)
        captured = None
        if graphs.capturing():  # GraphedStep checks each batch at its replay instead
            captured = self._record_capture(given)
        elif self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            graphs.refuse_capture()
        prep, batches = self._take_prefetched(given)
        if prep is None:
            prep = self._layout.prepare(*given, checked=captured is None)
        checked = prep.checks.wait if captured is None else graphs.before_first_change
        outs: list[torch.Tensor] = []
        held: list[tuple[TableGroup, Batch]] = []  # inference batches, released at the end
        try:
            for i, (g, gin) in enumerate(zip(self.groups, prep.groups, strict=True)):
                batch = batches[i] if batches else None
                outs.append(self._group_forward(g, gin, batch, held, checked, captured))
            self._advance()  # the next batches' cache steps, beside this one's compute
        except BaseException:
            if batches:  # the prefetched batches not yet handed to a forward
                for g, b in zip(self.groups[len(outs) :], batches[len(outs) :], strict=True):
                    g.store.release(b)
            raise
        finally:
            for g, b in held:
                g.store.release(b)
        return self._layout.keyed(outs, prep.batch_size)

    def _record_capture(self, given: tuple) -> graphs.CapturedForward:
        """Records this forward in the :class:`~tierstore.GraphedStep` capturing it, or raises
        why it cannot be (:meth:`FeatureLayout.capture_refusal`)."""
        why = self._layout.capture_refusal(given[0])
        parts = collection_batch.named_batch_parts(*given)
        tensors = {k: t for k, t in parts if isinstance(t, torch.Tensor)}
        return graphs.record(self, tensors,
                             lambda: self._layout.parse(*given).checks,
                             lambda: [(g.store, g.optimizer) for g in self.groups], why)  # fmt: skip

    def _group_forward(
        self,
        g: TableGroup,
        gin: GroupInput,
        batch: Batch | None,
        held: list[tuple[TableGroup, Batch]],
        checked: Callable[[], object],
        captured: graphs.CapturedForward | None,
    ) -> torch.Tensor:
        """A group's pooled bags ``(F_g * B, D_g)``, looking the group's rows up unless
        ``batch`` was prefetched (``checked``, the batch's checks, is waited for between the
        unique step and the first change); a training batch's rows stay locked until its
        backward, an inference batch's are added to ``held`` (released by the caller once every
        group's forward and the next batches' steps are queued)."""
        psw = gin.weights
        # rows are updated only in training mode with grad enabled, as the single-table module
        update = self.training and torch.is_grad_enabled() and g.optimizer is not None
        training = update or (torch.is_grad_enabled() and psw is not None and psw.requires_grad)
        store = g.store
        if batch is None:
            batch = store.lookup(gin.ids, checked, BatchMode.TRAIN if training else BatchMode.EVAL)
        if captured is not None:
            captured.batches.append(batch)
        if training:
            handle = BatchHandle(batch, functools.partial(self._release_soon, store.release))
            anchor = torch.empty(0, device=self.device, requires_grad=True)  # see module.py
            return TieredBagFunction.apply(anchor, psw, g, handle, gin.offsets, gin.mode, update)
        held.append((g, batch))
        return store.forward(batch, gin.offsets, psw, gin.mode)

    @serialised
    def prefetch(
        self,
        features=None,
        *,
        keys: Sequence[str] | None = None,
        values: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Starts the cache steps of a later batch (same forms as :meth:`forward`), so that its
        forward finds its rows in place: one :class:`~tierstore.pipeline.PrefetchQueue` per
        group, whose steps run on the group's side stream on CUDA (whole tables in L2), in
        order otherwise. Its rows are locked until its backward (or its inference forward)
        releases them. Batches are consumed in the order they were prefetched;
        :func:`tierstore.prefetching` keeps a loop's next batches prefetched, and
        :meth:`clear_prefetched` drops them.

        Where the steps run in order, a bad batch raises here, with nothing changed. On the
        side streams the host never waits here: the batch's checks are read before its rows
        are placed (at the end of the previous forward, when the device has work queued), and
        a collection of several groups splits the batch into its groups' shares then too (the
        shares are sized on the host); a bad batch then raises at its forward, having changed
        nothing."""
        prep = self._layout.parse(features, keys, values, lengths, offsets, weights)
        keep_order = any(not p.pushed and p.error is None for p in self._ahead)
        self._ahead.append(prep)
        if keep_order or (prep.split_reads and self._on_side_streams()):
            return  # split and pushed at the next _advance
        try:
            self._push(prep)
        except BaseException:
            self._ahead.pop()
            raise

    def _on_side_streams(self) -> bool:
        """Whether every group's prefetched steps run on a side stream (CUDA, whole tables in
        L2): then the host should not wait at a prefetch."""
        return all(g.store.side_stream() is not None for g in self.groups)

    def _push(self, prep: PreparedBatch) -> None:
        """Splits a prefetched batch into its groups' shares (reading its checks where that
        needs the counts) and queues each in its group's queue; a group that refuses it (L2
        cannot hold it, in order) undoes the others' pushes."""
        self._layout.split(prep)
        pushed = 0
        try:
            for q, gin in zip(self._queues, prep.groups, strict=True):
                q.push(prep.key, gin.ids, prep.checks)
                pushed += 1
        except BaseException:
            for q in self._queues[:pushed]:
                q.drop_newest()
            raise
        prep.pushed = True

    def _advance(self) -> None:
        """At the end of a forward (its kernels queued: the host may wait without idling the
        device): pushes the prefetched batches not pushed yet, then places the next batch in
        every group."""
        self._push_staged()
        for q in self._queues:
            q.advance()

    def _push_staged(self) -> None:
        """Pushes the prefetched batches not pushed yet, in order; a refused one keeps its
        error, to raise at its forward."""
        for prep in self._ahead:
            if not prep.pushed and prep.error is None:
                try:
                    self._push(prep)
                except TierstoreError as e:
                    prep.error = e

    def _take_prefetched(self, given: tuple) -> tuple[PreparedBatch | None, list[Batch] | None]:
        """The oldest prefetched batch if ``given`` is it, with its placed batch in every group;
        ``(None, None)`` if nothing is prefetched. The same tensors, unchanged and in the same
        grad mode, are recognised without a device read; other tensors are prepared and their
        ids compared (a device read). A batch that is not the oldest prefetched one raises
        :class:`InvalidInputError` with nothing changed; the oldest one's refusal (bad values,
        or more rows than L2 holds), found after its prefetch returned, raises here."""
        if not self._ahead:
            return None, None
        head = self._ahead[0]
        if not head.pushed and head.error is None:
            self._push_staged()
        if head.error is not None:
            self._ahead.popleft()
            raise head.error
        key = batch_key(*given)
        same = head.grad == grad_signature(key) and all(q.is_next(key) for q in self._queues)
        prep = head if same else self._layout.prepare(*given)
        if not same:
            prep.checks.wait()  # compared by value (a device read), so checked now
        if not same and not all(
            q.is_next(key, gin.ids) for q, gin in zip(self._queues, prep.groups, strict=True)
        ):
            raise InvalidInputError(
                "forward's ids differ from the oldest prefetched batch: prefetch batches in the "
                "order forward will see them (or call clear_prefetched() first)"
            )
        self._ahead.popleft()
        batches: list[Batch] = []
        failed: TierstoreError | None = None
        for q, gin in zip(self._queues, prep.groups, strict=True):
            try:
                batches.append(q.pop(key, gin.ids))
            except TierstoreError as e:  # its rows could not be placed: nothing of it changed
                failed = failed or e
        if failed is not None:
            for g, b in zip(self.groups, batches, strict=False):
                g.store.release(b)
            raise failed
        return prep, batches

    @property
    def prefetched(self) -> int:
        """Batches prefetched and not yet consumed by a forward."""
        return len(self._ahead)

    @serialised
    def clear_prefetched(self) -> None:
        """Drops every prefetched batch not yet consumed by a forward, releasing its rows."""
        for q in self._queues:
            q.clear()
        self._ahead.clear()

    @serialised
    def set_learning_rate(self, lr: float) -> None:
        """Every group's update uses learning rate ``lr`` from the next backward on (what a
        scheduler does to ``param_groups[0]["lr"]``); the other hyper-parameters are kept."""
        for g in self.groups:
            if g.optimizer is not None:
                g.optimizer = dataclasses.replace(g.optimizer, lr=lr)  # validated there

    # ------------------------------------------------------------------ rows and tiers
    @serialised
    def read_rows(self, table: str, ids: torch.Tensor, with_state: bool = False) -> torch.Tensor:
        """Current weights ``(len(ids), D_t)`` of table ``table``'s rows ``ids`` (its own ids),
        and the optimizer state after them with ``with_state``. Changes nothing."""
        g, rows = self._layout.row_ids(table, ids)
        out = g.store.read_rows(rows)
        return out if with_state else out[:, : g.dim].contiguous()

    @serialised
    def write_rows(self, table: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrites the weights of table ``table``'s unique rows ``ids`` with
        ``values (len(ids), D_t)``; their optimizer state is kept."""
        g, rows = self._layout.row_ids(table, ids)
        if not isinstance(values, torch.Tensor) or values.shape != (rows.numel(), g.dim):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise InvalidInputError(
                f"table {table!r}: values must have shape ({rows.numel()}, {g.dim}), got {got}"
            )
        if not values.is_floating_point():
            raise InvalidInputError(f"table {table!r}: values must be floating point")
        if torch.unique(rows).numel() != rows.numel():
            raise InvalidInputError(f"table {table!r}: write_rows ids must be unique")
        whole = g.store.read_rows(rows)
        whole[:, : g.dim] = values.to(whole.device, torch.float32)
        g.store.write_rows(rows, whole)

    @serialised
    def flush(self) -> None:
        """Writes every dirty row down to the lowest tier: with an SSD tier, one durable
        transaction per group."""
        for g in self.groups:
            g.store.flush()

    @serialised
    def close(self) -> None:
        """Releases prefetched batches and closes every group's SSD tier (without flushing:
        call :meth:`flush` first)."""
        self.clear_prefetched()
        for g in self.groups:
            g.store.host.close()

    @serialised
    def stats(self) -> CollectionStats:
        """Counters per table, per group and overall (see :class:`CollectionStats`)."""
        return collection_stats(self.groups, [t.name for t in self.tables])

    @serialised
    def reset_stats(self) -> None:
        """Zeroes every counter."""
        for g in self.groups:
            g.store.reset_stats()

    # ------------------------------------------------------------------ checkpoints
    # Per table, under ``tables.<name>.``: the keys of a ``TieredEmbeddingBag`` (``weight``,
    # ``optimizer_state``, sparse ``ids``, ``_extra_state``) with the table's own row ids, so
    # that a checkpoint loads into a collection of any cache sizes, grouping or tiers, and one
    # table's entries load into a single ``TieredEmbeddingBag`` of the same seed.
    def table_views(self, reading: bool = False) -> list[tuple[str, TableView]]:
        """``(key prefix, view)`` per table, in table order: each table as
        :mod:`~tierstore.checkpoint` reads and writes a ``TieredEmbeddingBag``. With
        ``reading`` (no row may change while the views are used), a group's SSD listing is
        read once for all its tables."""
        listings: dict[str, dict | None] = {g.name: {} if reading else None for g in self.groups}
        out = []
        for t in self.tables:
            g, k = self._layout.table_at[t.name]
            out.append((f"tables.{t.name}.", TableView(g, k, listings[g.name])))
        return out

    @serialised
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, view in self.table_views(reading=True):
            checkpoint.save_table(view, destination, prefix + key)

    @serialised
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._ahead:
            raise InvalidInputError(
                "load_state_dict with prefetched batches pending: run their forwards first"
            )
        views = self.table_views()
        ours = {prefix + key + k for key, _ in views for k in checkpoint.KEYS}
        for key, view in views:  # every table checked before the first row changes
            checkpoint.check_table(view, state_dict, prefix + key)
        for key, view in views:
            checkpoint.load_table(view, state_dict, prefix + key, missing_keys)
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @serialised
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with ``strict``, missing and unexpected keys raise
        before any row changes (torch reports them only after loading the rest)."""
        if strict:
            views = self.table_views()
            ours = {key + k for key, _ in views for k in checkpoint.KEYS}
            missing = [
                key + k
                for key, view in views
                for k in ("weight", "optimizer_state")
                if key + k not in state_dict and (k == "weight" or view.store.layout.state_width)
            ]
            unexpected = [k for k in state_dict if k not in ours]
            if missing or unexpected:
                msgs = []
                if unexpected:
                    msgs.append(f"Unexpected key(s) in state_dict: {unexpected}. ")
                if missing:
                    msgs.append(f"Missing key(s) in state_dict: {missing}. ")
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                    + "\n\t".join(msgs)
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @serialised
    def incremental_state_dict(self, prefix: str = "") -> dict:
        """Every table's rows changed since :meth:`mark_checkpoint` or the last incremental
        checkpoint, keyed as ``state_dict`` keys them (sparse form), then flushes; see
        :func:`tierstore.checkpoint.incremental_state_dict`. Needs an SSD tier (``path``)."""
        return checkpoint.incremental_state_dict(self, prefix)

    @serialised
    def mark_checkpoint(self) -> None:
        """Flushes and makes now the base of the next :meth:`incremental_state_dict` (call it
        right after saving a full ``state_dict``). Needs an SSD tier (``path``)."""
        checkpoint.mark_checkpoint(self)

    def __reduce_ex__(self, protocol):
        raise checkpoint.not_picklable(self)

    @classmethod
    def open(
        cls,
        ssd: str | os.PathLike | SSDConfig,
        *,
        cache: CacheConfig | None = None,
        device: torch.device | str | None = None,
        **deprecated,
    ) -> TieredEmbeddingBagCollection:
        """Reopens the collection at ``ssd`` (its directory, or an :class:`SSDConfig` naming
        it) with the tables (and their optimizers) its ``collection.json`` lists; ``cache``,
        ``device`` and ``**deprecated`` as the constructor's (not ``tables`` nor ``optimizer``:
        to train on with other hyper-parameters, build the collection with ``TableConfig``s
        whose optimizers differ from the stored ones in those alone)."""
        if "tables" in deprecated or "optimizer" in deprecated:
            raise InvalidInputError(
                "open() takes the tables and their optimizers from the collection's directory; "
                "construct TieredEmbeddingBagCollection(tables, ssd=ts.SSDConfig(path)) to give "
                "them"
            )
        cache, ssd_config = configs_to_open(
            "TieredEmbeddingBagCollection.open", ssd, deprecated, cache
        )
        tables = tables_of(read_manifest(ssd_config.path))
        return cls(tables, cache=cache, ssd=ssd_config, optimizer=None, device=device)

    def extra_repr(self) -> str:
        parts = []
        for g in self.groups:
            l1 = g.store.l1
            parts.append(
                f"{g.name}: tables={[t.name for t in g.tables]}, cache={l1.sets}x{l1.ways}"
            )
        return f"device={self.device}\n" + "\n".join(parts)
