"""Shared fixtures: the backends to run each engine test on, and the ``gpu`` marker's skip."""

from __future__ import annotations

import pytest
import torch


def cuda_usable() -> bool:
    """CUDA and CuPy are both there (the kernel backend can run)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each engine test runs on the CPU backend and, behind the ``gpu`` marker, on CUDA."""
    return request.param
