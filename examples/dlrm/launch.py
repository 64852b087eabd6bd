"""Runs Meta's DLRM reference script (``dlrm_s_pytorch.py``) with its tables in tierstore.

Usage::

    python examples/dlrm/launch.py /path/to/dlrm [--tierstore-cache 0.2] [--tierstore-policy lru] \\
        [--tierstore-collection] [--tierstore-ssd DIR [--tierstore-host 0.5]] \\
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

With ``--tierstore-collection`` the swap is ``torch.nn.EmbeddingBag = CollectedEmbeddingBag``
instead: every table DLRM builds becomes one table of a single
:class:`tierstore.TieredEmbeddingBagCollection` (one L1 and one L2 shared by all of them), built
at the first use of any of them.

With ``--tierstore-ssd DIR`` every table has an SSD tier (L3) in ``DIR`` (``DIR/table0``, ...;
``DIR/collection`` with ``--tierstore-collection``), with an L2 in host memory of
``--tierstore-host F`` of its rows (default: ``ts.SSDConfig``'s). DLRM's initialisation writes
every row, so L3 holds the whole table; rows trained since the last flush are not kept when
the run ends (DLRM's ``--save-model`` saves them, as without an SSD tier).

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
from tierstore import checkpoint
from tierstore.errors import InvalidInputError
from tierstore.hashing import initial_weights
from tierstore.weights import WeightCopy  # weight.data = W writes the table (as DLRM inits)

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
    collect: bool = False  # every table into one collection (CollectedEmbeddingBag)
    ssd_dir: Path | None = None  # each table's SSD tier under it (None: no SSD tier)
    host_fraction: float | None = None  # L2 rows as a fraction of the table's (None: default)
    made: int = 0  # tables made so far (the names of their SSD directories)
    gathering: _Gathering | None = None  # where the tables being built now are gathered


def _leader_lr() -> float | None:
    leader = _Settings.leader() if _Settings.leader is not None else None
    return None if leader is None else leader.param_groups[0]["lr"]


def _ssd(name: str, rows: int) -> ts.SSDConfig | None:
    """The SSD tier of a table (or collection) of ``rows`` rows called ``name``, if any."""
    if _Settings.ssd_dir is None:
        return None
    fraction = _Settings.host_fraction
    host_rows = None if fraction is None else max(1, math.ceil(fraction * rows))
    return ts.SSDConfig(_Settings.ssd_dir / name, host_rows=host_rows)


def _refuse(max_norm, scale_grad_by_freq, _weight, padding_idx, **more) -> None:
    refused = {
        "max_norm": max_norm is not None,
        "scale_grad_by_freq": scale_grad_by_freq,
        "_weight": _weight is not None,
        "padding_idx": padding_idx is not None,
        **more,
    }
    if any(refused.values()):
        raise InvalidInputError(
            f"DLRMEmbeddingBag: {[k for k, v in refused.items() if v]} are not supported"
        )


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
        _refuse(max_norm, scale_grad_by_freq, _weight, padding_idx)
        n, dim = int(num_embeddings), int(embedding_dim)  # DLRM passes numpy integers
        ssd = _ssd(f"table{_Settings.made}", n)
        _Settings.made += 1
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
            ssd=ssd,
        )

    def forward(self, input, offsets=None, per_sample_weights=None):
        """``TieredEmbeddingBag.forward`` at the leader optimizer's current learning rate."""
        lr = _leader_lr()
        if lr is not None and self.fused_optimizer is not None:
            self.fused_optimizer.param_groups[0]["lr"] = lr
        return super().forward(input, offsets, per_sample_weights)


