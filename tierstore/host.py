"""L2, the host-memory tier: rows in (pinned, when CUDA is there) host DRAM.

Without an SSD tier, L2 is the whole table addressed by row id (:class:`HostTable`). With one,
L2 is a set-associative cache over L3 (:class:`HostCache`, in ``tierstore/host_cache.py``).
Both give every row of a batch in flight an *address*, a row index into ``data``, that stays
valid until the batch is released; the kernels read and update rows there directly.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import CapacityError
from .progress import progress

# Bytes of rows initialised per call: each thread's temporaries stay this small (they live in
# the CPU's caches), and a creation of many chunks shows its progress.
_INIT_CHUNK_BYTES = 1 << 22
_GPU_INIT_CHUNK_BYTES = 1 << 26  # the same on a GPU: few launches, a copy at DMA speed each


def available_host_memory() -> int:
    """Bytes of host memory the kernel reports available (MemAvailable), or physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Host tensors at least this large are page-locked in place; smaller ones are copied into
# torch's pinned memory. An allocation this large is mmap'ed by malloc, so its pages hold
# nothing else (CUDA refuses to register a page twice).
_REGISTER_BYTES = 64 << 20


def pinned(t: torch.Tensor, own_pages: bool = False) -> torch.Tensor:
    """``t`` in page-locked memory: a large contiguous tensor, or one whose pages hold nothing
    else (``own_pages``: :func:`host_memory`'s), is locked in place (``cudaHostRegister`` of
    exactly its bytes, until ``t`` is freed), a small one is copied.
    torch's pinned allocator rounds a size up to a power of two and takes seconds to lock a
    table of GiBs (issue 24: 2.9 s and 8.6 GiB for a 4.8 GiB table on an H100 machine, where
    registering the same memory, already touched, took 0.23 s). Raises ``RuntimeError`` with
    nothing changed if CUDA refuses."""
    if not torch.cuda.is_available():  # (torch.cuda.cudart would fail an assertion)
        raise RuntimeError("page-locking host memory needs CUDA, which this process lacks")
    nbytes = t.numel() * t.element_size()
    if not t.is_contiguous() or (nbytes < _REGISTER_BYTES and not own_pages):
        return t.pin_memory()
    cudart = torch.cuda.cudart()
    ptr = t.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if err != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes: {err}")
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)
    return t


def allocate_rows(rows: int, width: int, pin: bool, what: str) -> tuple[torch.Tensor, bool]:
    """An uninitialised ``(rows, width)`` float32 host tensor, page-locked if asked (zeroed
    first: locking touched memory is fast, see :func:`pinned`), and whether its pages are its
    own (:func:`host_memory`); refuses, with a clear error, one that would not fit in the
    host's available memory."""
    need = rows * width * 4
    have = available_host_memory()
    if need > have:
        raise CapacityError(
            f"{what} needs {need / 2**30:.1f} GiB of host memory ({rows} rows x {width} floats) "
            f"but only {have / 2**30:.1f} GiB is available: give the table an SSD tier "
            "(ssd=ts.SSDConfig(path, host_rows=...) with a smaller host_rows; a collection's path=)"
        )
    data, own = host_memory((rows, width), torch.float32)
    return (pinned(data.zero_(), own) if pin else data), own


# Host tensors at least this large get a mapping of their own (host_memory): one huge page
_HUGE_BYTES = 2 << 20


