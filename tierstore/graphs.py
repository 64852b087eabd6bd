"""A whole training step captured once as a CUDA graph and replayed for every batch.

A step through ``TieredEmbeddingBag`` launches about fifty kernels (unique, lookup, fills,
forward, backward with the fused optimizer, release). With skewed ids the kernels are short
and the device waits for the host's launches; a graph replays all of them with one launch. The
CUDA backend's step never reads the device (its counts stay there), so it can be captured;
what can't be captured is the host's check of each batch's ids and offsets, which must raise
before a kernel reads out of bounds. :class:`GraphedStep` therefore owns the step's inputs:
each call copies the new batch into the captured input buffers, runs every table's checks on
them (one device read per table, as in an eager step), and only then replays. A bad batch
raises :class:`InvalidInputError` with nothing in any table changed.

``TieredEmbeddingBag`` refuses to be captured by anything else (``torch.cuda.graph`` directly),
since nothing would check the batches then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidInputError
from .validate import normalize_batch

_capturing = threading.local()  # .forwards: the list GraphedStep is recording into, if any


@dataclass
class CapturedForward:
    """One table's forward inside a capture: what to check before each replay."""

    module: Any  # the TieredEmbeddingBag
    input: torch.Tensor
    offsets: torch.Tensor | None
    per_sample_weights: torch.Tensor | None
    first_step: int  # the table's host step count when the capture reached it
    batch: Any = None  # the store's Batch, set once looked up


def capturing() -> bool:
    """Whether a :class:`GraphedStep` is capturing its step on this thread."""
    return getattr(_capturing, "forwards", None) is not None


def refuse_capture() -> None:
    """Raises: a ``TieredEmbeddingBag`` is being captured by something other than GraphedStep."""
    raise InvalidInputError(
        "TieredEmbeddingBag is being captured into a CUDA graph outside tierstore.GraphedStep: "
        "capture the step with GraphedStep, which checks every batch's ids and offsets before "
        "each replay"
    )


def record_forward(module, input, offsets, per_sample_weights) -> CapturedForward:
    """Called by ``TieredEmbeddingBag.forward`` while a :class:`GraphedStep` captures: records
    the forward, or raises if the table cannot run a step without host reads."""
    if module.device.type != "cuda":
        why = f"it lives on {module.device}, and a CUDA graph replays device work only"
    else:
        why = module.store.backend.graph_unsupported(module.store, module.optimizer)
    if why is None and module._prefetched:
        why = "a prefetched batch is waiting (prefetch does not mix with a captured step)"
    if why is not None:
        raise InvalidInputError(f"this TieredEmbeddingBag cannot be captured: {why}")
    entry = CapturedForward(module, input, offsets, per_sample_weights, module.store.l1.step)
    _capturing.forwards.append(entry)
    return entry


class GraphedStep:
    """``step(*inputs)`` (forward, loss, backward: a whole training step) for batches of one
    fixed shape, replayed from a CUDA graph.

    The first ``warmup`` calls run eagerly (on a side stream, as CUDA graph capture wants; they
    are real steps on their batches), the next call captures ``step`` on copies of its inputs
    and replays it, and every later call copies its inputs into those buffers, checks them and
    replays. Every input must be a tensor of the captured shape and dtype; every
    ``TieredEmbeddingBag`` in the step must take its indices, offsets and weights from the
    inputs (or views of them) and, if it trains, run its backward inside ``step``. Returns what
    ``step`` returned at capture: tensors that each call overwrites (clone to keep them).
    Without CUDA every call simply runs ``step``.

    Example::

        step = ts.GraphedStep(lambda ids, g: emb(ids).backward(g))
        for ids in loader:
            step(ids.cuda(non_blocking=True), grad)
    """

    def __init__(self, step: Callable[..., Any], warmup: int = 1):
        self.step = step
        self.warmup = max(1, int(warmup))
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: Any = None
        self.forwards: list[CapturedForward] = []
        self.step_advance: list[tuple[Any, int]] = []  # (cache, host steps per replay)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Runs one step on ``inputs`` (see the class)."""
        if not torch.cuda.is_available():
            return self.step(*inputs)
        for k, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or not x.is_cuda:
                got = f"a tensor on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise InvalidInputError(
                    f"GraphedStep: input {k} must be a CUDA tensor (a graph replays device "
                    f"work only), got {got}"
                )
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._eager(inputs)
            self._capture(inputs)
        self._load(inputs)
        self.graph.replay()
        for cache, steps in self.step_advance:
            cache.step += steps
        return self.outputs

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.step(*inputs)
        main.wait_stream(side)
        return out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        # the captured buffers; each replay's batch is copied in by _load
        self.inputs = tuple(x.detach().clone() for x in inputs)
        graph = torch.cuda.CUDAGraph()
        _capturing.forwards = forwards = []
        try:
            with torch.cuda.graph(graph):
                outputs = self.step(*self.inputs)
        finally:
            _capturing.forwards = None
            # The capture ran no kernel: the host step counts go back, and no batch made during
            # it may ever be released eagerly (its buffers belong to the graph).
            first: dict[int, tuple[Any, int]] = {}
            for f in forwards:
                first.setdefault(id(f.module), (f.module.store.l1, f.first_step))
            advance = [(l1, l1.step - start) for l1, start in first.values()]
            for l1, start in first.values():
                l1.step = start
            unreleased = [f for f in forwards if f.batch is not None and not f.batch.released]
            for f in forwards:
                if f.batch is not None:
                    f.batch.released = True
        if unreleased:
            raise InvalidInputError(
                "GraphedStep: a TieredEmbeddingBag output's backward did not run inside the "
                "step; a captured training step must include the backward (or run its forward "
                "under torch.no_grad())"
            )
        storages = {x.untyped_storage().data_ptr() for x in self.inputs}
        for f in forwards:
            for what, t in (("indices", f.input), ("offsets", f.offsets),
                            ("per_sample_weights", f.per_sample_weights)):  # fmt: skip
                if t is not None and t.untyped_storage().data_ptr() not in storages:
                    raise InvalidInputError(
                        f"GraphedStep: a TieredEmbeddingBag's {what} must be one of the step's "
                        "inputs or a view of one, so that each batch is checked before the replay"
                    )
        self.graph, self.outputs = graph, outputs
        self.forwards, self.step_advance = forwards, advance

    def _load(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Copies a batch into the captured inputs and checks it for every table (raises before
        the replay, so nothing changes)."""
        if len(inputs) != len(self.inputs):
            raise InvalidInputError(
                f"GraphedStep: the captured step takes {len(self.inputs)} inputs, got {len(inputs)}"
            )
        for k, (x, buf) in enumerate(zip(inputs, self.inputs)):
            if x.shape != buf.shape or x.dtype != buf.dtype:
                raise InvalidInputError(
                    f"GraphedStep: input {k} has shape {tuple(x.shape)} and dtype {x.dtype}; the "
                    f"captured step takes {tuple(buf.shape)} {buf.dtype} (capture another "
                    "GraphedStep for another shape)"
                )
        with torch.no_grad():  # the step may have made a buffer a leaf that requires grad
            for x, buf in zip(inputs, self.inputs):
                if x.data_ptr() != buf.data_ptr():
                    buf.copy_(x, non_blocking=True)
        for f in self.forwards:
            m = f.module
            normalize_batch(
                f.input, f.offsets, f.per_sample_weights, m.mode, m.include_last_offset,
                m.device, m.num_embeddings,
            )  # fmt: skip
