"""torch <-> CuPy: the one place that binds the two.

Kernels run on torch's current stream (as a ``cupy.cuda.ExternalStream``), so they are ordered
with torch's own ops with no synchronisation; tensors are passed to kernels by pointer, so no
array object is built per launch. Scalars are passed with the C types of the kernels'
signatures: every integer is a ``long long`` (``i64``), every real a ``float``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

_BLOCK = 256  # threads per block of every launch: 8 warps


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device_index: int):
    import cupy

    with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external; both wrap the pointer
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object built


def current_stream(device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream."""
    if _raw_stream is not None and device.index is not None:
        return _external_stream(_raw_stream(device.index), device.index)
    s = torch.cuda.current_stream(device)
    return _external_stream(s.cuda_stream, s.device.index)


_functions: dict = {}  # (id(kernel), device index) -> (kernel, its cupy.cuda.Function or None)
_direct_call = [True]  # Function.__call__ takes stream=: launch without a stream context


def _function(kernel, device_index: int):
    """The ``cupy.cuda.function.Function`` behind a ``RawKernel`` on a device (cached)."""
    key = (id(kernel), device_index)
    hit = _functions.get(key)
    if hit is None:
        import cupy

        with cupy.cuda.Device(device_index):
            try:
                fn = kernel.kernel
            except AttributeError:
                fn = None
        hit = _functions[key] = (kernel, fn)  # the kernel kept alive: its id stays unique
    return hit[1]


@functools.cache
def _single_device() -> bool:
    # one visible device: the launch needs no device switch (a few microseconds per launch)
    return torch.cuda.device_count() == 1


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a device (sizes the persistent grids)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernel_arg(x):
    """One kernel argument: a tensor's pointer (``None``: a null pointer; a ``numpy.uint64``: a
    raw pointer), an int as ``i64``, a float as ``float``, a bool as ``i64`` 0 or 1."""
    t = type(x)  # the common exact types first: a launch converts ~20 arguments
    if t is torch.Tensor:
        return np.uint64(x.data_ptr())
    if t is int:
        return np.int64(x)
    if t is float:
        return np.float32(x)
    if isinstance(x, torch.Tensor):
        return np.uint64(x.data_ptr())
    if x is None:
        return np.uint64(0)
    if isinstance(x, np.uint64):  # a raw pointer (a host address mapped for the device)
        return x
    if isinstance(x, (bool, np.bool_)):
        return np.int64(int(x))
    if isinstance(x, (int, np.integer)):
        return np.int64(x)
    if isinstance(x, (float, np.floating)):
        return np.float32(x)
    raise TypeError(f"cannot pass {type(x).__name__} to a kernel")


def launch(kernel, device: torch.device, items: int, args, per_warp: bool, max_waves: int = 8):
    """Launches ``kernel`` on torch's current stream over ``items`` work items, a warp or a
    thread per item (``per_warp``), with a grid of at most ``max_waves`` resident blocks per
    multiprocessor (the kernels loop grid-stride over the rest). Nothing is launched for 0 items."""
    if items <= 0:
        return
    threads = items * 32 if per_warp else items
    blocks = min((threads + _BLOCK - 1) // _BLOCK, sm_count(device.index) * max_waves)
    args = tuple([kernel_arg(a) for a in args])
    if _single_device():
        stream = current_stream(device)
        if _direct_call[0]:
            fn = _function(kernel, device.index)
            if fn is not None:
                try:
                    fn((max(blocks, 1), 1, 1), (_BLOCK, 1, 1), args, shared_mem=0, stream=stream)
                    return
                except TypeError:  # a CuPy whose Function takes no stream=: the context path
                    _direct_call[0] = False
        with stream:
            kernel((max(blocks, 1),), (_BLOCK,), args)
        return
    import cupy

    with cupy.cuda.Device(device.index), current_stream(device):
        kernel((max(blocks, 1),), (_BLOCK,), args)


def device_pointer(host: torch.Tensor) -> np.uint64 | None:
    """The device address of a pinned host tensor (zero-copy access over PCIe), or ``None`` if
    it is not page-locked memory that the device can reach. With unified addressing (every
    64-bit CUDA platform) pinned memory has the same address on the host and the device."""
    if host.device.type != "cpu" or not host.is_pinned():
        return None
    return np.uint64(host.data_ptr())
