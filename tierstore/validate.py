"""Checks of a batch's indices, offsets and per-sample weights, before anything changes.

``normalize_batch`` turns every form ``torch.nn.EmbeddingBag`` accepts (2-D input; 1-D input
with offsets, with or without the last offset) into one: flat int64 indices and ``B + 1``
offsets ending at ``n``, on the table's device. Each problem raises
:class:`InvalidInputError` naming it. The value checks (id range, offsets) are reduced on the
device and read back together: one device-to-host read per batch, not one per check, which
the caller may wait for later (``BatchChecks``), after queueing work that changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import EMPTY
from .errors import InvalidInputError

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_has_data(t: torch.Tensor, what: str) -> None:
    """Raises :class:`InvalidInputError` if ``t`` holds no values (a ``meta`` tensor)."""
    if t.device.type == "meta":
        raise InvalidInputError(
            f"{what} is on the 'meta' device, which holds shapes but no values: give a tensor "
            "with data (on the CPU or the table's device)"
        )


def _check_index_tensor(t, what: str, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    check_has_data(t, what)
    if t.dtype not in _INDEX_DTYPES:
        raise InvalidInputError(f"{what} must be int32 or int64, got {t.dtype}")
    if t.dim() not in ndims:
        raise InvalidInputError(
            f"{what} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}"
        )


def _check_weights(psw, indices: torch.Tensor, mode: str) -> None:
    if mode != "sum":
        raise InvalidInputError(
            f"per_sample_weights are only supported with mode='sum', not {mode!r}"
        )
    if not isinstance(psw, torch.Tensor) or not psw.is_floating_point():
        raise InvalidInputError("per_sample_weights must be a floating-point tensor")
    check_has_data(psw, "per_sample_weights")
    if psw.shape != indices.shape:
        raise InvalidInputError(
            f"per_sample_weights must have the shape of indices {tuple(indices.shape)}, "
            f"got {tuple(psw.shape)}"
        )
    if psw.dtype != torch.float32:
        raise InvalidInputError(
            f"per_sample_weights must be float32 (the table's dtype), got {psw.dtype}"
        )


def check_id_range(lo: int, hi: int, num_rows: int | None, what: str = "indices") -> None:
    """Raises if ``[lo, hi]`` (the smallest and largest id) leaves the table."""
    if num_rows is not None and (lo < 0 or hi >= num_rows):
        bad = lo if lo < 0 else hi
        raise InvalidInputError(f"{what} must be in [0, {num_rows}) (num_embeddings), found {bad}")
    if num_rows is None and lo == EMPTY:
        raise InvalidInputError(f"{what}: -2**63 is reserved (the cache's empty tag)")


def read_back_later(facts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``facts`` on the host without waiting: on CUDA a pinned copy queued on the current
    stream and the event to wait on before reading it; on the CPU ``facts`` itself and None."""
    if not facts.is_cuda:
        return facts, None
    host = torch.empty(facts.shape, dtype=facts.dtype, pin_memory=True)
    host.copy_(facts, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class BatchChecks:
    """The value checks of a batch (id range; for offsets the caller gave, their first, last
    and largest entry and smallest step), reduced on the device into one small tensor whose
    copy to the host starts at once. On a GPU the host need not wait for it right away: it can
    queue work that changes nothing (the unique step) and call :meth:`wait` before the first
    change; the device then never idles while the host reads."""

    def __init__(self, facts, n: int, offs, include_last_offset: bool, num_rows: int | None):
        self._n, self._offs = n, offs
        self._include_last_offset, self._num_rows = include_last_offset, num_rows
        self._facts, self._event = read_back_later(facts)
        self._passed = False

    @classmethod
    def done_elsewhere(cls) -> BatchChecks:
        """Checks that pass at once: the batch's values are checked by the caller (a captured
        step's are checked at each replay, ``graphs.GraphedStep``)."""
        checks = cls.__new__(cls)
        checks._passed = True
        return checks

    def wait(self) -> None:
        """Raises :class:`InvalidInputError` naming the first problem (waits for the read)."""
        if self._passed:
            return
        if self._event is not None:
            self._event.synchronize()
        lo, hi, *offset_facts = self._facts.tolist()
        if offset_facts:  # else the offsets were made here from a 2-D input: valid as made
            self._check_offsets(*offset_facts)
        if self._n:
            check_id_range(lo, hi, self._num_rows)
        self._passed = True

    def _check_offsets(self, first: int, last: int, largest: int, smallest_step: int) -> None:
        n, offs = self._n, self._offs
        if self._include_last_offset and last != n:
            raise InvalidInputError(
                f"with include_last_offset, the last offset must equal the number of indices ({n}), got {last}"
            )
        if first != 0:  # also where the offsets name no bag but indices has some: refused,
            # as torch refuses offsets=[n] with include_last_offset
            if offs.numel() == 1:
                raise InvalidInputError(
                    f"offsets name no bag (empty, or only the last offset) but indices has {n} "
                    "entries: give offsets[0] = 0 for a bag, or no indices for no bag"
                )
            raise InvalidInputError(f"offsets[0] must be 0, got {first}")
        if largest > n:
            raise InvalidInputError(
                f"offsets must not exceed the number of indices ({n}), got {largest}"
            )
        if smallest_step < 0:
            steps = offs[1:] - offs[:-1]
            at = int((steps < 0).nonzero()[0, 0])
            raise InvalidInputError(
                f"offsets must be non-decreasing: offsets[{at + 1}] = {int(offs[at + 1])} "
                f"< offsets[{at}] = {int(offs[at])}"
            )


def normalize_batch(
    indices: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: str,
    include_last_offset: bool,
    device: torch.device,
    num_rows: int | None,
    defer_checks: bool = False,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, BatchChecks]:
    """``(indices (n,) int64, offsets (B+1,) int64, per_sample_weights (n,) or None, checks)``
    on ``device``, every id checked against ``num_rows`` (``None``: any int64 id). The form
    and type checks raise here; the value checks (:class:`BatchChecks`) too, unless
    ``defer_checks``: then the caller must call ``checks.wait()`` before changing anything.
    ``values=False`` skips the value checks: the caller has checked these very tensors (a
    step being captured into a CUDA graph, whose inputs are checked at each replay)."""
    _check_index_tensor(indices, "indices", (1, 2))
    if per_sample_weights is not None:
        _check_weights(per_sample_weights, indices, mode)
    flat = indices.reshape(-1).to(device, torch.int64)
    n = flat.numel()
    if indices.dim() == 2:
        if offsets is not None:
            raise InvalidInputError("offsets must be None when indices is 2-D (B, L)")
        bags, length = indices.shape
        offs = torch.arange(bags + 1, dtype=torch.int64, device=device) * length
    else:
        if offsets is None:
            raise InvalidInputError("offsets are required when indices is 1-D")
        _check_index_tensor(offsets, "offsets", (1,))
        offs = offsets.to(device, torch.int64)
        if include_last_offset and offs.numel() == 0:
            raise InvalidInputError("with include_last_offset, offsets needs at least one entry")
        if not include_last_offset:
            offs = torch.cat([offs, torch.full((1,), n, dtype=torch.int64, device=device)])

    psw = None if per_sample_weights is None else per_sample_weights.reshape(-1).to(device)
    if not values:
        return flat, offs, psw, BatchChecks.done_elsewhere()
    # Every value fact in one read: id range, then the offsets' first, last and largest entry
    # and smallest step, unless they were made here (2-D input) and need no reductions.
    zero = torch.zeros((), dtype=torch.int64, device=device)
    lo, hi = torch.aminmax(flat) if n else (zero, zero)
    parts = [lo, hi]
    if indices.dim() == 1:
        steps = offs[1:] - offs[:-1]
        parts += [offs[0], offs[-1], offs.max(), steps.min() if steps.numel() else zero]
    checks = BatchChecks(torch.stack(parts), n, offs, include_last_offset, num_rows)
    if not defer_checks:
        checks.wait()
    return flat, offs, psw, checks


def prefix_sums(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(n + 1,)`` the sums of the 1-D ``x (n,)`` before each position, then its total (in
    ``dtype``, default ``x``'s): one scan into place after a zero, where a ``cat`` of a zero
    and ``x.cumsum(0)`` would copy the scan."""
    out = x.new_empty(x.numel() + 1, dtype=dtype or x.dtype)
    out[:1].zero_()
    torch.cumsum(x, 0, out=out[1:])
    return out


def drop_padding(
    flat: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    padding_idx: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch without its entries equal to ``padding_idx``, as ``torch.nn.EmbeddingBag``
    treats them: they add nothing to a bag, do not count in a mean, and their row gets no
    gradient. ``flat (n,)`` and ``offsets (B+1,)`` (ending at ``n``, already checked) become
    ``(m,)`` and ``(B+1,)`` ending at ``m``; ``per_sample_weights (n,)`` becomes ``(m,)``
    (through autograd: a dropped entry's weight gets a zero gradient, as in torch)."""
    keep = flat != padding_idx
    kept_before = prefix_sums(keep, torch.int64)  # entries kept before each position
    psw = None if per_sample_weights is None else per_sample_weights[keep]
    return flat[keep], kept_before[offsets], psw


def as_id_array(ids, what: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array (uint64 keeps its bits), or a clear error."""
    a = np.asarray(ids)
    if a.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidInputError(f"{what} must be integers, got dtype {a.dtype}")
    if a.dtype == np.uint64:
        return a.view(np.int64)
    return a.astype(np.int64, copy=False)
