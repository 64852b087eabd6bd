"""Keyed input and output of a table collection, in the layouts of TorchRec.

Shapes: ``F`` features, ``B`` samples (the batch), ``n`` ids in all, ``D_f`` the dim of
feature ``f``'s table.

Input: a jagged batch keyed by feature name, as TorchRec's ``KeyedJaggedTensor`` lays it out:
one flat ``values (n,)`` tensor, feature-major (every sample of feature 0, then of feature 1,
...), and ``lengths (F * B,)`` (the ids in each (feature, sample) bag, in the same order) or
``offsets (F * B + 1,)``. :func:`parse_jagged` accepts that as keywords, a real
``KeyedJaggedTensor`` (duck-typed: ``keys()``, ``values()``, ``lengths()`` or ``offsets()``,
``weights_or_none()``; torchrec is not a dependency), or a dict of feature name to
``nn.EmbeddingBag`` input (``(indices, offsets)``, ``(indices, offsets, per_sample_weights)``,
or a 2-D ``(B, L)`` indices tensor). :class:`JaggedChecks` checks its values in one
device-to-host read.

Output: :class:`KeyedTensor`, TorchRec's ``KeyedTensor`` layout: one ``(B, sum D_f)`` tensor
whose columns hold the features one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidInputError
from .validate import read_back_later

_INDEX_DTYPES = (torch.int32, torch.int64)


class KeyedTensor:
    """Pooled embeddings of several features side by side, as TorchRec's ``KeyedTensor``.

    Args:
        keys: the feature names, in column order.
        length_per_key: ``D_f`` of each feature.
        values: ``(B, sum D_f)``; feature ``f`` is columns ``offset_per_key()[f]`` up to
            ``offset_per_key()[f + 1]``.

    Every view (:meth:`to_dict`, ``kt[name]``) is a slice of ``values``, so gradients flow
    back through whichever one the loss uses.
    """

    def __init__(self, keys: Sequence[str], length_per_key: Sequence[int], values: torch.Tensor):
        if len(keys) != len(length_per_key):
            raise InvalidInputError(
                f"KeyedTensor: {len(keys)} keys but {len(length_per_key)} lengths"
            )
        if values.dim() != 2 or values.shape[1] != sum(length_per_key):
            raise InvalidInputError(
                f"KeyedTensor: values must be (B, {sum(length_per_key)}), got {tuple(values.shape)}"
            )
        self._keys = list(keys)
        self._lengths = [int(n) for n in length_per_key]
        self._offsets = [0]
        for n in self._lengths:
            self._offsets.append(self._offsets[-1] + n)
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._values = values

    def keys(self) -> list[str]:
        """Feature names, in column order."""
        return list(self._keys)

    def values(self) -> torch.Tensor:
        """The whole ``(B, sum D_f)`` tensor."""
        return self._values

    def length_per_key(self) -> list[int]:
        """``D_f`` of each feature, in key order."""
        return list(self._lengths)

    def offset_per_key(self) -> list[int]:
        """First column of each feature, then the total width (``F + 1`` entries)."""
        return list(self._offsets)

    def __getitem__(self, key: str) -> torch.Tensor:
        """Feature ``key``'s ``(B, D_f)`` columns (a view)."""
        if key not in self._index:
            raise KeyError(f"{key!r} is not a key of this KeyedTensor; keys: {self._keys}")
        i = self._index[key]
        return self._values[:, self._offsets[i] : self._offsets[i + 1]]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Feature name to its ``(B, D_f)`` columns (views of :meth:`values`)."""
        return {k: self[k] for k in self._keys}

    def __repr__(self) -> str:
        return (
            f"KeyedTensor(keys={self._keys}, length_per_key={self._lengths}, "
            f"values={tuple(self._values.shape)})"
        )


@dataclass
class JaggedBatch:
    """A batch in ``KeyedJaggedTensor`` layout, its form checked, on the tables' device.

    ``keys`` are the input's feature names in the input's order; ``values (n,)`` int64
    feature-major; ``lengths (F, B)`` int64; ``weights (n,)`` float32 or ``None``.
    ``offsets_given`` says the user gave offsets (for the wording of errors).
    """

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    offsets_given: bool = False
    # (feature name or None for the whole batch, its offsets[0] (1,)): checked to be 0
    starts: list[tuple[str | None, torch.Tensor]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.lengths.shape[1]


def _index_tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise InvalidInputError(f"{what} must be int32 or int64, got {t.dtype}")
    return t


def _weights_tensor(w, n: int, what: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise InvalidInputError(f"{what} must be a floating-point tensor")
    if w.dtype != torch.float32:
        raise InvalidInputError(f"{what} must be float32 (the tables' dtype), got {w.dtype}")
    if w.dim() != 1 or w.numel() != n:
        raise InvalidInputError(
            f"{what} must have one entry per id ({n},), got shape {tuple(w.shape)}"
        )
    return w


def looks_like_keyed_jagged(obj) -> bool:
    """Whether ``obj`` has the methods of TorchRec's ``KeyedJaggedTensor`` that a batch needs
    (``keys()``, ``values()``, and ``lengths()`` or ``offsets()``; torchrec is not a
    dependency)."""
    return all(callable(getattr(obj, m, None)) for m in ("keys", "values")) and (
        callable(getattr(obj, "lengths", None)) or callable(getattr(obj, "offsets", None))
    )


def parse_jagged(
    features=None,
    *,
    keys: Sequence[str] | None = None,
    values: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    device: torch.device,
    check_keys: Callable[[list[str]], object] | None = None,
) -> JaggedBatch:
    """The batch in one form, checked for form and type (not values: :class:`JaggedChecks`).

    ``features`` is a ``KeyedJaggedTensor`` (or any object with its methods) or a dict of
    feature name to ``nn.EmbeddingBag`` input; else ``keys``, ``values`` and ``lengths`` or
    ``offsets`` (and optionally ``weights``) describe the batch as a ``KeyedJaggedTensor`` does.
    ``check_keys`` is called with the keys as soon as they are known (so that a wrong key is
    reported before the layout problems it causes).
    """
    if features is not None:
        if any(x is not None for x in (keys, values, lengths, offsets, weights)):
            raise InvalidInputError(
                "give the batch either positionally (a KeyedJaggedTensor or a dict) or as "
                "keys=, values=, lengths=/offsets=, weights=, not both"
            )
        if isinstance(features, Mapping):
            return _parse_dict(features, device, check_keys)
        if looks_like_keyed_jagged(features):
            lengths_of = getattr(features, "lengths", None)
            got_weights = getattr(features, "weights_or_none", None)
            keys = list(features.keys())
            values = features.values()
            if callable(lengths_of):
                lengths = lengths_of()
            else:
                offsets = features.offsets()
            weights = got_weights() if callable(got_weights) else None
            variable = getattr(features, "variable_stride_per_key", None)
            if callable(variable) and variable():
                raise InvalidInputError(
                    "a KeyedJaggedTensor with a batch size per feature (variable stride) is not "
                    "supported: every feature needs the same batch size"
                )
        else:
            raise InvalidInputError(
                "the batch must be a KeyedJaggedTensor, a dict of feature name to (indices, "
                f"offsets), or keys=/values=/lengths=; got {type(features).__name__}"
            )
    if keys is None or values is None:
        raise InvalidInputError("the batch needs keys= and values= (and lengths= or offsets=)")
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
        raise InvalidInputError(f"keys must be a list of feature names, got {keys!r}")
    keys = list(keys)
    if check_keys is not None:
        check_keys(keys)
    _index_tensor(values, "values")
    if values.dim() != 1:
        raise InvalidInputError(f"values must be 1-D, got shape {tuple(values.shape)}")
    if (lengths is None) == (offsets is None):
        raise InvalidInputError("give exactly one of lengths= and offsets=")
    n, nf = values.numel(), len(keys)
    if lengths is not None:
        _index_tensor(lengths, "lengths")
        lens = lengths.reshape(-1).to(device, torch.int64)
    else:
        _index_tensor(offsets, "offsets")
        offs = offsets.reshape(-1).to(device, torch.int64)
        if offs.numel() < 1:
            raise InvalidInputError("offsets needs at least one entry (F * B + 1 in all)")
        lens = offs[1:] - offs[:-1]
    if nf == 0:
        raise InvalidInputError("the batch has no features (keys is empty)")
    if lens.numel() % nf:
        raise InvalidInputError(
            f"{'lengths' if lengths is not None else 'offsets'} must hold one entry per "
            f"(feature, sample) bag: {lens.numel()} bags is not a multiple of the {nf} features "
            f"{keys}"
        )
    if weights is not None:
        _weights_tensor(weights, n, "weights")
    return JaggedBatch(
        keys,
        values.to(device, torch.int64),
        lens.view(nf, lens.numel() // nf),
        None if weights is None else weights.to(device),
        offsets_given=offsets is not None,
        starts=[] if offsets is None else [(None, offs[:1])],
    )


def _parse_dict(features: Mapping, device: torch.device, check_keys) -> JaggedBatch:
    """A dict of feature name to ``nn.EmbeddingBag`` input, as one jagged batch."""
    if check_keys is not None:
        check_keys(list(features))
    keys, values, lengths, weights, starts = [], [], [], [], []
    for key, item in features.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"feature names must be str, got {key!r}")
        if isinstance(item, torch.Tensor):
            item = (item, None)
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise InvalidInputError(
                f"feature {key!r}: expected (indices, offsets) or (indices, offsets, "
                f"per_sample_weights), got {type(item).__name__}"
            )
        idx, offs = item[0], item[1]
        psw = item[2] if len(item) == 3 else None
        _index_tensor(idx, f"feature {key!r}: indices")
        if idx.dim() == 2:
            if offs is not None:
                raise InvalidInputError(f"feature {key!r}: offsets must be None for 2-D indices")
            bags, length = idx.shape
            lens = torch.full((bags,), length, dtype=torch.int64, device=device)
        elif idx.dim() == 1:
            if offs is None:
                raise InvalidInputError(f"feature {key!r}: offsets are required for 1-D indices")
            _index_tensor(offs, f"feature {key!r}: offsets")
            if offs.dim() != 1:
                raise InvalidInputError(f"feature {key!r}: offsets must be 1-D")
            o = offs.to(device, torch.int64)
            # nn.EmbeddingBag's offsets: one start per bag; the last bag runs to the end.
            end = torch.full((1,), idx.numel(), dtype=torch.int64, device=device)
            lens = torch.cat([o, end])[1:] - o
            if o.numel():  # offsets[0] must be 0: checked with the values
                starts.append((key, o[:1]))
        else:
            raise InvalidInputError(
                f"feature {key!r}: indices must be 1-D or 2-D, got shape {tuple(idx.shape)}"
            )
        if psw is not None:
            psw = _weights_tensor(psw.reshape(-1), idx.numel(), f"feature {key!r}: weights")
        keys.append(key)
        values.append(idx.reshape(-1).to(device, torch.int64))
        lengths.append(lens)
        weights.append(psw)
    if not keys:
        raise InvalidInputError("the batch has no features (the dict is empty)")
    b0 = lengths[0].numel()
    for k, lens in zip(keys, lengths, strict=True):
        if lens.numel() != b0:
            raise InvalidInputError(
                f"feature {k!r} has a batch size of {lens.numel()} but feature {keys[0]!r} "
                f"has {b0}: every feature needs the same batch size"
            )
    if any(w is not None for w in weights) and not all(w is not None for w in weights):
        missing = [k for k, w in zip(keys, weights, strict=True) if w is None]
        raise InvalidInputError(
            f"per-sample weights were given for some features but not for {missing}: give them "
            "for all features or none"
        )
    return JaggedBatch(
        keys,
        torch.cat(values),
        torch.stack(lengths),
        torch.cat(weights) if weights[0] is not None else None,
        offsets_given=True,
        starts=starts,
    )


class JaggedChecks:
    """The value checks of a jagged batch against its tables, reduced on the device into one
    small tensor whose copy to the host starts at once (as ``validate.BatchChecks``): the host
    may queue work that changes nothing (a unique step) before :meth:`wait` reads it.

    ``limits`` holds the id limit of each feature's table (``0 <= id < limit``) and ``owners``
    the table of each feature (for the messages), in the batch's key order;
    ``limits_on_device``, the same limits as an int64 tensor on the values' device, if the
    caller keeps one (else it is copied there, which waits for the device).
    """

    def __init__(
        self,
        batch: JaggedBatch,
        limits: Sequence[int],
        owners: Sequence[str],
        limits_on_device: torch.Tensor | None = None,
    ):
        self._batch, self._limits, self._owners = batch, list(limits), list(owners)
        lengths, values = batch.lengths, batch.values
        dev = values.device
        nf, n = lengths.shape[0], values.numel()
        counts = lengths.sum(1)  # (F,)
        # Each value's feature without reading the counts first: the first feature whose end
        # lies past the value's position (the clamp keeps a batch with too few lengths in
        # range; the check of the sum refuses it)
        ends = counts.cumsum(0)
        feat = torch.searchsorted(ends, torch.arange(n, device=dev), right=True).clamp(max=nf - 1)
        # The first id outside its table, as (feature, id), or (-1, -1): one pass over the ids
        # and an argmax (a reduction per feature would contend on a few counters), then a few
        # one-element ops (no copy of the batch-sized tensors)
        if limits_on_device is None:  # (a copy to the device: a caller's loop passes its own)
            limits_on_device = torch.tensor(self._limits, dtype=torch.int64, device=dev)
        bad = torch.full((2,), -1, dtype=torch.int64, device=dev)
        if n:
            outside = (values < 0) | (values >= limits_on_device[feat])
            # the first one (0 where none is), as a (1,) tensor: a 0-d index may be read on
            # the host
            first = outside.view(torch.uint8).argmax().view(1)
            pair = torch.cat([feat.index_select(0, first), values.index_select(0, first)])
            bad = torch.where(outside.index_select(0, first), pair, bad)
        zero = torch.zeros(nf, dtype=torch.int64, device=dev)
        smallest = lengths.amin(1) if lengths.shape[1] else zero
        starts = [s.to(dev) for _, s in batch.starts]
        facts = torch.cat([counts, smallest, bad, *starts])
        self._facts, self._event = read_back_later(facts)
        self._counts: list[int] | None = None

    def wait(self) -> list[int]:
        """The number of ids of each feature (host ints, in the batch's key order), once the
        checks passed (waits for the read); else raises :class:`InvalidInputError` naming the
        feature and its table: negative lengths (decreasing offsets), lengths that do not sum
        to the number of values, offsets that do not start at 0, ids out of the table's
        range."""
        if self._counts is None:
            if self._event is not None:
                self._event.synchronize()
            self._counts = self._check(self._facts.tolist())
        return self._counts

    def _check(self, facts: list[int]) -> list[int]:
        batch, limits, owners = self._batch, self._limits, self._owners
        nf, n = batch.lengths.shape[0], batch.values.numel()
        counts_h, smallest_h = facts[:nf], facts[nf : 2 * nf]
        (bad_feature, bad_id), starts_h = facts[2 * nf : 2 * nf + 2], facts[2 * nf + 2 :]
        keys = batch.keys

        def name(f: int) -> str:
            return f"feature {keys[f]!r} (table {owners[f]!r})"

        for (key, _), first in zip(batch.starts, starts_h, strict=True):
            if first != 0:
                where = "offsets[0]" if key is None else f"feature {key!r}: offsets[0]"
                raise InvalidInputError(f"{where} must be 0, got {first}")
        for f in range(nf):
            if smallest_h[f] < 0:
                what = (
                    "offsets must be non-decreasing"
                    if batch.offsets_given
                    else "lengths must be >= 0"
                )
                raise InvalidInputError(f"{name(f)}: {what} (a bag has length {smallest_h[f]})")
        if sum(counts_h) != n:
            what = "the offsets" if batch.offsets_given else "the lengths"
            raise InvalidInputError(
                f"{what} must cover every value exactly: they sum to {sum(counts_h)} ids but "
                f"values holds {n} (ids per feature: {dict(zip(keys, counts_h, strict=True))})"
            )
        if bad_feature >= 0:
            f = bad_feature
            raise InvalidInputError(f"{name(f)}: ids must be in [0, {limits[f]}), found {bad_id}")
        return counts_h


def safe_lengths(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``lengths (k,)`` made safe to shape ``n`` values with before they are checked: each
    non-negative and all summing to ``n`` (the ends clamped to ``[0, n]``, made non-decreasing,
    the last one ``n``). Equal to ``lengths`` for a batch that passes its checks; for one that
    does not (refused before anything changes), the ops that use them stay in bounds."""
    if not lengths.numel():
        return lengths
    # lengths clamped at 0 make the ends non-decreasing (a scan with cummax is slow on CUDA)
    ends = lengths.clamp(min=0).cumsum(0).clamp(max=n)
    ends[-1:].fill_(n)  # (a fill kernel: a scalar store would copy from the host, which no
    # CUDA graph can capture)
    return torch.diff(ends, prepend=ends.new_zeros(1))