class _Gathering:
    """The tables DLRM builds, gathered into one :class:`tierstore.TieredEmbeddingBagCollection`
    at their first use (DLRM builds every table before it runs a batch). A table built after
    that starts a new gathering (a second model)."""

    def __init__(self):
        self.tables: list[CollectedEmbeddingBag] = []
        self._collection: ts.TieredEmbeddingBagCollection | None = None

    @property
    def built(self) -> bool:
        return self._collection is not None

    def collection(self) -> ts.TieredEmbeddingBagCollection:
        """The collection of every gathered table (built on first call, each table starting
        from the weights assigned to it)."""
        if self._collection is None:
            configs = [t.config for t in self.tables]
            rows = sum(t.num_embeddings for t in self.tables)
            cache_rows = max(len(configs), math.ceil(_Settings.cache_fraction * rows))
            col = ts.TieredEmbeddingBagCollection(
                configs, cache=ts.CacheConfig(rows=cache_rows, policy=_Settings.policy),
                ssd=_ssd("collection", rows), optimizer=_Settings.rule, device=_Settings.device,
            )  # fmt: skip
            for t in self.tables:
                if t._pending is not None:
                    col.write_rows(t.config.name, torch.arange(t.num_embeddings), t._pending)
                    t._pending = None
            self._collection = col
            if _Settings.gathering is self:
                _Settings.gathering = None
        return self._collection


