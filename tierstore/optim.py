"""Fused sparse optimizers: the update a row gets from its summed gradient, where it lives.

A row is stored as ``[weights (dim) | optimizer state (state_width)]`` in every tier, so that
a row moves as one unit. Each optimizer here is a frozen dataclass of hyper-parameters with:

    state_width(dim)   floats of state per row
    initial_state      the value the state starts at
    update(rows, grad) the new rows (weights and state) for rows (n, width) and summed grads (n, dim)

The CPU update follows torch.optim's sparse code path op for op, so that results agree to
rounding; the CUDA kernels (``kernels/backward.cu``) implement the same formulas, each as an
update functor that an optimizer declares as its ``cuda_functor``
(``cuda_functor.CudaFunctor``): the CUDA backend launches the kernels instantiated with it and
never chooses by name. ``None`` declares that there is none: the CUDA backward then runs the
torch update above (``cpu.backward``, which reads the device, so no CUDA graph), with a
:class:`~tierstore.errors.FallbackWarning`. The declaration is not inherited: a subclass that
does not declare its own gets ``None`` (it may update differently from its base).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .cuda_functor import CudaFunctor
from .errors import InvalidInputError


@dataclass(frozen=True)
class Optimizer:
    """Base class: hyper-parameters of a fused sparse optimizer."""

    lr: float = 0.01
    name: ClassVar[str] = ""
    # the update functor in kernels/backward.cu; None: none (per class, never inherited)
    cuda_functor: ClassVar[CudaFunctor | None] = None
    initial_state: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "cuda_functor" not in vars(cls):
            cls.cuda_functor = None

    def __post_init__(self):
        # 0 is allowed, as in torch.optim: a scheduler's warm-up may start there
        if not (isinstance(self.lr, (int, float)) and self.lr >= 0):
            raise InvalidInputError(
                f"{type(self).__name__}: lr must be a number >= 0, got {self.lr!r}"
            )

    def state_width(self, dim: int) -> int:
        """Floats of optimizer state stored after each row's weights."""
        return 0

    def update(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Updated rows (weights and state) given the summed gradient of each row."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Name and hyper-parameters, JSON-serialisable (stored with an SSD table)."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class SGD(Optimizer):
    """Plain SGD: ``w -= lr * g`` (``torch.optim.SGD`` without momentum)."""

    name: ClassVar[str] = "sgd"
    cuda_functor = CudaFunctor("SgdUpdate", "sgd")

    def update(self, rows, grad):
        out = rows.clone()
        out[:, : grad.shape[1]].add_(grad, alpha=-self.lr)
        return out


@dataclass(frozen=True)
class Adagrad(Optimizer):
    """Element-wise AdaGrad, as ``torch.optim.Adagrad`` (no lr decay or weight decay):
    ``s += g*g; w -= lr * g / (sqrt(s) + eps)``; state: one float per weight."""

    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    name: ClassVar[str] = "adagrad"
    cuda_functor = CudaFunctor("AdagradUpdate", "adagrad")

    @property
    def initial_state(self) -> float:  # type: ignore[override]
        return self.initial_accumulator_value

    def state_width(self, dim):
        return dim

    def update(self, rows, grad):
        dim = grad.shape[1]
        out = rows.clone()
        w, s = out[:, :dim], out[:, dim:]
        s.add_(grad * grad)
        w.add_(grad / (s.sqrt() + self.eps), alpha=-self.lr)
        return out


@dataclass(frozen=True)
class RowWiseAdagrad(Optimizer):
    """Row-wise AdaGrad (FBGEMM's default for embeddings): one float of state per row,
    ``s += mean(g*g); w -= lr * g / (sqrt(s) + eps)``."""

    eps: float = 1e-10
    name: ClassVar[str] = "rowwise_adagrad"
    cuda_functor = CudaFunctor("RowWiseAdagradUpdate", "rowwise_adagrad")

    def state_width(self, dim):
        return 1

    def update(self, rows, grad):
        dim = grad.shape[1]
        out = rows.clone()
        w, s = out[:, :dim], out[:, dim:]
        s.add_((grad * grad).mean(1, keepdim=True))
        w.add_(grad / (s.sqrt() + self.eps), alpha=-self.lr)
        return out


OPTIMIZERS: dict[str, type[Optimizer]] = {o.name: o for o in (SGD, Adagrad, RowWiseAdagrad)}


def optimizer_from_dict(d: dict | None) -> Optimizer | None:
    """Rebuilds an optimizer from :meth:`Optimizer.to_dict` output."""
    if d is None:
        return None
    d = dict(d)
    name = d.pop("name")
    if name not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**d)
