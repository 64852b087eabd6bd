"""The CPU backend: the engine's steps as vectorised torch ops.

This is the reference every other backend is checked against. The functions run on any
device (they are plain torch), but on CUDA the kernel backend in ``tierstore/cuda.py`` replaces
them. Shapes: ``n`` indices, ``B`` bags, ``U`` unique rows, ``D`` embedding dim.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .cache import Lookup, SetAssociativeCache
from .cache_compiled import CompiledCache
from .compiled import COMPILED
from .errors import FallbackWarning
from .optim import Optimizer
from .policy import Policy, make_policy

name = "cpu"


def graph_unsupported(store, optimizer: Optimizer | None) -> str | None:
    """Why a step of ``store`` cannot be captured in a CUDA graph (always: these are torch ops
    that read counts back to the host)."""
    return "the CUDA kernels (CuPy) are not available, and the torch fallback reads the device"


def load_hyper(store, optimizer: Optimizer | None) -> None:
    """Nothing: the torch ops read the rule's ``lr`` and ``eps`` at each step."""


def new_cache(
    rows: int,
    ways: int,
    policy: str | Policy,
    device: torch.device | str,
    id_bound: int | None = None,
) -> SetAssociativeCache:
    """The L1 cache state on ``device`` (arguments as :class:`SetAssociativeCache`'s). On the
    CPU with numba, a :class:`~tierstore.cache_compiled.CompiledCache` for a policy that declares
    a ``compiled_score``; else the torch specification, :class:`SetAssociativeCache`, with a
    ``FallbackWarning`` where the compiled step was possible but for the policy."""
    policy = make_policy(policy)
    compiled = COMPILED and torch.device(device).type == "cpu"
    if compiled and policy.compiled_score is not None:
        return CompiledCache(rows, ways, policy, device, id_bound)
    cache = SetAssociativeCache(rows, ways, policy, device, id_bound)
    if compiled:
        warnings.warn(
            f"the policy {getattr(policy, 'name', type(policy).__name__)!r} declares "
            "no compiled_score: the CPU cache steps it with the torch step (slower)",
            FallbackWarning,
            stacklevel=2,
        )
    return cache


def lookup(
    cache: SetAssociativeCache, ids: torch.Tensor, counts: torch.Tensor, hold: bool = True
) -> Lookup:
    """One cache step (see :meth:`SetAssociativeCache.lookup`). The step always locks its rows
    (``hold`` is the CUDA backend's, which can skip that for an inference forward)."""
    return cache.lookup(ids, counts)


def move_rows(store, found: Lookup, addresses: torch.Tensor) -> None:
    """Writes dirty victims back to their L2 address, then copies the filled rows in from L2
    (ascending ids) and records their L2 address."""
    wb = found.victim_dirty
    if bool(wb.any()):
        slots = found.fill_slots[wb]
        store.host.write(store.l1.home[slots], store.l1.rows(slots))
    if found.fill_slots.numel():
        home = addresses[found.fill_index]
        rows = store.host.read(home)
        store.l1.set_rows(found.fill_slots, rows.to(store.device, non_blocking=True))
        store.l1.home[found.fill_slots] = home


def gather(store, batch, cols: int | None = None) -> torch.Tensor:
    """Rows ``(U, cols)`` of a batch from where they live: L1 slots, else L2 addresses."""
    cols = store.layout.width if cols is None else cols
    cached = batch.slots >= 0
    rows = torch.empty((batch.ids.numel(), cols), device=store.device)
    slots = batch.slots[cached]
    if cols <= store.layout.dim:  # weights only (the forward's)
        rows[cached] = store.l1.weights[slots, :cols]
    else:
        rows[cached] = store.l1.rows(slots)[:, :cols]
    if not bool(cached.all()):
        direct = store.host.read(batch.addresses[~cached])[:, :cols]
        rows[~cached] = direct.to(rows.device)
    return rows


def scatter(store, batch, rows: torch.Tensor) -> None:
    """Stores updated rows where they live; cached ones become dirty."""
    cached = batch.slots >= 0
    slots = batch.slots[cached]
    store.l1.set_rows(slots, rows[cached])
    store.l1.mark_dirty(slots)
    if not bool(cached.all()):
        direct = ~cached
        store.host.write(batch.addresses[direct], rows[direct])
        # A conflict miss of this batch may have been filled into L1 since, by a prefetched
        # batch (it was locked in L2, not in L1): keep that copy equal to L2.
        now = store.l1.find(batch.ids[direct])
        refill = now >= 0
        if bool(refill.any()):
            store.l1.set_rows(now[refill], rows[direct][refill])


def forward(
    store,
    batch,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Pooled bags ``(B, D)``; ``offsets`` has ``B + 1`` entries, the last one ``n``."""
    weights = gather(store, batch, store.layout.dim)
    return F.embedding_bag(
        batch.inverse,
        weights,
        offsets,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=True,
    )


def backward(
    store,
    batch,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None,
    mode: str,
    optimizer: Optimizer | None,
    want_weight_grad: bool,
) -> torch.Tensor | None:
    """Reduces the gradient per unique row (in index order, deterministic), applies the fused
    optimizer where each row lives, and returns the gradient of the per-sample weights if asked."""
    dim = store.layout.dim
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    grad = grad_out[bag]  # (n, D): each index's share of its bag's gradient
    if mode == "mean":
        grad = grad / lengths.clamp(min=1)[bag].unsqueeze(1).to(grad.dtype)
    rows = gather(store, batch)
    weight_grad = None
    if want_weight_grad:
        weight_grad = (grad * rows[batch.inverse, :dim]).sum(1)
    if per_sample_weights is not None:
        grad = grad * per_sample_weights.unsqueeze(1)
    if optimizer is not None:
        summed = torch.zeros((batch.ids.numel(), dim), device=grad.device)
        summed.index_add_(0, batch.inverse, grad)
        scatter(store, batch, optimizer.update(rows, summed))
    return weight_grad
