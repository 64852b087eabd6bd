"""A collection's batch: from the user's keyed input to each group's flat batch, and from the
groups' pooled outputs to one :class:`~tierstore.keyed.KeyedTensor`.

Shapes: ``B`` samples, ``F`` features (``F_g`` of them in group ``g``), ``n`` ids (``n_g`` in
group ``g``), ``D_g`` the dim of group ``g``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidInputError
from .keyed import (
    JaggedBatch,
    JaggedChecks,
    KeyedTensor,
    looks_like_keyed_jagged,
    parse_jagged,
    safe_lengths,
)
from .table_config import TableConfig
from .table_groups import TableGroup
from .validate import prefix_sums


@dataclass
class GroupInput:
    """A group's share of a batch: its ids (group row ids), offsets and weights."""

    ids: torch.Tensor  # (n_g,) int64 group row ids, feature-major
    offsets: torch.Tensor  # (F_g * B + 1,) int64
    weights: torch.Tensor | None  # (n_g,) float32, or None
    mode: str


@dataclass
class PreparedBatch:
    """A batch checked for form: ``B``, the value checks and, once split
    (:meth:`FeatureLayout.split`), each group's input in group order. ``key`` and ``grad``
    identify the user's tensors it was made from (see :func:`batch_key`), so that a prefetched
    batch's forward can take it as it is, without reading the device again."""

    batch: JaggedBatch
    position: dict[str, int]  # the input's place of each feature
    checks: JaggedChecks | None  # wait() before the first change (None: unchecked, a capture)
    key: tuple[Any, ...] = ()
    grad: tuple[bool, ...] = ()
    # Whether :meth:`FeatureLayout.split` reads the checks (several groups: each group's share
    # of the values is sized on the host)
    split_reads: bool = False
    groups: list[GroupInput] | None = None  # None until split
    pushed: bool = False  # a prefetched batch: in its groups' queues yet
    error: Exception | None = None  # a prefetched batch refused before it was pushed

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.batch.batch_size


def batch_key(features, keys, values, lengths, offsets, weights) -> tuple[Any, ...]:
    """The user's tensors (and feature names) of a batch in any of its forms: what tells a
    forward that its batch is the one prefetched (the same objects, unchanged) with no device
    read."""
    return tuple(
        part for _, part in named_batch_parts(features, keys, values, lengths, offsets, weights)
    )


def named_batch_parts(features, keys, values, lengths, offsets, weights) -> list[tuple[str, Any]]:
    """:func:`batch_key`'s parts, each with what the user calls it (``"lengths"``,
    ``"feature 'f1' offsets"``, ``"KeyedJaggedTensor.values()"``): what an error names."""
    if features is None:
        names = ("keys", "values", "lengths", "offsets", "weights")
        return list(zip(names, (tuple(keys or ()), values, lengths, offsets, weights), strict=True))
    if isinstance(features, Mapping):
        out: list[tuple[str, Any]] = []
        for name, item in features.items():
            out.append(("feature names", name))
            parts = item if isinstance(item, tuple | list) else (item,)
            for what, part in zip(("indices", "offsets", "weights"), parts):
                out.append((f"feature {name!r} {what}", part))
        return out
    if looks_like_keyed_jagged(features):
        out = [("KeyedJaggedTensor.keys()", tuple(features.keys()))]
        out.append(("KeyedJaggedTensor.values()", features.values()))
        for method in ("lengths", "offsets", "weights_or_none"):
            get = getattr(features, method, None)
            out.append((f"KeyedJaggedTensor.{method}()", get() if callable(get) else None))
        return out
    return [("batch", features)]  # not a batch: the forward's checks will say so


def grad_signature(key: tuple[Any, ...]) -> tuple[bool, ...]:
    """Whether grad mode is on, and which of ``key``'s tensors require grad: a prefetched
    batch's weights were prepared under these (its forward prepares them again otherwise)."""
    wants = [t.requires_grad for t in key if isinstance(t, torch.Tensor)]
    return (torch.is_grad_enabled(), *wants)


