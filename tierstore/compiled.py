"""Machine code for the few loops that no vectorised form can replace, or that it serves badly.

OPT's greedy (``replay/bounds.py``) decides each request from all earlier decisions, so it is a
loop per request; the set-associative cache's step (``cache_compiled.py``) is vectorised in
``cache.py``, but as some thirty passes of random gathers and scatters per batch, where one
loop does the same work in a few. With numba installed (a dependency of the package) such a
loop is compiled to machine code on first use and cached on disk. Without it (a machine that
cannot install it) OPT's loop runs as Python, about fifteen times slower, with the same
results; the cache step keeps to its torch form, which needs no compiler. :data:`prefetch`
lets such a loop ask for its random reads early.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

try:
    import numba
    from numba.core.errors import NumbaError
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

    class NumbaError(Exception):
        """Stands for numba's compile errors where numba is missing (never raised)."""


COMPILED = numba is not None


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by numba (``nogil``, cached on disk) where numba is installed, else as
    written. ``fn`` must be numba-compatible Python over integer arrays and scalars."""
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True)(fn)


def int_buffer(values: np.ndarray) -> np.ndarray | array:
    """A buffer of the integers ``values`` (uint8, int32 or int64) for a :func:`compiled` loop:
    the numpy array when compiled; as Python, an ``array``, whose items read several times
    faster there than numpy's."""
    values = np.ascontiguousarray(values)
    if COMPILED:
        return values
    code = {np.dtype(np.uint8): "B", np.dtype(np.int32): "i", np.dtype(np.int64): "q"}
    return array(code[values.dtype], values.tobytes())


def _prefetch_intrinsic() -> Callable:
    """The compiled :func:`prefetch`: LLVM's prefetch intrinsic on the address of the item."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, array, index):
        if not isinstance(array, types.Array):
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            at = context.cast(builder, args[1], signature.args[1], types.intp)
            byte_ptr = ir.IntType(8).as_pointer()
            address = builder.bitcast(builder.gep(data, [at]), byte_ptr)
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
            # The unmangled name: LLVM renames it to its pointer type's overload, whichever
            # LLVM numba brings (typed or opaque pointers).
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch")
            builder.call(fn, [address, i32(0), i32(3), i32(1)])  # read, keep, data cache
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return prefetch


def _prefetch_as_python(array: np.ndarray, index: int) -> None:
    """As Python: nothing."""


# prefetch(array, index) in a compiled loop asks the CPU to start loading array[index] into
# its caches; it changes no value (an address outside the array is harmless). A loop whose
# reads land at random in a large array issues them some iterations ahead with it.
prefetch = _prefetch_intrinsic() if numba is not None else _prefetch_as_python
