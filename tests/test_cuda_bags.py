"""The CUDA bag kernels' short-bag paths (kernels/forward.cu ``pool_short``,
kernels/backward.cu ``update_singles_short`` and ``bag_of_index``) against a warp per bag, bit
for bit, and against the CPU backend, on fresh random batches of about one index a bag (a
collection's shape) with empty bags, long bags that send their tile down the per-bag path, rows
in L1 and in L2 (conflict misses), odd dims and widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import cuda_bags


def test_bag_tile_fits_a_tiles_indices_in_half_a_warp():
    for n, bags, tile in [(100, 200, 32), (100, 100, 16), (200, 100, 8), (201, 100, 0)]:
        assert cuda_bags.bag_tile(n, bags) == tile


def _lengths(rng: np.random.Generator, bags: int, mean: float) -> np.ndarray:
    """Bag lengths of about ``mean`` on average: Poisson, with a few long bags (40 indices)."""
    lengths = rng.poisson(mean, bags)
    lengths[rng.random(bags) < 0.004] = 40
    return lengths


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (as tests/test_cuda.py compares the CUDA backend with the CPU's)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _rows(emb, num):
    return emb.read_rows(torch.arange(num, device="cuda"), with_state=True).cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [3, 12, 64, 130, 256])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("opt", ["sgd", "adagrad", "rowwise"])
def test_short_bags_pool_and_train_as_a_warp_per_bag(dim, mode, opt, monkeypatch):
    num, bags = 5000, 3000
    rule = {"sgd": ts.SGD, "adagrad": ts.Adagrad, "rowwise": ts.RowWiseAdagrad}[opt](lr=0.05)
    cache = ts.CacheConfig(rows=512, ways=8)  # small: many of a batch's rows stay in L2
    make = lambda dev: ts.TieredEmbeddingBag(  # noqa: E731
        num, dim, mode=mode, cache=cache, optimizer=rule, device=dev
    )
    tiled, per_bag, cpu = make("cuda"), make("cuda"), make("cpu")
    rng = np.random.default_rng(dim * 7 + len(mode) + len(opt))
    real_tile = cuda_bags.bag_tile
    for step in range(6):
        lengths = _lengths(rng, bags, mean=(0.4, 0.9, 1.5)[step % 3])
        n = int(lengths.sum())
        assert real_tile(n, bags) > 0  # the short paths run
        ids = torch.from_numpy((rng.zipf(1.2, n) - 1) % num)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        psw = torch.rand(n) if mode == "sum" and step % 2 else None
        grad = torch.randn(bags, dim)
        outs, psw_grads = [], []
        no_tile = lambda n, bags: 0  # noqa: E731  (a warp per bag)
        for emb, tile in ((per_bag, no_tile), (tiled, real_tile), (cpu, no_tile)):
            dev = "cpu" if emb is cpu else "cuda"
            monkeypatch.setattr(cuda_bags, "bag_tile", tile)
            w = None if psw is None else psw.to(dev).requires_grad_()
            y = emb(ids.to(dev), offsets.to(dev), per_sample_weights=w)
            y.backward(grad.to(dev))
            outs.append(y.detach().cpu())
            psw_grads.append(None if w is None else w.grad.cpu())
        assert torch.equal(outs[1], outs[0]), step
        assert _rel(outs[1], outs[2]) <= 1e-6, step  # the CPU's sums: not the same fma order
        if psw is not None:
            assert torch.equal(psw_grads[1], psw_grads[0]), step
        assert torch.equal(_rows(tiled, num), _rows(per_bag, num)), step
        assert _rel(_rows(tiled, num), cpu.read_rows(torch.arange(num), with_state=True)) <= 1e-6
    assert tiled.stats() == per_bag.stats() == cpu.stats()
