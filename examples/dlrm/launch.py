"""Runs Meta's DLRM reference script (``dlrm_s_pytorch.py``) with its tables in tierstore.

Usage::

    python examples/dlrm/launch.py /path/to/dlrm [--tierstore-cache 0.2] [--tierstore-policy lru] \\
        [any dlrm_s_pytorch.py argument ...]

``/path/to/dlrm`` is your checkout of https://github.com/facebookresearch/dlrm (not shipped
here). The script runs unmodified; the launcher makes one swap before it starts,
``torch.nn.EmbeddingBag = DLRMEmbeddingBag``, and two things follow from it:

- every table DLRM builds with ``nn.EmbeddingBag(n, m, mode="sum", sparse=True)`` is a
  :class:`tierstore.TieredEmbeddingBag` whose fused optimizer is DLRM's own (``--optimizer``
  ``sgd`` or ``adagrad``, at ``--learning-rate``); DLRM's initialisation
  ``EE.weight.data = W`` writes every row through the tiers;
- the tables follow the learning rate of the optimizer DLRM builds over ``dlrm.parameters()``
  (which never sees their rows), so DLRM's ``LRPolicyScheduler`` (warm-up and decay) reaches
  them: :func:`swapped` also puts a subclass in place of ``torch.optim.SGD`` /
  ``torch.optim.Adagrad`` that records itself as the leader, and each table copies the
  leader's ``param_groups[0]["lr"]`` into its ``fused_optimizer`` at every forward (DLRM's
  scheduler steps after ``optimizer.step()``, so the backward that follows a forward uses the
  lr that the dense step of the same iteration uses).

``--save-model`` / ``--load-model`` save and load ``dlrm.state_dict()``: the tables are in it
through ``TieredEmbeddingBag.state_dict()``, and the learning rate through DLRM's saved
optimizer state, which the tables follow.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import runpy
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

import tierstore as ts
from tierstore.errors import InvalidInputError

# DLRM's --optimizer name -> (the torch class DLRM builds, the fused rule the tables get)
RULES = {
    "sgd": (torch.optim.SGD, ts.SGD),
    "adagrad": (torch.optim.Adagrad, ts.Adagrad),
}


class _Settings:
    """What :func:`swapped` chose for the tables it makes, and the optimizer they follow."""

    rule: ts.Optimizer = ts.SGD(lr=0.01)
    device: str = "cpu"
    cache_fraction: float = 0.2
    policy: str = "lru"
    leader: weakref.ref | None = None  # the optimizer DLRM built: its lr reaches the tables


class DLRMEmbeddingBag(ts.TieredEmbeddingBag):
    """``nn.EmbeddingBag``'s constructor over a tierstore table (what :func:`swapped` puts in
    place of ``torch.nn.EmbeddingBag``). ``sparse`` is meaningless here (the update is fused)
    and ignored; ``max_norm``, ``scale_grad_by_freq``, ``padding_idx`` and ``_weight`` are
    refused. Each forward first takes the leader optimizer's learning rate."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        refused = {
            "max_norm": max_norm is not None,
            "scale_grad_by_freq": scale_grad_by_freq,
            "_weight": _weight is not None,
            "padding_idx": padding_idx is not None,
        }
        if any(refused.values()):
            raise InvalidInputError(
                f"DLRMEmbeddingBag: {[k for k, v in refused.items() if v]} are not supported"
            )
        n, dim = int(num_embeddings), int(embedding_dim)  # DLRM passes numpy integers
        super().__init__(
            n,
            dim,
            mode=mode,
            cache=ts.CacheConfig(
                rows=max(1, math.ceil(_Settings.cache_fraction * n)), policy=_Settings.policy
            ),
            optimizer=_Settings.rule,
            device=device if device is not None else _Settings.device,
            include_last_offset=include_last_offset,
        )

    def forward(self, input, offsets=None, per_sample_weights=None):
        """``TieredEmbeddingBag.forward`` at the leader optimizer's current learning rate."""
        leader = _Settings.leader() if _Settings.leader is not None else None
        if leader is not None and self.fused_optimizer is not None:
            self.fused_optimizer.param_groups[0]["lr"] = leader.param_groups[0]["lr"]
        return super().forward(input, offsets, per_sample_weights)


