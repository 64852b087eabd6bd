"""How a policy or an optimizer names its CUDA implementation: a functor of ``kernels/``.

The kernels take the functor as a template argument and are instantiated once per functor under
``extern "C"`` names that end in one suffix, so the backend finds a policy's or an optimizer's
kernels from its declaration alone (``Policy.cuda_functor``, ``Optimizer.cuda_functor``), never
from its name. ``tests/test_policy.py`` and ``tests/test_optim.py`` check every declaration
against the sources. (A module of its own: the policies import it at startup, without the
kernel loader.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CudaFunctor:
    """A functor of ``kernels/`` that a policy or an optimizer declares as its CUDA
    implementation (``Policy.cuda_functor``, ``Optimizer.cuda_functor``).

    The kernels take ``struct`` as a template argument and are instantiated once per functor
    under names that end in ``suffix``: ``TS_PROBE(probe_lru, LruPolicy)`` in ``lookup.cu``,
    ``TS_BACKWARD_ALL(sgd, SgdUpdate)`` in ``backward.cu``. The CUDA backend launches the kernel
    ``f"probe_{functor.suffix}"``; it never chooses a kernel by a policy's or optimizer's name.
    """

    struct: str  # the functor: LruPolicy (kernels/policy.cuh), SgdUpdate (kernels/backward.cu)
    suffix: str  # of the kernels instantiated with it: probe_lru, update_singles_sgd_k4
