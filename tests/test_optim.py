"""An optimizer object is the one authority on how it runs (``tierstore/optim.py``): the update
functor it declares is the one ``kernels/backward.cu`` instantiates, a subclass never inherits
it, and the CUDA backend decides from the declaration alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import tierstore as ts
from tierstore import cuda
from tierstore.optim import OPTIMIZERS

BACKWARD = Path(__file__).resolve().parent.parent / "kernels" / "backward.cu"


def test_every_optimizer_declares_the_functor_backward_cu_instantiates():
    text = BACKWARD.read_text()
    instances = set(re.findall(r"^TS_BACKWARD_ALL\((\w+), (\w+)\)", text, re.MULTILINE))
    structs = set(re.findall(r"^struct (\w+Update) \{", text, re.MULTILINE))
    declared = {(cls.cuda_functor.suffix, cls.cuda_functor.struct) for cls in OPTIMIZERS.values()}
    assert instances == declared
    assert structs == {struct for _, struct in declared}


@dataclass(frozen=True)
class _Momentless(ts.SGD):
    """SGD's hyper-parameters under another update: the kernels must not take it."""

    name = "momentless"

    def update(self, rows, grad):
        return super().update(rows, grad * 0.5)


@dataclass(frozen=True)
class _Declared(ts.SGD):
    """SGD, declaring SGD's functor itself."""

    cuda_functor = ts.SGD.cuda_functor


def test_a_subclass_declares_its_own_functor_or_has_none():
    assert _Momentless.cuda_functor is None and _Momentless(lr=0.1).cuda_functor is None
    assert _Declared.cuda_functor == ts.SGD.cuda_functor
    assert ts.SGD.cuda_functor is not None


def _store(dim: int) -> SimpleNamespace:
    """What ``cuda.graph_unsupported`` reads of a table whose step could be captured."""
    return SimpleNamespace(
        inclusive_host=False,
        l1=SimpleNamespace(sync_free=True),
        l2_address=1 << 32,
        layout=SimpleNamespace(dim=dim),
    )


@pytest.mark.parametrize("optimizer", [None, *(cls(lr=0.1) for cls in OPTIMIZERS.values())])
def test_a_graph_takes_every_optimizer_with_a_functor(optimizer):
    assert cuda.graph_unsupported(_store(128), optimizer) is None


def test_a_graph_refuses_an_optimizer_without_a_functor_and_says_why():
    why = cuda.graph_unsupported(_store(128), _Momentless(lr=0.1))
    assert why is not None and "'momentless' declares no cuda_functor" in why
    assert "policy with no cuda_functor" in cuda.graph_unsupported(
        SimpleNamespace(inclusive_host=False, l1=SimpleNamespace(sync_free=False)), None
    )