def _leading(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``base`` whose instances become the optimizer the tables follow."""

    class Leading(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _Settings.leader = weakref.ref(self)

    Leading.__name__ = Leading.__qualname__ = base.__name__
    return Leading


@contextlib.contextmanager
def swapped(
    optimizer: str = "sgd",
    learning_rate: float = 0.01,
    device: str = "cpu",
    cache_fraction: float = 0.2,
    policy: str = "lru",
) -> Iterator[None]:
    """While active, ``torch.nn.EmbeddingBag`` is :class:`DLRMEmbeddingBag` (tables with the
    fused ``optimizer`` at ``learning_rate``, an L1 of ``cache_fraction`` of their rows) and
    ``torch.optim.SGD`` / ``Adagrad`` are subclasses that the tables follow for the lr."""
    if optimizer not in RULES:
        raise InvalidInputError(
            f"--optimizer {optimizer!r}: the tables' fused update supports {sorted(RULES)}"
        )
    if not 0 < cache_fraction <= 1:
        raise InvalidInputError(f"--tierstore-cache must be in (0, 1], got {cache_fraction}")
    saved = (torch.nn.EmbeddingBag, torch.optim.SGD, torch.optim.Adagrad, vars(_Settings).copy())
    _Settings.rule = RULES[optimizer][1](lr=learning_rate)
    _Settings.device, _Settings.cache_fraction, _Settings.policy = device, cache_fraction, policy
    _Settings.leader = None
    torch.nn.EmbeddingBag = DLRMEmbeddingBag  # the one-line swap
    torch.optim.SGD, torch.optim.Adagrad = _leading(saved[1]), _leading(saved[2])
    try:
        yield
    finally:
        torch.nn.EmbeddingBag, torch.optim.SGD, torch.optim.Adagrad = saved[:3]
        for key in ("rule", "device", "cache_fraction", "policy", "leader"):
            setattr(_Settings, key, saved[3][key])


def main(argv: list[str] | None = None) -> int:
    """Parses the launcher's own options, then runs ``dlrm_s_pytorch.py`` with the rest."""
    parser = argparse.ArgumentParser(
        description="Run DLRM's dlrm_s_pytorch.py with its tables in tierstore.",
        epilog="Every other argument goes to dlrm_s_pytorch.py unchanged.",
    )
    parser.add_argument("dlrm_dir", type=Path, help="your checkout of facebookresearch/dlrm")
    parser.add_argument("--tierstore-cache", type=float, default=0.2,
                        help="L1 rows per table as a fraction of its rows (default 0.2)")  # fmt: skip
    parser.add_argument("--tierstore-policy", choices=("lru", "lfu"), default="lru")
    ours, rest = parser.parse_known_args(argv)
    script = ours.dlrm_dir / "dlrm_s_pytorch.py"
    if not script.is_file():
        print(f"launch.py: {script} not found: give the path of a DLRM checkout", file=sys.stderr)
        return 2
    # the options of DLRM's that decide the tables' update and device (its own defaults)
    theirs = argparse.ArgumentParser(add_help=False)
    theirs.add_argument("--optimizer", default="sgd")
    theirs.add_argument("--learning-rate", type=float, default=0.01)
    theirs.add_argument("--use-gpu", action="store_true")
    dlrm_args, _ = theirs.parse_known_args(rest)
    device = "cuda" if dlrm_args.use_gpu and torch.cuda.is_available() else "cpu"
    sys.path.insert(0, str(ours.dlrm_dir))  # DLRM imports its own modules by name
    sys.argv = [str(script), *rest]
    try:
        with swapped(dlrm_args.optimizer, dlrm_args.learning_rate, device,
                     ours.tierstore_cache, ours.tierstore_policy):  # fmt: skip
            runpy.run_path(str(script), run_name="__main__")
    except InvalidInputError as e:
        print(f"launch.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
