"""Which kernels run a table on a device: the CUDA backend (``cuda.py``, CuPy kernels) where
CUDA and CuPy are there, else the torch-ops backend (``cpu.py``), which runs on any device."""

from __future__ import annotations

import torch

from . import cpu


def backend_for(device: torch.device):
    """The kernels for ``device``: CuPy kernels on CUDA when CuPy is there, torch ops otherwise."""
    if device.type == "cuda":
        try:
            from . import cuda

            if cuda.available():
                return cuda
        except ImportError:
            pass
    return cpu


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device (``cuda`` is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
