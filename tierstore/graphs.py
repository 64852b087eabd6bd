"""A whole training step captured once as a CUDA graph and replayed for every batch.

A step through ``TieredEmbeddingBag`` launches about fifty kernels (unique, lookup, fills,
forward, backward with the fused optimizer, release). With skewed ids the kernels are short
and the device waits for the host's launches; a graph replays all of them with one launch. The
CUDA backend's step never reads the device (its counts stay there), so it can be captured;
what can't be captured is the host's check of each batch's ids and offsets, which must raise
before a kernel reads out of bounds. :class:`GraphedStep` therefore owns the step's inputs:
each call copies the new batch into the captured input buffers and queues every table's checks
on them (one device read per table, as in an eager step). A bad batch raises
:class:`InvalidInputError` with nothing in any table changed.

The capture is cut in two where the first table's lookup is about to change its cache, after
its unique step (which changes nothing and reads no id out of bounds): the head graph is
replayed while the host waits for the checks, and the tail only once they pass. So the device
works on the head while the host reads the checks, as in an eager step, instead of idling for
the round trip. What runs before the check is what an eager step runs before its first table
raises: the step's own work before that table's forward, and the table's unique step.

``TieredEmbeddingBag`` and ``TieredEmbeddingBagCollection`` refuse to be captured by anything
else (``torch.cuda.graph`` directly), since nothing would check the batches then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidInputError
from .validate import BatchChecks, normalize_batch

# .forwards: the list GraphedStep is recording into, if any; .capture: its _Capture
_capturing = threading.local()


@dataclass
class CapturedForward:
    """One module's forward inside a capture (a ``TieredEmbeddingBag``'s or a
    ``TieredEmbeddingBagCollection``'s): what to check and bring up to date at each replay."""

    module: Any
    # its batch's tensors by what they are (views of the step's inputs, or the capture refuses)
    tensors: dict[str, torch.Tensor | None]
    # queues the checks of the batch now in those tensors; the result's wait() raises on a bad one
    checks: Callable[[], Any]
    # each of its stores with the optimizer its kernels update by (read at each replay: a
    # scheduler's lr)
    updates: Callable[[], list[tuple[Any, Any]]]
    first_steps: list[tuple[Any, int]]  # (store, its host step count when the capture got there)
    batches: list[Any] = field(default_factory=list)  # the stores' Batches, once looked up
    training: bool = True  # the module's train()/eval() mode at capture: whether it updates


class _Capture:
    """The graphs of one capture: the head until the first change of a table's cache, then the
    tail (sharing the head's memory pool: they are always replayed in that order)."""

    def __init__(self):
        self.head = torch.cuda.CUDAGraph()
        self.tail: torch.cuda.CUDAGraph | None = None

    @property
    def current(self) -> torch.cuda.CUDAGraph:
        return self.head if self.tail is None else self.tail

    def split(self) -> None:
        """Ends the head here and captures the rest into the tail (the first call only)."""
        if self.tail is not None:
            return
        self.head.capture_end()
        self.tail = torch.cuda.CUDAGraph()
        self.tail.capture_begin(pool=self.head.pool())


def capturing() -> bool:
    """Whether a :class:`GraphedStep` is capturing its step on this thread."""
    return getattr(_capturing, "forwards", None) is not None


def refuse_capture() -> None:
    """Raises: a ``TieredEmbeddingBag`` is being captured by something other than GraphedStep."""
    raise InvalidInputError(
        "TieredEmbeddingBag is being captured into a CUDA graph outside tierstore.GraphedStep: "
        "capture the step with GraphedStep, which checks every batch's ids and offsets before "
        "its replay changes a table"
    )


def before_first_change() -> None:
    """Called by a captured table's lookup after its unique step, before its cache changes: the
    head graph of the capture ends at the first such call (see the module's docstring)."""
    _capturing.capture.split()


def record_forward(module, input, offsets, per_sample_weights) -> CapturedForward:
    """Called by ``TieredEmbeddingBag.forward`` while a :class:`GraphedStep` captures: records
    the forward, or raises if the table cannot run a step without host reads."""

    def checks() -> BatchChecks:
        return normalize_batch(
            input, offsets, per_sample_weights, module.mode, module.include_last_offset,
            module.device, module.num_embeddings, defer_checks=True,
        )[3]  # fmt: skip

    tensors = {"indices": input, "offsets": offsets, "per_sample_weights": per_sample_weights}
    return record(module, tensors, checks, lambda: [(module.store, module.optimizer)])


def record(
    module,
    tensors: dict[str, torch.Tensor | None],
    checks: Callable[[], Any],
    updates: Callable[[], list[tuple[Any, Any]]],
    why: str | None = None,
) -> CapturedForward:
    """Called by a tierstore module's forward while a :class:`GraphedStep` captures: records
    the forward (:class:`CapturedForward`'s fields), or raises :class:`InvalidInputError` if
    the module cannot run a step without host reads (``why``, the module's own reason, or its
    device, a store's, or a prefetched batch waiting)."""
    if why is None and module.device.type != "cuda":
        why = f"it lives on {module.device}, and a CUDA graph replays device work only"
    for store, optimizer in updates() if why is None else ():
        why = why or store.graph_unsupported(optimizer)
    if why is None and module.prefetched:
        why = "a prefetched batch is waiting (prefetch does not mix with a captured step)"
    if why is not None:
        raise InvalidInputError(f"this {type(module).__name__} cannot be captured: {why}")
    first = [(store, store.step) for store, _ in updates()]
    entry = CapturedForward(module, tensors, checks, updates, first, training=module.training)
    _capturing.forwards.append(entry)
    return entry


