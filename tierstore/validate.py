"""Checks of a batch's indices, offsets and per-sample weights, before anything changes.

``normalize_batch`` turns every form ``torch.nn.EmbeddingBag`` accepts (2-D input; 1-D input
with offsets, with or without the last offset) into one: flat int64 indices and ``B + 1``
offsets ending at ``n``. Each problem raises :class:`InvalidInputError` naming it.
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index_tensor(t, what: str, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise InvalidInputError(f"{what} must be int32 or int64, got {t.dtype}")
    if t.dim() not in ndims:
        raise InvalidInputError(
            f"{what} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}"
        )


def normalize_batch(
    indices: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: str,
    include_last_offset: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(indices (n,) int64, offsets (B+1,) int64, per_sample_weights (n,) or None)`` on ``device``."""
    _check_index_tensor(indices, "indices", (1, 2))
    if indices.dim() == 2:
        if offsets is not None:
            raise InvalidInputError("offsets must be None when indices is 2-D (B, L)")
        bags, length = indices.shape
        flat = indices.reshape(-1)
        offs = torch.arange(bags + 1, dtype=torch.int64) * length
    else:
        if offsets is None:
            raise InvalidInputError("offsets are required when indices is 1-D")
        _check_index_tensor(offsets, "offsets", (1,))
        flat = indices
        offs = offsets.to(torch.int64).cpu()
        n = flat.numel()
        if include_last_offset:
            if offs.numel() == 0:
                raise InvalidInputError(
                    "with include_last_offset, offsets needs at least one entry"
                )
            if int(offs[-1]) != n:
                raise InvalidInputError(
                    f"with include_last_offset, the last offset must equal the number of "
                    f"indices ({n}), got {int(offs[-1])}"
                )
        else:
            offs = torch.cat([offs, torch.tensor([n])])
        if offs.numel() > 1 and int(offs[0]) != 0:
            raise InvalidInputError(f"offsets[0] must be 0, got {int(offs[0])}")
        if int(offs.max()) > n:
            raise InvalidInputError(
                f"offsets must not exceed the number of indices ({n}), got {int(offs.max())}"
            )
        steps = offs[1:] - offs[:-1]
        if steps.numel() and int(steps.min()) < 0:
            at = int((steps < 0).nonzero()[0, 0])
            raise InvalidInputError(
                f"offsets must be non-decreasing: offsets[{at + 1}] = {int(offs[at + 1])} "
                f"< offsets[{at}] = {int(offs[at])}"
            )
    psw = None
    if per_sample_weights is not None:
        if mode != "sum":
            raise InvalidInputError(
                f"per_sample_weights are only supported with mode='sum', not {mode!r}"
            )
        if (
            not isinstance(per_sample_weights, torch.Tensor)
            or not per_sample_weights.is_floating_point()
        ):
            raise InvalidInputError("per_sample_weights must be a floating-point tensor")
        if per_sample_weights.shape != indices.shape:
            raise InvalidInputError(
                f"per_sample_weights must have the shape of indices {tuple(indices.shape)}, "
                f"got {tuple(per_sample_weights.shape)}"
            )
        if per_sample_weights.dtype != torch.float32:
            raise InvalidInputError(
                f"per_sample_weights must be float32 (the table's dtype), got {per_sample_weights.dtype}"
            )
        psw = per_sample_weights.reshape(-1).to(device)
    return flat.to(device, torch.int64), offs.to(device), psw
