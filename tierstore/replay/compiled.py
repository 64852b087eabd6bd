"""Machine code for the few loops that no vectorised form can replace.

OPT's greedy decides each request from all earlier decisions, so it is a loop per request.
With numba installed (a dependency of the package) such a loop is compiled to machine code
on first use and cached on disk; without it (a machine that cannot install it) the same
function runs as Python, about fifteen times slower, with the same results.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

COMPILED = numba is not None


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by numba (``nogil``, cached on disk) where numba is installed, else as
    written. ``fn`` must be numba-compatible Python over integer arrays and scalars."""
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True)(fn)


def int_buffer(values: np.ndarray) -> np.ndarray | array:
    """A buffer of the integers ``values`` (int32 or int64) for a :func:`compiled` loop: the
    numpy array when compiled; as Python, an ``array``, whose items read several times faster
    there than numpy's."""
    values = np.ascontiguousarray(values)
    if COMPILED:
        return values
    return array({4: "i", 8: "q"}[values.itemsize], values.tobytes())
