"""A policy object is the one authority on how it runs (``tierstore/policy.py``): its declared
fast paths match the kernels' sources, are never inherited, and a policy without them runs on
the torch specification, with the same results and a warning."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import cache_compiled, cpu
from tierstore.cache_compiled import CompiledCache
from tierstore.compiled import COMPILED
from tierstore.errors import FallbackWarning
from tierstore.policy import LFU, LRU, POLICIES, CompiledScore, Policy, make_policy
from tierstore.replay import sweep

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


def _instances(file: str, macro: str) -> set[tuple[str, str]]:
    """``(kernel name, functor)`` of every ``MACRO(name, Functor)`` line of ``kernels/file``."""
    text = (KERNELS / file).read_text()
    return set(re.findall(rf"^{macro}\((\w+), (\w+)\)", text, re.MULTILINE))


def test_every_policy_declares_the_kernels_the_sources_instantiate():
    """The kernels the CUDA cache launches for a policy (``probe_<suffix>`` and the rest) are
    instantiated with the functor it declares, and every functor of the sources belongs to a
    registered policy."""
    structs = set(re.findall(r"^struct (\w+) \{", (KERNELS / "policy.cuh").read_text(), re.M))
    declared = [cls.cuda_functor for cls in POLICIES.values()]
    assert all(f is not None for f in declared)
    assert {f.struct for f in declared} == structs - {"Sketch"}
    for file, macro, stem in [
        ("lookup.cu", "TS_PROBE", "probe"),
        ("insert.cu", "TS_CHOOSE", "choose_victims"),
        ("sketch.cu", "TS_AGE", "sketch_age"),
    ]:
        want = {(f"{stem}_{f.suffix}", f.struct) for f in declared}
        assert _instances(file, macro) == want, file


def test_every_registered_policy_declares_a_compiled_score_that_fits_its_sketch():
    for cls in POLICIES.values():
        assert isinstance(cls.compiled_score, CompiledScore)
        assert (cls.compiled_score is CompiledScore.FREQUENCY) == cls.uses_frequency
    assert (
        LRU.compiled_score is CompiledScore.STEP and LFU.compiled_score is CompiledScore.FREQUENCY
    )


def test_no_module_chooses_by_a_policy_or_optimizer_name():
    """Kernels and compiled steps are found from the objects' declarations, never from names."""
    pattern = re.compile(r"\b(policy|optimizer|opt)\.name\s*(==|!=|in\b|not in\b)|kernel_id")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "tierstore").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


class _Renamed(LRU):
    """LRU's scores under another name, declaring nothing: the fast paths must not take it."""

    name = "renamed"


class _Declared(LRU):
    """LRU's scores, declaring LRU's fast paths itself."""

    name = "declared"
    cuda_functor = LRU.cuda_functor
    compiled_score = LRU.compiled_score


class _Affine(Policy):
    """A policy of its own: ``3 * step + 7``, other scores in LRU's order (LRU is its oracle)."""

    name = "affine"

    def score(self, step, freq, n, device):
        return torch.full((n,), 3 * step + 7, dtype=torch.int64, device=device)


def test_declarations_are_not_inherited():
    assert _Renamed.cuda_functor is None and _Renamed.compiled_score is None
    assert _Affine.cuda_functor is None and _Affine.compiled_score is None
    assert _Declared.cuda_functor == LRU.cuda_functor
    assert _Declared.compiled_score is CompiledScore.STEP
    assert LRU.cuda_functor is not None  # a subclass resets its own class only


@pytest.mark.skipif(not COMPILED, reason="numba is not installed")
def test_the_compiled_step_runs_exactly_the_policies_that_declare_it(monkeypatch):
    calls = []
    real = cache_compiled._step
    monkeypatch.setattr(cache_compiled, "_step", lambda *a: calls.append(1) or real(*a))
    ids, counts = torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.int64)
    for policy, compiled in [("lru", True), ("lfu", True), (_Declared(), True),
                             (_Renamed(), False), (_Affine(), False)]:  # fmt: skip
        calls.clear()
        CompiledCache(8, 4, policy).lookup(ids, counts)
        assert bool(calls) == compiled, policy


@pytest.mark.skipif(not COMPILED, reason="numba is not installed")
def test_a_policy_without_a_compiled_score_warns_when_made_an_l1():
    with pytest.warns(FallbackWarning, match="'renamed' declares no compiled_score"):
        cpu.new_cache(16, 4, _Renamed(), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        for name in POLICIES:
            cpu.new_cache(16, 4, name, torch.device("cpu"))
        cpu.new_cache(16, 4, _Declared(), torch.device("cpu"))


def test_a_policy_of_its_own_trains_as_its_torch_specification():
    """A user-defined policy runs on the torch step: a table under it ends exactly as one under
    LRU (its scores order the ways as LRU's), on random batches through a small cache."""
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    tables = []
    for policy in ("lru", _Affine()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            emb = ts.TieredEmbeddingBag(
                200, 8, mode="sum", cache=ts.CacheConfig(rows=12, ways=4, policy=policy), seed=seed,
                optimizer=ts.SGD(lr=0.1), device="cpu",
            )  # fmt: skip
        gen = np.random.default_rng(seed)
        outs = []
        for _ in range(6):
            ids = torch.from_numpy(gen.integers(0, 200, (16, 3)))
            out = emb(ids)
            out.backward(torch.from_numpy(gen.standard_normal(out.shape)).float())
            outs.append(out.detach())
        tables.append((torch.stack(outs), emb.read_rows(torch.arange(200)), emb.stats()))
    (out_a, rows_a, stats_a), (out_b, rows_b, stats_b) = tables
    assert torch.equal(out_a, out_b) and torch.equal(rows_a, rows_b)
    assert stats_a.hits == stats_b.hits and stats_a.misses == stats_b.misses


def test_the_replay_runs_every_registered_policy_and_no_other():
    assert sweep.ENGINE_POLICIES == tuple(POLICIES)
    sweep.check_policies(list(POLICIES))
    with pytest.raises(ts.InvalidInputError, match="unknown policies"):
        sweep.check_policies(["renamed"])


def test_the_replay_steps_a_policy_without_a_compiled_score_by_torch(monkeypatch):
    """At batch 1 a policy with no compiled loop is replayed batch by batch instead (the torch
    step per request): the same hits as LRU's compiled loop, whose scores it shares."""
    monkeypatch.setitem(POLICIES, "affine", _Affine)
    monkeypatch.setattr(sweep, "ENGINE_POLICIES", (*sweep.ENGINE_POLICIES, "affine"))
    ids = np.random.default_rng().zipf(1.3, 3000).astype(np.int64) % 500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        rows = sweep.replay_table(ids, [20, 80], ["lru", "affine"], batch=1, ways=8)
    by_policy = {}
    for r in rows:
        by_policy.setdefault(r["policy"].split()[0], []).append((r["hits"], r["evictions"]))
    assert by_policy["affine"] == by_policy["lru"]
    assert make_policy("affine").compiled_score is None
