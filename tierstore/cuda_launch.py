"""How the CUDA backend's modules launch a kernel of ``kernels/``: compiled once by
:mod:`~tierstore.kernel_loader`, launched on torch's current stream by :mod:`~tierstore.interop`,
with ids and slots as contiguous int64 tensors on the launch's device.
"""

from __future__ import annotations

import torch

from . import interop, kernel_loader


def cuda_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (the current CUDA device's where it names none)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def int64_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as a contiguous int64 tensor on ``device`` (how the kernels take ids and slots)."""
    return t.to(device=device, dtype=torch.int64).contiguous()


def run_kernel(file: str, function: str, device: torch.device, items: int, args, per_warp: bool):
    """Launches ``function`` of ``kernels/<file>`` on torch's current stream of ``device`` over
    ``items`` work items, a warp or a thread per item (``per_warp``): :func:`interop.launch`."""
    kernel = kernel_loader.kernel(file, function, device.index)
    interop.launch(kernel, device, items, args, per_warp)
