"""``mode="max"`` pooling, forward and backward, for any backend, in torch ops.

The kernels pool by sum or mean only. Max pooling takes the generic path: the batch's unique
rows are gathered from where they live (the backend's ``gather``: L1 slots, else L2
addresses), pooled by ``torch.nn.functional.embedding_bag(mode="max")`` with autograd, and in
the backward each unique row's gradient (from that graph: the row that gave a bag's maximum
in a column gets that column's gradient, as in torch) is applied by the fused optimizer and
written back where the row lives (the backend's ``scatter``, marking it dirty).

Shapes: ``n`` indices, ``B`` bags, ``U`` unique rows, ``D`` embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .optim import Optimizer


@dataclass
class MaxGraph:
    """The autograd graph of a training batch's pooling, kept from forward to backward."""

    pooled: torch.Tensor  # (B, D): the pooling's output, still attached to ``weights``
    weights: torch.Tensor  # (U, D): the unique rows' weights at the forward, a leaf


def forward(store, batch, offsets: torch.Tensor, keep_graph: bool):
    """``(pooled (B, D), graph)``: each bag's element-wise maximum over its rows (zeros for an
    empty bag, as torch); ``graph`` is a :class:`MaxGraph` for :func:`backward` with
    ``keep_graph``, else ``None``. ``offsets`` has ``B + 1`` entries, the last one ``n``."""
    weights = store.gather(batch, store.layout.dim)
    inverse = batch.inverse.to(weights.device)
    if not keep_graph:
        pooled = F.embedding_bag(inverse, weights, offsets, mode="max", include_last_offset=True)
        return pooled, None
    weights.requires_grad_(True)
    with torch.enable_grad():  # a custom Function's forward runs with grad disabled
        pooled = F.embedding_bag(inverse, weights, offsets, mode="max", include_last_offset=True)
    return pooled.detach(), MaxGraph(pooled, weights)


def backward(store, batch, graph: MaxGraph, grad_out: torch.Tensor, optimizer: Optimizer | None):
    """Applies ``optimizer`` to every unique row of the batch with its summed gradient
    ``(U, D)`` and stores the rows where they live (cached ones become dirty)."""
    if optimizer is None or batch.ids.numel() == 0:
        return
    (grad,) = torch.autograd.grad(graph.pooled, graph.weights, grad_out.to(graph.pooled.device))
    rows = store.gather(batch)  # (U, width): weights and optimizer state
    store.scatter(batch, optimizer.update(rows, grad.to(rows.device)))