def host_memory(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """An uninitialised host tensor of ``shape`` and ``dtype``, and whether it has pages of its
    own: one of at least ``_HUGE_BYTES`` lives in an anonymous mapping advised to use
    transparent huge pages (2 MiB, where Linux offers them: THP mode ``madvise`` or
    ``always``). A step's fills and writebacks touch L2 rows spread over the whole table, a
    few to a 4 KiB page, and the device translates every host page it reaches: huge pages
    cover L2 with far fewer translations. Faulting the pages in is faster too."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < _HUGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype), False
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)  # advice only: the kernel may still give 4 KiB pages
    # the tensor's storage holds the mapping (unmapped with the last view of it)
    return torch.frombuffer(area, dtype=dtype, count=numel).view(shape), True


class HostTable:
    """The whole table in host memory, row ``i`` at address ``i``.

    The table is allocated once at its final size and filled chunk by chunk (each chunk's
    initial rows, a few MB, copied into place) on as many threads as torch uses: memory grows
    once, to the table's size, with no temporary of that size; a terminal shows the progress
    of a long creation. ``data`` never moves afterwards (the CUDA kernels address its rows
    directly).

    Args:
        num_rows: rows in the table.
        width: floats per row (weights then optimizer state).
        init_rows: ``ids -> (n, width)`` initial rows; called in chunks at construction, from
            several threads at once (it must be thread-safe: a pure function of the ids).
        pin: page-lock the memory so that kernels can read it over PCIe (needs CUDA).
        init_device: where ``init_rows`` takes its ids, if not the CPU: a CUDA device computes
            the rows, which are copied into the page-locked table in chunks of tens of MB.
    """

    def __init__(
        self,
        num_rows: int,
        width: int,
        init_rows: Callable[[torch.Tensor], torch.Tensor],
        pin: bool = False,
        init_device: torch.device | None = None,
    ):
        self.num_rows, self.width = num_rows, width
        on_gpu = init_device is not None and init_device.type == "cuda"
        # page-locked before a GPU fill (its copies then run at DMA speed), else once filled
        # (the fill touches every page on several threads)
        self.data, self._data_own = allocate_rows(
            num_rows, width, pin and on_gpu, "the host tier (L2)"
        )
        # A byte per row, set once the row is written: a row never written still holds its
        # initial value, which the device computes from the id instead of reading it over PCIe
        # (kernels/insert.cu move_round). Kept beside the rows in host memory, never in HBM.
        written, self._written_own = host_memory((num_rows,), torch.uint8)
        self.written = pinned(written.zero_(), self._written_own) if pin else written.zero_()
        if on_gpu:
            self._fill_on(init_device, init_rows)
            return
        chunk = max(1, _INIT_CHUNK_BYTES // (4 * width))

        def fill(lo: int) -> None:
            hi = min(lo + chunk, num_rows)
            self.data[lo:hi] = init_rows(torch.arange(lo, hi, dtype=torch.int64))

        starts = range(0, num_rows, chunk)
        threads = max(1, min(torch.get_num_threads(), len(starts)))
        long = num_rows * width >= 1 << 28  # a GiB of rows or more: seconds of work
        if len(starts) == 1:  # a small table: no threads to start
            fill(0)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="tierstore-init") as pool:
                for _ in progress(pool.map(fill, starts), "initialising rows", long, len(starts)):
                    pass
        if pin:
            self.data = pinned(self.data, self._data_own)

    def _fill_on(self, device: torch.device, init_rows) -> None:
        """Fills ``data`` with rows computed on ``device``, copied back a chunk at a time on
        the current stream (each chunk's device memory is reused once its copy is done)."""
        chunk = max(1, _GPU_INIT_CHUNK_BYTES // (4 * self.width))
        with torch.cuda.device(device):
            for lo in range(0, self.num_rows, chunk):
                hi = min(lo + chunk, self.num_rows)
                ids = torch.arange(lo, hi, dtype=torch.int64, device=device)
                self.data[lo:hi].copy_(init_rows(ids), non_blocking=self.data.is_pinned())
            torch.cuda.synchronize(device)

    def acquire(self, ids: torch.Tensor, ahead: None = None) -> torch.Tensor:
        """L2 addresses of a batch's unique rows (every row has one: its id)."""
        return ids

    def read_ahead(self, ids: torch.Tensor) -> None:
        """Nothing to read ahead: no tier below."""

    def drop_read_ahead(self, ahead: None) -> None:
        """Nothing was read ahead."""

    def release(self, addresses: torch.Tensor) -> None:
        """Nothing to unlock: rows never leave a full table."""

    def read(self, addresses: torch.Tensor) -> torch.Tensor:
        """Rows at ``addresses``."""
        return self.data[addresses.cpu()]

    def write(self, addresses: torch.Tensor, rows: torch.Tensor) -> None:
        """Stores ``rows`` at ``addresses`` (a full table has no tier below: nothing to mark)."""
        addresses = addresses.cpu()
        self.data[addresses] = rows.cpu()
        self.written[addresses] = 1

    def pin(self, addresses: torch.Tensor) -> None:
        """Rows that entered L1 (an inclusive L2 keeps them); nothing to do for a full table."""

    def unpin(self, addresses: torch.Tensor) -> None:
        """Rows that left L1; nothing to do for a full table."""

    def mark_dirty(self, addresses: torch.Tensor) -> None:
        """Nothing below a full table to write back to."""

    def peek(self, ids: torch.Tensor) -> torch.Tensor:
        """Current rows of ``ids`` without touching any cache state (a row's address is its id)."""
        return self.read(ids)

    def poke(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites rows of ``ids`` without touching any cache state."""
        self.write(ids, rows)

    def page_lock(self) -> None:
        """Page-locks the rows (in place where large: :func:`pinned`) and the map of written
        rows, once."""
        if not self.data.is_pinned():
            written = pinned(self.written, self._written_own)  # in place or as a copy
            try:
                data = pinned(self.data, self._data_own)
            except RuntimeError:  # nothing changed: a map locked in place is unlocked again
                if written is self.written:
                    torch.cuda.cudart().cudaHostUnregister(written.data_ptr())
                raise
            self.data, self.written = data, written

    def flush(self) -> None:
        """Nothing below a full table."""

    def check_writable(self, doing: str) -> None:
        """A full table is always writable."""

    def stats(self) -> dict[str, int]:
        """No counters of its own."""
        return {}

    def reset_stats(self) -> None:
        """No counters of its own."""

    def close(self) -> None:
        """Nothing to close."""