class GraphedStep:
    """``step(*inputs)`` (forward, loss, backward: a whole training step) for batches of one
    fixed shape, replayed from a CUDA graph.

    The first ``warmup`` calls run eagerly (on a side stream, as CUDA graph capture wants; they
    are real steps on their batches), the next call captures ``step`` on copies of its inputs
    and replays it, and every later call copies its inputs into those buffers, checks them and
    replays (the head of the graph while the checks are read, the rest once they pass: see the
    module's docstring). Every input must be a tensor of the captured shape and dtype; every
    ``TieredEmbeddingBag`` in the step must take its indices, offsets and weights from the
    inputs (or views of them) and, if it trains, run its backward inside ``step``; so must a
    ``TieredEmbeddingBagCollection`` (of one group: one dim and one optimizer) its ``values``,
    ``lengths`` or ``offsets`` and ``weights``. Returns what
    ``step`` returned at capture: tensors that each call overwrites (clone to keep them).
    A table's current ``lr`` and ``eps`` (a scheduler's) reach every replay, through device
    scalars its kernels read; a table switched between ``train()`` and ``eval()`` since the
    capture is refused (the graph updates its rows or not as captured).
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
        self.graph: torch.cuda.CUDAGraph | None = None  # the head (or the whole step)
        self.tail: torch.cuda.CUDAGraph | None = None  # after the first table's checks
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: Any = None
        self.forwards: list[CapturedForward] = []
        self.step_advance: list[tuple[Any, int]] = []  # (store, host steps per replay)
        self._check_stream: torch.cuda.Stream | None = None

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
        self._before_replay()
        checks = self._load(inputs)
        if self.tail is None:  # no table in the step
            for c in checks:
                c.wait()
            self.graph.replay()
        else:
            self.graph.replay()  # changes no table: the device works while the host waits
            for c in checks:
                c.wait()  # raises before the tail changes anything
            self.tail.replay()
        for store, steps in self.step_advance:
            store.step += steps
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
        capture = _Capture()
        _capturing.forwards = forwards = []
        _capturing.capture = capture
        # captured on a side stream, as torch.cuda.graph does
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                capture.head.capture_begin()
                try:
                    outputs = self.step(*self.inputs)
                finally:
                    capture.current.capture_end()
            main.wait_stream(side)
        finally:
            _capturing.forwards = _capturing.capture = None
            # The capture ran no kernel: the host step counts go back, and no batch made during
            # it may ever be released eagerly (its buffers belong to the graph).
            first: dict[int, tuple[Any, int]] = {}
            for f in forwards:
                for store, start in f.first_steps:
                    first.setdefault(id(store), (store, start))
            advance = [(store, store.step - start) for store, start in first.values()]
            for store, start in first.values():
                store.step = start
            batches = [b for f in forwards for b in f.batches]
            unreleased = any(not b.released for b in batches)
            for b in batches:
                b.released = True
        if unreleased:
            raise InvalidInputError(
                "GraphedStep: a tierstore module's output's backward did not run inside the "
                "step; a captured training step must include the backward (or run its forward "
                "under torch.no_grad())"
            )
        storages = {x.untyped_storage().data_ptr() for x in self.inputs}
        for f in forwards:
            for what, t in f.tensors.items():
                if t is not None and t.untyped_storage().data_ptr() not in storages:
                    raise InvalidInputError(
                        f"GraphedStep: a {type(f.module).__name__}'s {what} must be one of the "
                        "step's inputs or a view of one, so that each batch is checked before "
                        "it changes the table"
                    )
        self.graph, self.tail, self.outputs = capture.head, capture.tail, outputs
        self.forwards, self.step_advance = forwards, advance

    def _before_replay(self) -> None:
        """Refuses a replay whose tables changed train()/eval() mode since the capture (the
        graph updates rows or not as captured), and writes each table's current lr and eps
        (a scheduler's) into the device scalars its captured kernels read."""
        for f in self.forwards:
            if f.module.training != f.training:
                raise InvalidInputError(
                    f"GraphedStep: a {type(f.module).__name__} was captured in "
                    f"{'train' if f.training else 'eval'}() mode and is now in the other; the "
                    "graph would update its rows as captured: capture another GraphedStep"
                )
            for store, optimizer in f.updates():
                store.load_hyper(optimizer)

    def _load(self, inputs: tuple[torch.Tensor, ...]) -> list[BatchChecks]:
        """Copies a batch into the captured inputs and queues its checks for every table, on a
        stream of their own (beside the head's replay); the caller waits for them before the
        tail (or the whole graph) changes anything."""
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
        main = torch.cuda.current_stream()
        if self._check_stream is None:
            self._check_stream = torch.cuda.Stream()
        main.wait_stream(self._check_stream)  # the last checks read the buffers (done by now)
        with torch.no_grad():  # the step may have made a buffer a leaf that requires grad
            for x, buf in zip(inputs, self.inputs):
                if x.data_ptr() != buf.data_ptr():
                    buf.copy_(x, non_blocking=True)
        self._check_stream.wait_stream(main)
        with torch.cuda.stream(self._check_stream):
            return [f.checks() for f in self.forwards]
