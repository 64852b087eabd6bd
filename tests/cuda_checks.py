"""Launchers of kernels that only the tests run (``tests/test_cuda.py``): common.cuh's hashing
and initial values (``kernels/testing/hashing.cu``) and the frequency sketch's kernels launched
alone (``kernels/sketch.cu``, ``kernels/testing/sketch_estimate.cu``), each held to its CPU
twin in ``tierstore``. They need a CUDA device and CuPy.
"""

from __future__ import annotations

import torch

from tierstore.cuda_launch import cuda_device, int64_on, run_kernel
from tierstore.hashing import seed_key
from tierstore.policy import LRU


def initial_rows(
    ids: torch.Tensor,
    dim: int,
    width: int,
    seed: int,
    scale: float,
    initial_state: float = 0.0,
) -> torch.Tensor:
    """Rows ``(n, width)`` of never-written ``ids`` on their (CUDA) device:
    ``hashing.initial_weights`` bit for bit, then the optimizer state at ``initial_state``."""
    dev = cuda_device(ids.device)
    ids = int64_on(ids, dev)
    out = torch.empty((ids.numel(), width), device=dev)
    args = (ids, ids.numel(), dim, width, seed_key(seed), float(scale), float(initial_state), out)
    run_kernel("testing/hashing.cu", "initial_rows", dev, ids.numel(), args, per_warp=True)
    return out


def hash_ids(ids: torch.Tensor, sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mix64(ids), set_index(ids, sets))`` computed by the kernels' ``common.cuh``."""
    dev = cuda_device(ids.device)
    ids = int64_on(ids, dev)
    mixed, set_of = torch.empty_like(ids), torch.empty_like(ids)
    args = (ids, ids.numel(), sets, mixed, set_of)
    run_kernel("testing/hashing.cu", "hash_ids", dev, ids.numel(), args, per_warp=False)
    return mixed, set_of


def sketch_add(sketch, ids: torch.Tensor, counts: torch.Tensor) -> None:
    """Adds ``counts`` accesses of (unique) ``ids`` to a device-resident
    :class:`~tierstore.policy.FrequencySketch` (its ``add`` without the estimates)."""
    dev = cuda_device(sketch.counters.device)
    ids, counts = int64_on(ids, dev), int64_on(counts, dev)
    args = (ids, counts, ids.numel(), None, sketch.counters, sketch.salts, sketch.additions,
            sketch.depth, sketch.width)  # fmt: skip
    run_kernel("sketch.cu", "sketch_add", dev, ids.numel(), args, per_warp=False)


def sketch_estimate(sketch, ids: torch.Tensor) -> torch.Tensor:
    """The sketch's estimates of ``ids`` (int32), as :meth:`FrequencySketch.estimate`."""
    dev = cuda_device(sketch.counters.device)
    ids = int64_on(ids, dev)
    out = torch.empty(ids.numel(), dtype=torch.int32, device=dev)
    args = (ids, ids.numel(), sketch.counters, sketch.salts, sketch.depth, sketch.width, out)
    run_kernel(
        "testing/sketch_estimate.cu", "sketch_estimate", dev, ids.numel(), args, per_warp=False
    )
    return out


def sketch_age_if_due(sketch) -> torch.Tensor:
    """Halves the sketch once ``sample_size`` additions have accumulated, deciding on the
    device; returns a device flag (int32, 1 if it halved)."""
    dev = cuda_device(sketch.counters.device)
    aged = torch.zeros(1, dtype=torch.int32, device=dev)
    n = sketch.counters.numel()
    args = (sketch.counters, n, sketch.additions, sketch.sample_size, None, 0)
    age = f"sketch_age_{LRU.cuda_functor.suffix}"  # LRU's: it has no scores to age
    run_kernel("sketch.cu", age, dev, n, args, per_warp=False)
    run_kernel(
        "sketch.cu", "sketch_age_reset", dev, 1, (sketch.additions, sketch.sample_size, aged), False
    )
    return aged
