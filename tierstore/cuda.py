"""The CUDA backend: the engine's steps as CuPy raw kernels (``kernels/*.cu``).

The same functions as :mod:`tierstore.cpu`, with the same meaning, and the same cache state
(tags, stamps, dirty bits, locks, counters, sketch) kept in HBM. Every kernel runs on torch's
current stream on torch tensors passed by pointer (:mod:`tierstore.interop`); L2 rows are read
and written in pinned host memory directly over PCIe (zero-copy). The step adds no host
synchronisation of its own: counts that decide the work (the batch's unique rows, misses,
touched sets, fills) stay on the device and the kernels loop over them; launches are sized by
the batch's length, an upper bound of its unique count.

This module is the backend's face; each job lives in a module of its own:

    cuda_unique.py   the unique step and the sparse transpose (sort.cu, unique.cu)
    cuda_cache.py    the L1 cache in HBM and its step (lookup.cu, insert.cu, sketch.cu)
    cuda_rows.py     fills, write-backs, gather and scatter of rows (insert.cu, rows.cu)
    cuda_bags.py     the pooled forward and the fused backward (forward.cu, backward.cu)

The kernels a policy or an optimizer runs on are the ones it declares (``cuda_functor``:
:class:`~tierstore.cuda_functor.CudaFunctor`); one that declares none runs as torch ops.

Shapes: ``n`` indices, ``B`` bags, ``U`` unique rows, ``D`` embedding dim, rows of ``width``
floats, ``C`` L1 slots, ``S`` sets of ``W`` ways.
"""

from __future__ import annotations

import torch

# the backend's functions (the store and the modules call them as ``backend.<name>``) and the
# names the tests and the docs reach through it
from .cuda_bags import REGISTER_COLUMNS, backward, forward, load_hyper, register_columns  # noqa: F401
from .cuda_cache import MAX_WAYS, CudaCache, DeviceLookup, lookup, new_cache  # noqa: F401
from .cuda_rows import gather, kernel_l2, move_rows, scatter  # noqa: F401
from .cuda_unique import Transpose, radix_sort, unique, unique_counts  # noqa: F401
from .optim import Optimizer

name = "cuda"


def available() -> bool:
    """Whether the kernels can run: a CUDA device that torch and CuPy both see."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def graph_unsupported(store, optimizer: Optimizer | None) -> str | None:
    """Why a step of ``store`` cannot be captured in a CUDA graph, or None if it can: the
    step must run on the kernels from end to end with no host read (``graphs.py``)."""
    if store.inclusive_host or not getattr(store.l1, "sync_free", False):
        return "its step reads the device (an SSD tier, or a policy with no cuda_functor)"
    if kernel_l2(store) is None:
        return "its host table is not in pinned memory that the device can address"
    if register_columns(store.layout.dim) is None:
        return f"embedding_dim {store.layout.dim} is above the kernels' {32 * REGISTER_COLUMNS[-1]}"
    if optimizer is not None and optimizer.cuda_functor is None:
        name = optimizer.name or type(optimizer).__name__
        return f"the optimizer {name!r} declares no cuda_functor (no kernel)"
    return None