class FeatureLayout:
    """Where a collection's features go: each feature's table and group, the output's keys
    (tables in order, each table's features in order) and columns.

    Args:
        tables: the collection's tables, in order.
        groups: their groups (:func:`~tierstore.table_groups.group_tables`).
        device: where batches are prepared.
    """

    def __init__(self, tables: list[TableConfig], groups: list[TableGroup], device):
        self.groups, self.device = groups, device
        self.table_at = {t.name: (g, k) for g in groups for k, t in enumerate(g.tables)}
        self._device_limits: dict[tuple[str, ...], torch.Tensor] = {}  # by the batch's keys
        self.feature_keys = [f for t in tables for f in t.feature_names]
        self.feature_table = {f: t for t in tables for f in t.feature_names}
        self.dims = [self.feature_table[f].embedding_dim for f in self.feature_keys]
        self.columns = self._column_order()
        self._orders: dict[tuple[int, ...], torch.Tensor] = {}  # see _whole_input

    def _column_order(self) -> torch.Tensor | None:
        """Where each output column (key order) is in the groups' outputs side by side, or
        ``None`` where the two orders agree (every collection of one group)."""
        start, at = 0, {}
        for g in self.groups:
            for f in g.features:
                at[f] = start
                start += g.dim
        cols = [
            at[f] + c for f in self.feature_keys for c in range(self.feature_table[f].embedding_dim)
        ]
        if cols == list(range(len(cols))):
            return None
        return torch.tensor(cols, dtype=torch.int64, device=self.device)

    def prepare(
        self, features, keys, values, lengths, offsets, weights, checked: bool = True
    ) -> PreparedBatch:
        """:meth:`parse` then :meth:`split`."""
        prep = self.parse(features, keys, values, lengths, offsets, weights, checked)
        self.split(prep)
        return prep

    def parse(
        self, features, keys, values, lengths, offsets, weights, checked: bool = True
    ) -> PreparedBatch:
        """The batch checked for form, its value checks started
        (:class:`~tierstore.keyed.JaggedChecks`: their copy to the host is under way, not
        waited for). Bad form raises :class:`InvalidInputError` naming the feature and table,
        before anything changes. ``checked=False`` (a step being captured, whose batches
        ``GraphedStep`` checks at each replay) starts no value checks (``checks`` is None)."""
        batch = parse_jagged(features, keys=keys, values=values, lengths=lengths,
                             offsets=offsets, weights=weights, device=self.device,
                             check_keys=self.match_keys)  # fmt: skip
        position = self.match_keys(batch.keys)
        owners = [self.feature_table[k].name for k in batch.keys]
        limits = [self._limit(t) for t in owners]
        checks = None
        if checked:
            checks = JaggedChecks(batch, limits, owners, self._limits_on_device(batch.keys, limits))
        key = batch_key(features, keys, values, lengths, offsets, weights)
        n, bags = batch.values.numel(), batch.lengths.shape[1]
        reads = len(self.groups) > 1 or not (bags or not n)  # (values without bags: refused)
        return PreparedBatch(batch, position, checks, key, grad_signature(key), reads)

    def split(self, prep: PreparedBatch) -> None:
        """Sets each group's input of a parsed batch. A collection of one group (one dim, one
        optimizer) needs no count on the host, so its checks are left to be read before the
        first change (``checks.wait()``); with several groups, each group's share of the
        values is sized on the host, so they are read here (raising
        :class:`InvalidInputError` on bad values, before anything changes)."""
        batch, position = prep.batch, prep.position
        if prep.split_reads and prep.checks is None:  # (a capture: one group, or refused)
            raise InvalidInputError("GraphedStep: a batch of values in no bag cannot be captured")
        if not prep.split_reads:
            prep.groups = [self._whole_input(self.groups[0], batch, position)]
            return
        starts = [0]
        for c in prep.checks.wait():
            starts.append(starts[-1] + c)
        prep.groups = [self._group_input(g, batch, position, starts) for g in self.groups]

    def _limits_on_device(self, keys: Sequence[str], limits: list[int]) -> torch.Tensor:
        """The id limits of a batch's features on the device, made once per key order (a copy
        to the device waits for it: never in a steady loop)."""
        got = self._device_limits.get(tuple(keys))
        if got is None:
            if len(self._device_limits) >= 64:  # batches in ever new key orders: start over
                self._device_limits.clear()
            got = torch.tensor(limits, dtype=torch.int64, device=self.device)
            self._device_limits[tuple(keys)] = got
        return got

    def _limit(self, table: str) -> int:
        g, k = self.table_at[table]
        return g.limits[k]

    def match_keys(self, keys: list[str]) -> dict[str, int]:
        """The batch's position of each configured feature; refuses unknown, missing and
        repeated keys."""
        position: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in position:
                raise InvalidInputError(f"feature {k!r} appears twice in the batch's keys")
            if k not in self.feature_table:
                raise InvalidInputError(
                    f"feature {k!r} is not a feature of any table; features: {self.feature_keys}"
                )
            position[k] = i
        missing = [k for k in self.feature_keys if k not in position]
        if missing:
            raise InvalidInputError(
                f"the batch lacks feature {missing[0]!r} (table "
                f"{self.feature_table[missing[0]].name!r})"
                + (f" and {missing[1:]}" if missing[1:] else "")
            )
        return position

    def _group_input(self, g: TableGroup, batch: JaggedBatch, position, starts) -> GroupInput:
        """The group's features (configured order) as one flat batch of group row ids, in a
        fixed number of tensor ops whatever the number of features: each feature's values are
        gathered from where the input put them and shifted by their table's base."""
        sel = [position[f] for f in g.features]  # each group feature's place in the input
        counts = [starts[i + 1] - starts[i] for i in sel]
        n = sum(counts)
        dev = self.device
        seg = torch.tensor(counts, dtype=torch.int64, device=dev)
        if sel == list(range(sel[0], sel[0] + len(sel))):  # in input order, one slice
            src, seg_start = slice(starts[sel[0]], starts[sel[0]] + n), None
        else:  # value j of the group comes from input value src[j]
            begin = torch.tensor([starts[i] for i in sel], dtype=torch.int64, device=dev)
            src, seg_start = _moved_positions(begin, seg, n)
        return self._finish(g, batch, src, seg, batch.lengths[sel], n, seg_start)

    def _whole_input(self, g: TableGroup, batch: JaggedBatch, position) -> GroupInput:
        """The batch of a collection of one group (every feature is the group's) with no read
        of the device: sized by the number of values alone. Until the checks pass, the lengths
        are made safe (``safe_lengths``: equal for a valid batch), so that a bad batch's ops
        stay in bounds before it is refused."""
        (nf, bags), n, dev = batch.lengths.shape, batch.values.numel(), self.device
        lengths = safe_lengths(batch.lengths.reshape(-1), n).view(nf, bags)  # input order
        sel = [position[f] for f in g.features]
        if sel == list(range(nf)):  # the input in the group's order: one slice
            return self._finish(g, batch, slice(0, n), lengths.sum(1), lengths, n)
        at = self._orders.get(tuple(sel))
        if at is None:  # made once per input order: a copy to the device may wait for it
            at = self._orders[tuple(sel)] = torch.tensor(sel, dtype=torch.int64, device=dev)
        counts = lengths.sum(1)
        seg = counts.index_select(0, at)  # (F_g,) ids per group feature
        begin = (counts.cumsum(0) - counts).index_select(0, at)
        src, seg_start = _moved_positions(begin, seg, n)
        return self._finish(g, batch, src, seg, lengths.index_select(0, at), n, seg_start)

    def _finish(
        self,
        g: TableGroup,
        batch: JaggedBatch,
        src,
        seg,
        lengths,
        n,
        seg_start: torch.Tensor | None = None,
    ) -> GroupInput:
        """The group's input from ``src`` (where each of its ``n`` values is in the input),
        ``seg (F_g,)`` (values per group feature, ``seg_start`` their starts where the caller
        has them) and ``lengths (F_g, B)`` (group order): its bags feature-major, or
        sample-major where the group is (``TableGroup.sample_major``)."""
        ids = batch.values[src] + _per_value(g.feature_base, seg, n, seg_start)
        psw = None if batch.weights is None else batch.weights[src]
        psw = self._mean_weights(g, batch, lengths, psw, n)
        mode = "mean" if g.poolings == {"mean"} and psw is None else "sum"
        if g.sample_major and len(g.features) > 1:
            at = _sample_major_order(lengths, n)
            ids, psw, lengths = ids[at], None if psw is None else psw[at], lengths.T
        lengths = lengths.reshape(-1)
        return GroupInput(ids, prefix_sums(lengths), psw, mode)

    def _mean_weights(self, g: TableGroup, batch: JaggedBatch, lengths, psw, n):
        """The weights ``(n,)`` (feature-major) of a group that pools its bags as sums: a group
        that mixes mean and sum tables, or a mean group given weights, pools a mean bag as a
        sum with each id weighted ``1 / len`` (times its own weight). Else ``psw`` as given."""
        if "mean" not in g.poolings or (g.poolings == {"mean"} and psw is None):
            return psw
        per_bag = torch.where(
            g.feature_mean.unsqueeze(1),
            1.0 / lengths.clamp(min=1).float(),
            torch.ones((), device=self.device),
        ).reshape(-1)
        scale = per_bag.repeat_interleave(lengths.reshape(-1), output_size=n)
        return scale if psw is None else psw * scale

    def capture_refusal(self, features) -> str | None:
        """Why a forward of these features' batches cannot be captured in a CUDA graph, or None:
        a batch split among several groups is sized on the host, and a ``KeyedJaggedTensor``
        (``features``) caches what it derives (lengths from offsets), which is no step input."""
        if len(self.groups) > 1:
            return (
                f"its tables form {len(self.groups)} groups (dims or optimizers), whose shares "
                "of a batch are sized on the host"
            )
        if looks_like_keyed_jagged(features):
            return (
                "a KeyedJaggedTensor caches what it derives (lengths from offsets): give the "
                "step its keys=, values=, lengths= (and weights=)"
            )
        return None

    def row_ids(self, name: str, ids) -> tuple[TableGroup, torch.Tensor]:
        """Table ``name``'s group and its row ids ``ids`` (any shape, int32 or int64) as group
        row ids ``(n,)`` int64 on the device; an unknown table, another dtype or an id out of
        the table's range raises :class:`InvalidInputError` (one device read, for the range)."""
        if name not in self.table_at:
            raise InvalidInputError(f"no table named {name!r}; tables: {list(self.table_at)}")
        g, k = self.table_at[name]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError(f"table {name!r}: ids must be an int32 or int64 tensor")
        ids = ids.reshape(-1).to(self.device, torch.int64)
        if ids.numel():
            lo, hi = torch.stack(list(torch.aminmax(ids))).tolist()
            if lo < 0 or hi >= g.limits[k]:
                raise InvalidInputError(
                    f"table {name!r}: ids must be in [0, {g.limits[k]}), found "
                    f"{lo if lo < 0 else hi}"
                )
        return g, ids + g.bases[k]

    def keyed(self, outs: Sequence[torch.Tensor], b: int) -> KeyedTensor:
        """The groups' ``(F_g * B, D_g)`` outputs as one ``(B, sum D)`` tensor in key order: per
        group a view where its bags are sample-major, else one transposing copy; then a cat of
        several groups, and one column gather where the groups' features
        interleave in the key order (a select and a cat per feature would cost a full-size
        gradient per feature in the backward)."""
        parts = [
            out.view(b, len(g.features) * g.dim)
            if g.sample_major
            else out.view(len(g.features), b, g.dim)
            .transpose(0, 1)
            .reshape(b, len(g.features) * g.dim)
            for g, out in zip(self.groups, outs, strict=True)
        ]
        values = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self.columns is not None:
            values = values.index_select(1, self.columns)
        return KeyedTensor(self.feature_keys, self.dims, values)


