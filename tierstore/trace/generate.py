"""Seeded synthetic traces: Zipf, a drifting hot set, and Zipf with scans mixed in.

Every generator is a pure function of its arguments and ``seed`` (same arguments, same ids, on
any machine), vectorised, and uses memory proportional to the trace, not to the id space:

- Zipf ranks come from rejection-inversion sampling (Hormann and Derflinger): draw from the
  continuous density ``x**-alpha`` by inverting its integral ``H``, round to the nearest rank
  ``k``, and keep the draw when it falls in the last ``k**-alpha`` of ``H``'s range over
  ``[k - 1/2, k + 1/2]``. That keeps rank ``k`` with probability exactly proportional to
  ``k**-alpha`` (``x**-alpha`` is convex), so no table of ``universe`` probabilities is needed.
- Ranks become ids through a keyed pseudo-random permutation of ``range(universe)`` (a 4-round
  Feistel network with cycle walking), so the hot ids are spread over the id space rather than
  being the small ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidInputError
from ..hashing import mix64_np
from .formats import Trace

_U64 = np.uint64


def permute(x: np.ndarray, universe: int, key: int) -> np.ndarray:
    """A keyed bijection of ``range(universe)`` applied to ``x`` (int64 in, int64 out)."""
    if universe <= 1:
        return np.zeros_like(x, dtype=np.int64)
    bits = max(2, int(universe - 1).bit_length())
    bits += bits & 1
    half = bits // 2
    mask = _U64((1 << half) - 1)
    keys = [_U64(k) for k in mix64_np(np.arange(4, dtype=_U64) + _U64(key & (2**64 - 1)))]

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> _U64(half), v & mask
        for k in keys:
            left, right = right, left ^ (mix64_np(right ^ k) & mask)
        return (left << _U64(half)) | right

    # Cycle walking: the network permutes range(2**bits); re-encrypt until inside the universe.
    y = encrypt(np.asarray(x, dtype=np.int64).astype(_U64))
    out = y >= _U64(universe)
    while out.any():
        y[out] = encrypt(y[out])
        out = y >= _U64(universe)
    return y.astype(np.int64)


def _expm1_over(t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    small = np.abs(t) < 1e-8
    safe = np.where(small, 1.0, t)
    return np.where(small, 1.0 + t / 2, np.expm1(safe) / safe)


def _log1p_over(t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    small = np.abs(t) < 1e-8
    safe = np.where(small, 1.0, t)
    return np.where(small, 1.0 - t / 2, np.log1p(safe) / safe)


def zipf_ranks(rng: np.random.Generator, n: int, universe: int, alpha: float) -> np.ndarray:
    """``n`` ranks in ``range(universe)``, rank ``r`` drawn with probability ``∝ (r+1)**-alpha``."""
    if universe < 1:
        raise InvalidInputError(f"universe must be >= 1, got {universe}")
    if alpha < 0:
        raise InvalidInputError(f"alpha must be >= 0, got {alpha}")
    q = 1.0 - alpha

    def big_h(x):  # integral of t**-alpha from 1 to x
        lx = np.log(x)
        return lx * _expm1_over(q * lx)

    def big_h_inv(u):
        return np.exp(u * _log1p_over(q * u))

    lo = float(big_h(1.5)) - 1.0  # so that rank 1's acceptance interval has length h(1) = 1
    hi = float(big_h(universe + 0.5))
    out = np.empty(n, np.int64)
    todo = np.arange(n)
    while todo.size:
        u = lo + (hi - lo) * rng.random(todo.size)
        x = big_h_inv(u)
        k = np.clip(np.floor(x + 0.5), 1, universe)
        keep = u >= big_h(k + 0.5) - k ** (-alpha)
        out[todo[keep]] = k[keep].astype(np.int64) - 1
        todo = todo[~keep]
    return out


def _check(n: int, universe: int) -> None:
    if n < 0:
        raise InvalidInputError(f"requests must be >= 0, got {n}")
    if universe < 1:
        raise InvalidInputError(f"universe must be >= 1, got {universe}")


def zipf_trace(n: int, universe: int, alpha: float = 1.0, *, seed: int = 0) -> np.ndarray:
    """``n`` requests over ``universe`` ids with Zipf(``alpha``) popularity, hot ids shuffled."""
    _check(n, universe)
    rng = np.random.default_rng(seed)
    key = int(rng.integers(0, 2**63))
    return permute(zipf_ranks(rng, n, universe, alpha), universe, key)


def drift_trace(
    n: int,
    universe: int,
    alpha: float = 1.0,
    *,
    period: int = 100_000,
    step: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Zipf whose hot set drifts: every ``period`` requests each rank moves ``step`` ids on
    (in the shuffled order), so the hottest ids are replaced gradually by colder ones."""
    _check(n, universe)
    if period < 1 or step < 0:
        raise InvalidInputError(f"need period >= 1 and step >= 0, got {period}, {step}")
    rng = np.random.default_rng(seed)
    key = int(rng.integers(0, 2**63))
    ranks = zipf_ranks(rng, n, universe, alpha)
    shift = (np.arange(n, dtype=np.int64) // period) * step
    return permute((ranks + shift) % universe, universe, key)


def scan_mix_trace(
    n: int,
    universe: int,
    alpha: float = 1.0,
    *,
    scan_fraction: float = 0.1,
    scan_length: int = 10_000,
    seed: int = 0,
) -> np.ndarray:
    """Zipf with scans mixed in: about ``scan_fraction`` of the requests are scans, each a run
    of ``scan_length`` consecutive ids (a sweep over a range of rows, wrapping at
    ``universe``) inserted at a random point of the Zipf stream."""
    _check(n, universe)
    if not 0 <= scan_fraction <= 1 or scan_length < 1:
        raise InvalidInputError(
            f"need 0 <= scan_fraction <= 1 and scan_length >= 1, got {scan_fraction}, {scan_length}"
        )
    rng = np.random.default_rng(seed)
    n_scan = int(round(n * scan_fraction))
    scans = -(-n_scan // scan_length)
    background = zipf_trace(n - n_scan, universe, alpha, seed=int(rng.integers(0, 2**63)))
    starts = rng.integers(0, universe, scans)
    at = np.sort(rng.integers(0, background.size + 1, scans))
    lengths = np.full(scans, scan_length)
    if scans:
        lengths[-1] = n_scan - scan_length * (scans - 1)
    pieces, prev = [], 0
    for s, a, length in zip(starts.tolist(), at.tolist(), lengths.tolist()):
        pieces.append(background[prev:a])
        pieces.append((s + np.arange(length, dtype=np.int64)) % universe)
        prev = a
    pieces.append(background[prev:])
    return np.concatenate(pieces) if pieces else background


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "zipf": zipf_trace,
    "drift": drift_trace,
    "scan-mix": scan_mix_trace,
}


def generate_trace(
    kind: str,
    requests: int,
    universe: int,
    alpha: float = 1.0,
    *,
    seed: int = 0,
    tables: int = 1,
    **params,
) -> Trace:
    """A synthetic :class:`Trace` of ``tables`` tables (independent streams, seeded apart).

    ``kind`` is a key of :data:`GENERATORS`; ``params`` are its extra arguments (``drift``:
    ``period``, ``step``; ``scan-mix``: ``scan_fraction``, ``scan_length``).
    """
    try:
        gen = GENERATORS[kind]
    except KeyError:
        raise InvalidInputError(
            f"unknown trace kind {kind!r}; known: {sorted(GENERATORS)}"
        ) from None
    if tables < 1:
        raise InvalidInputError(f"tables must be >= 1, got {tables}")
    seeds = np.random.SeedSequence(seed).spawn(tables) if tables > 1 else [seed]
    out = []
    for s in seeds:
        table_seed = s if isinstance(s, int) else int(s.generate_state(1, np.uint64)[0] >> 1)
        out.append(gen(requests, universe, alpha, seed=table_seed, **params))
    return Trace(out, [f"t{t}" for t in range(tables)] if tables > 1 else ["0"])
