"""Counter-based hashing shared bit for bit by the CPU backend and the CUDA kernels.

Everything here is a pure function of int64 tensors: the 64-bit mixer that places a row in a
cache set, and the counter-based generator that gives a never-written row its initial value.
torch has no unsigned 64-bit arithmetic, so the code works on int64 with wrapping multiplies and
masks the sign bits after each right shift (a logical shift). ``kernels/common.cuh`` holds the
same functions in CUDA; ``tests/test_hashing.py`` checks both against numpy's uint64.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .compiled import COMPILED, NumbaError, compiled

# splitmix64's finalizer constants, written as the int64 values of the same bit patterns.
_MIX_A = -4658895280553007687  # 0xbf58476d1ce4e5b9
_MIX_B = -7723592293110705685  # 0x94d049bb133111eb
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15, the Weyl increment of splitmix64
_LOW32 = 0xFFFFFFFF


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of 64-bit words with full avalanche (int64 in, out)."""
    x = x ^ _shr(x, 30)
    x = x * _MIX_A
    x = x ^ _shr(x, 27)
    x = x * _MIX_B
    return x ^ _shr(x, 31)


def mix64_np(z: np.ndarray) -> np.ndarray:
    """:func:`mix64` on a numpy ``uint64`` array (wrapping arithmetic), for the trace tools."""
    u = np.uint64
    with np.errstate(over="ignore"):
        z = z ^ (z >> u(30))
        z = z * u(0xBF58476D1CE4E5B9)
        z = z ^ (z >> u(27))
        z = z * u(0x94D049BB133111EB)
        return z ^ (z >> u(31))


def reduce_range(h: torch.Tensor, n: int) -> torch.Tensor:
    """Maps hashes uniformly onto ``[0, n)`` by multiply-shift on their high 32 bits (n < 2**31)."""
    return (_shr(h, 32) * n) >> 32


def reduce_range_np(h: np.ndarray, n: int) -> np.ndarray:
    """:func:`reduce_range` on a numpy ``uint64`` array (int64 out)."""
    u = np.uint64
    return (((h >> u(32)) * u(n)) >> u(32)).view(np.int64)


def set_index(rows: torch.Tensor, sets: int) -> torch.Tensor:
    """The cache set of each row id: ``((mix64(row) >> 32) * sets) >> 32``."""
    if rows.device.type == "cpu":  # numpy has unsigned shifts: half the passes of the torch form
        return torch.from_numpy(reduce_range_np(mix64_np(rows.numpy().view(np.uint64)), sets))
    return reduce_range(mix64(rows), sets)


def tag_digest(rows: torch.Tensor) -> torch.Tensor:
    """A byte of each row's hash that :func:`set_index` does not use (it takes the high 32
    bits): the CUDA cache keeps it per way beside the tags (uint8)."""
    return (mix64(rows.to(torch.int64)) & 0xFF).to(torch.uint8)


@functools.lru_cache(maxsize=256)
def seed_key(seed: int) -> int:
    """The per-table key that decorrelates tables with different seeds (memoized: every row
    move and every never-written row asks for it, and it costs a few torch ops)."""
    word = (seed * _GOLDEN + 1) & ((1 << 64) - 1)
    word -= (word >> 63) << 64  # as int64
    return int(mix64(torch.tensor([word], dtype=torch.int64))[0])


def initial_weights(rows: torch.Tensor, dim: int, seed: int, scale: float) -> torch.Tensor:
    """The value of never-written rows: uniform on ``[-scale, scale)``, a pure function of
    (seed, row id, column), float32, shape ``(len(rows), dim)``, on ``rows``' device.

    Element ``(r, j)`` is ``(u * 2**-23 - 1) * scale`` with ``u`` the top 24 bits of
    ``mix64(mix64(r ^ key) + (j + 1) * golden)``; every step but the last multiply is exact in
    float32, so the CUDA kernel reproduces it bit for bit. On the CPU, where numba is installed,
    a compiled loop computes it in one pass (no int64 temporaries of the result's size): the
    same bits as the torch form, several times faster.
    """
    if rows.device.type == "cpu" and _compiles[0]:
        ids = rows.reshape(-1).to(torch.int64).contiguous().numpy()
        out = np.empty((ids.size, dim), dtype=np.float32)
        try:
            _fill_weights(ids, out, np.uint64(seed_key(seed) & _U64), np.float32(scale))
            return torch.from_numpy(out)
        except NumbaError as e:  # raised while compiling (an untested numba or LLVM)
            _compiles[0] = False
            msg = f"numba cannot compile the initial rows, using torch ops: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return _initial_weights_torch(rows, dim, seed, scale)


def _initial_weights_torch(rows: torch.Tensor, dim: int, seed: int, scale: float) -> torch.Tensor:
    """:func:`initial_weights` in torch ops, on any device (the CUDA tables', and the CPU's
    where numba is missing)."""
    rows = rows.to(torch.int64).reshape(-1, 1)
    row_key = mix64(rows ^ seed_key(seed))
    cols = torch.arange(1, dim + 1, dtype=torch.int64, device=rows.device) * _GOLDEN
    u = _shr(mix64(row_key + cols), 40).to(torch.float32)
    unit = u * (2.0**-23) - 1.0
    return unit * torch.tensor(scale, dtype=torch.float32, device=rows.device)


# The same constants in the unsigned arithmetic numba has (uint64 mixed with a Python int
# would turn into float64 there).
_U64 = (1 << 64) - 1
_NB_MIX_A = np.uint64(_MIX_A & _U64)
_NB_MIX_B = np.uint64(_MIX_B & _U64)
_NB_GOLDEN = np.uint64(_GOLDEN & _U64)
_NB_UNIT = np.float32(2.0**-23)
_NB_ONE = np.float32(1.0)
_compiles = [COMPILED]  # False once numba failed to compile _fill_weights: torch ops from then


@compiled
def mix64_compiled(x):
    """:func:`mix64` of one uint64, compiled (numba; a plain Python function without it)."""
    x ^= x >> np.uint64(30)
    x *= _NB_MIX_A
    x ^= x >> np.uint64(27)
    x *= _NB_MIX_B
    return x ^ (x >> np.uint64(31))


@compiled
def reduce_range_compiled(h, n):
    """:func:`reduce_range` of one uint64 hash onto ``[0, n)``, as int64, compiled."""
    return np.int64(((h >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@compiled
def set_index_compiled(row, sets):
    """:func:`set_index` of one int64 row id, compiled."""
    return reduce_range_compiled(mix64_compiled(np.uint64(row)), sets)


@compiled
def _fill_weights(ids, out, key, scale):
    """``out[i, j]`` = the initial weight of row ``ids[i]``, column ``j`` (``ids`` int64,
    ``out`` float32 ``(len(ids), dim)``): :func:`initial_weights`' formula, element for
    element, in float32 where it rounds."""
    dim = out.shape[1]
    for i in range(ids.size):
        row_key = mix64_compiled(np.uint64(ids[i]) ^ key)
        for j in range(dim):
            u = mix64_compiled(row_key + np.uint64(j + 1) * _NB_GOLDEN) >> np.uint64(40)
            out[i, j] = (np.float32(np.int32(u)) * _NB_UNIT - _NB_ONE) * scale
