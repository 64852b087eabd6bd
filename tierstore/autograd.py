"""The autograd face of a table's batch: pooled bags forward, the fused optimizer in backward.

Both modules (``module.py``'s single table and ``collection.py``'s groups of tables) call
:class:`TieredBagFunction` with the owner of a store: any object with ``store`` and
``optimizer`` (the rule with its hyper-parameters of this moment), and optionally ``_lock``,
which the backward holds (autograd may run it on a thread of its own). An update sets the
owner's ``_unflushed`` flag, which ``close()`` reads.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

from . import bag_max
from .store import Batch


class BatchHandle:
    """Keeps a training batch's rows locked until its backward runs or its graph is freed
    (then ``release(batch)`` runs, on whichever thread frees it)."""

    def __init__(self, batch: Batch, release: Callable[[Batch], None]):
        self.batch = batch
        weakref.finalize(self, release, batch)


class TieredBagFunction(torch.autograd.Function):
    """``apply(anchor, per_sample_weights, owner, handle, offsets, mode, update)``: the pooled
    bags ``(B, D)`` of ``handle.batch``; in backward, the gradient of the per-sample weights
    and, where ``update``, the owner's optimizer applied to the batch's rows where they live.
    ``anchor`` is a zero-size leaf that requires grad, so that autograd calls the backward even
    when nothing else of the batch does."""

    @staticmethod
    def forward(ctx, anchor, per_sample_weights, owner, handle, offsets, mode, update):
        ctx.owner, ctx.handle, ctx.offsets, ctx.mode = owner, handle, offsets, mode
        ctx.update = update
        ctx.save_for_backward(per_sample_weights)
        store = owner.store
        if mode == "max":  # the kernels pool by sum and mean: max takes the generic path
            out, ctx.max_graph = bag_max.forward(store, handle.batch, offsets, keep_graph=True)
            return out
        return store.forward(handle.batch, offsets, per_sample_weights, mode)

    @staticmethod
    def backward(ctx, grad_out):
        with getattr(ctx.owner, "_lock", None) or contextlib.nullcontext():
            return TieredBagFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        owner, batch = ctx.owner, ctx.handle.batch
        if batch.released:
            raise RuntimeError(
                f"{type(owner).__name__}: backward ran twice through one batch (retain_graph) "
                "or after its rows were released; the fused optimizer updates each batch once"
            )
        (psw,) = ctx.saved_tensors
        store = owner.store
        optimizer = owner.optimizer if ctx.update else None  # the lr of this moment
        psw_grad = None
        try:
            if ctx.mode == "max":
                bag_max.backward(store, batch, ctx.max_graph, grad_out, optimizer)
            else:
                psw_grad = store.backward(batch, grad_out.contiguous(), ctx.offsets, psw,
                                          ctx.mode, optimizer, ctx.needs_input_grad[1])  # fmt: skip
            if ctx.update:
                owner._unflushed = True
        finally:
            store.release(batch)
            ctx.max_graph = None
        return None, psw_grad, None, None, None, None, None