class CollectedEmbeddingBag(torch.nn.Module):
    """``nn.EmbeddingBag``'s constructor over one table of a collection that holds every table
    built while :func:`swapped` (``collect=True``) is active: one L1, one L2 and one lookup step
    per call for all of them (tables of one dim and optimizer share every tier).

    DLRM calls its tables one at a time, so each call looks its table's bags up in the shared
    collection, the other tables' features given as empty bags (a few tensor ops, whatever the
    number of tables; the output is ``(B, sum of the dims)``, of which this table's columns
    are returned). ``weight`` reads and assigns
    the table's rows as ``TieredEmbeddingBag.weight`` does (``EE.weight.data = W`` included);
    ``state_dict`` holds the keys a ``TieredEmbeddingBag`` of the table would.
    ``include_last_offset`` and ``mode="max"`` are refused, as :class:`DLRMEmbeddingBag`'s
    refusals."""

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
        _refuse(max_norm, scale_grad_by_freq, _weight, padding_idx,
                include_last_offset=include_last_offset, max=mode == "max")  # fmt: skip
        super().__init__()
        if _Settings.gathering is None:
            _Settings.gathering = _Gathering()
        self._gathering = _Settings.gathering
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.config = ts.TableConfig(
            name=f"table{len(self._gathering.tables)}",
            embedding_dim=self.embedding_dim,
            num_embeddings=self.num_embeddings,
            pooling=mode,
        )
        self._pending: torch.Tensor | None = None  # weights assigned before the collection
        self._gathering.tables.append(self)

    @property
    def collection(self) -> ts.TieredEmbeddingBagCollection:
        """The collection that holds this table (and every table gathered with it)."""
        return self._gathering.collection()

    def forward(self, input, offsets=None, per_sample_weights=None):
        """This table's pooled bags ``(B, D)``, looked up in the shared collection at the
        leader optimizer's current learning rate."""
        col = self.collection
        lr = _leader_lr()
        if lr is not None:
            col.set_learning_rate(lr)
        if input.dim() == 2:  # (B, L): B bags of L ids
            lengths = torch.full(input.shape[:1], input.shape[1], device=input.device)
        else:  # nn.EmbeddingBag's offsets: the last bag runs to the end
            end = torch.full((1,), input.numel(), device=input.device)
            lengths = torch.diff(offsets.to(torch.int64), append=end)
        # The batch in a KeyedJaggedTensor's layout: every table's feature, in order, each with
        # B bags; the other tables' bags are empty (the keys in order: one slice per group)
        tables = self._gathering.tables
        k, bags = tables.index(self), lengths.numel()
        lengths = torch.cat([lengths.new_zeros(k * bags), lengths,
                             lengths.new_zeros((len(tables) - k - 1) * bags)])  # fmt: skip
        keys = [t.config.name for t in tables]
        kt = col(keys=keys, values=input.reshape(-1), lengths=lengths, weights=per_sample_weights)
        return kt[self.config.name]

    def _read_all(self) -> torch.Tensor:
        if self._gathering.built:
            return self.collection.read_rows(self.config.name, torch.arange(self.num_embeddings))
        if self._pending is not None:
            return self._pending.clone()
        c = self.config
        return initial_weights(torch.arange(self.num_embeddings), c.embedding_dim, c.seed,
                               c.init_scale)  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """A copy ``(num_embeddings, D)`` of the table's weights; assigning it, or its
        ``.data``, writes every row (detached)."""
        return WeightCopy(self._read_all(), self)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise InvalidInputError(f"weight must have shape {shape}")
        value = value.detach().to(torch.float32)
        if self._gathering.built:
            self.collection.write_rows(self.config.name, torch.arange(shape[0]), value)
        else:
            self._pending = value.clone()

    def _view(self, reading: bool):
        views = dict(self.collection.table_views(reading=reading))
        return views[f"tables.{self.config.name}."]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        checkpoint.save_table(self._view(reading=True), destination, prefix)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        view = self._view(reading=False)
        checkpoint.check_table(view, state_dict, prefix)
        rest = checkpoint.load_table(view, state_dict, prefix, missing_keys)
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


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
    collect: bool = False,
    ssd_dir: str | Path | None = None,
    host_fraction: float | None = None,
) -> Iterator[None]:
    """While active, ``torch.nn.EmbeddingBag`` is :class:`DLRMEmbeddingBag` (tables with the
    fused ``optimizer`` at ``learning_rate``, an L1 of ``cache_fraction`` of their rows), or
    with ``collect`` :class:`CollectedEmbeddingBag` (every table in one collection, whose
    shared L1 holds ``cache_fraction`` of all their rows); ``torch.optim.SGD`` / ``Adagrad``
    are subclasses that the tables follow for the lr. With ``ssd_dir``, each table (or the
    collection) has an SSD tier there, under its name, whose L2 holds ``host_fraction`` of
    its rows (default: ``ts.SSDConfig``'s)."""
    if optimizer not in RULES:
        raise InvalidInputError(
            f"--optimizer {optimizer!r}: the tables' fused update supports {sorted(RULES)}"
        )
    if not 0 < cache_fraction <= 1:
        raise InvalidInputError(f"--tierstore-cache must be in (0, 1], got {cache_fraction}")
    if host_fraction is not None:
        if ssd_dir is None:
            raise InvalidInputError("--tierstore-host applies only with --tierstore-ssd DIR")
        if not cache_fraction < host_fraction <= 1:
            raise InvalidInputError(
                f"--tierstore-host must be in (--tierstore-cache, 1], got {host_fraction}: L2 "
                "holds every row L1 holds, and the rows of the batches in flight"
            )
    saved = (torch.nn.EmbeddingBag, torch.optim.SGD, torch.optim.Adagrad, vars(_Settings).copy())
    _Settings.rule = RULES[optimizer][1](lr=learning_rate)
    _Settings.device, _Settings.cache_fraction, _Settings.policy = device, cache_fraction, policy
    _Settings.leader, _Settings.collect, _Settings.gathering = None, collect, None
    _Settings.ssd_dir = None if ssd_dir is None else Path(ssd_dir)
    _Settings.host_fraction, _Settings.made = host_fraction, 0
    torch.nn.EmbeddingBag = CollectedEmbeddingBag if collect else DLRMEmbeddingBag  # the swap
    torch.optim.SGD, torch.optim.Adagrad = _leading(saved[1]), _leading(saved[2])
    try:
        yield
    finally:
        torch.nn.EmbeddingBag, torch.optim.SGD, torch.optim.Adagrad = saved[:3]
        for key in ("rule", "device", "cache_fraction", "policy", "leader", "collect",
                    "gathering", "ssd_dir", "host_fraction", "made"):  # fmt: skip
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
    parser.add_argument("--tierstore-collection", action="store_true",
                        help="every table in one collection: one shared L1 and L2 for all "
                        "(--tierstore-cache is then a fraction of all their rows)")  # fmt: skip
    parser.add_argument("--tierstore-ssd", type=Path, default=None, metavar="DIR",
                        help="an SSD tier for every table, in DIR (default: none)")  # fmt: skip
    parser.add_argument("--tierstore-host", type=float, default=None, metavar="F",
                        help="with --tierstore-ssd: L2 rows per table as a fraction of its rows")  # fmt: skip
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
                     ours.tierstore_cache, ours.tierstore_policy,
                     ours.tierstore_collection, ours.tierstore_ssd,
                     ours.tierstore_host):  # fmt: skip
            runpy.run_path(str(script), run_name="__main__")
    except ts.TierstoreError as e:  # a bad option, a table in DIR of another shape, a full L2
        print(f"launch.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