def _moved_positions(
    begin: torch.Tensor, seg: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src (n,), starts (S,))``: where each of ``n`` values laid out segment by segment,
    ``seg (S,)`` values each, comes from when segment ``s`` starts at ``begin[s]`` in the
    source; and the segments' starts in the new layout (``seg``'s exclusive running sum)."""
    starts = seg.cumsum(0) - seg
    shift = begin - starts  # source start minus new start, per segment
    return torch.arange(n, device=seg.device) + _per_value(shift, seg, n, starts), starts


def _per_value(
    per_segment: torch.Tensor, seg: torch.Tensor, n: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """``(n,)`` int64: ``per_segment (S,)``'s (int64) entry of each of ``n`` values laid out
    segment by segment, ``seg (S,)`` values each: ``per_segment.repeat_interleave(seg)``, as a
    running sum of the entries' steps placed where each segment starts (empty segments add
    theirs where the next one starts): a few passes of a thread per entry, where torch's CUDA
    ``repeat_interleave`` gives each segment one warp (its two calls in the 26-table step took
    0.26 ms on an H100, bench/RESULTS.md). ``starts``: ``seg``'s exclusive running sum, where
    the caller has it already."""
    if starts is None:
        starts = seg.cumsum(0) - seg
    steps = per_segment.clone()
    steps[1:] -= per_segment[:-1]
    # a bad batch's lengths (checked later) may start a segment past n: kept in bounds
    placed = per_segment.new_zeros(n + 1).index_add_(0, starts.clamp(0, n), steps)
    return placed[:n].cumsum(0)


def _sample_major_order(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` int64: the feature-major position of each value in sample-major order, where
    bag ``(f, b)`` of ``lengths (F, B)`` moves from ``f * B + b`` to ``b * F + f`` (one
    broadcast of each bag's shift to its values, whatever the lengths)."""
    fm = lengths.reshape(-1)
    sm = lengths.T.reshape(-1)  # (B * F,)
    fm_start = (fm.cumsum(0) - fm).view(lengths.shape).T.reshape(-1)
    return _moved_positions(fm_start, sm, n)[0]
