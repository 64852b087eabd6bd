"""Rows for the SSD tier's read tests (test_ssd_blockdb.py, test_ssd_readers.py): an odd row
width, the tier's never-written rows, arbitrary bit patterns, and bitwise comparison."""

from __future__ import annotations

import numpy as np
import torch

from tierstore.hashing import initial_weights

W = 5  # floats per row, odd: no row or plane falls on an aligned boundary


def init_rows(ids: torch.Tensor) -> torch.Tensor:
    """Never-written rows ``(n, W)`` of the test tables (seed 5, scale 0.1)."""
    return initial_weights(ids, W, 5, 0.1)


def random_bits(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Rows ``(n, W)`` of arbitrary float32 bit patterns (NaNs, infinities, denormals)."""
    return torch.from_numpy(rng.integers(0, 2**32, (n, W), dtype=np.uint32).view(np.float32))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same bits (NaNs compare by their bits)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))
