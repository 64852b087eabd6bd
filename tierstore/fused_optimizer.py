"""The fused optimizer as a ``torch.optim.Optimizer``: what schedulers and training loops see.

A ``TieredEmbeddingBag`` updates its rows inside its backward pass (the exact sparse update
where each row lives, without a dense gradient). Training code still expects an optimizer
object, as TorchRec's fused tables offer: :class:`FusedOptimizer` is that object for one
table. Its single entry of ``param_groups`` holds the update rule's hyper-parameters (``lr``,
and ``eps`` for AdaGrad); a ``torch.optim.lr_scheduler`` scheduler, or any code, that changes
them changes the next backward's update (on CUDA through a device scalar the kernels read,
so that no kernel is recompiled and a captured ``GraphedStep`` follows too). ``step()`` and
``zero_grad()`` exist and do nothing: the update happened in backward and no gradient is kept.

:class:`CombinedOptimizer` joins it with the dense model's optimizer into one object for the
training loop. :func:`resolve_optimizer` maps ``torch.optim`` classes to the fused rules.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import InvalidInputError
from .optim import SGD, Adagrad, Optimizer

# hyper-parameters that shape the stored rows (the state's starting value): fixed at creation
_FIXED_FIELDS = ("initial_accumulator_value",)

# torch.optim keyword arguments that choose an implementation, not the update: accepted, unused
_IMPLEMENTATION_KWARGS = ("foreach", "fused", "capturable", "differentiable")

# torch.optim class -> (fused rule, the keyword arguments it honours exactly)
_FROM_TORCH: dict[type, tuple[type[Optimizer], tuple[str, ...]]] = {
    torch.optim.SGD: (SGD, ("lr",)),
    torch.optim.Adagrad: (Adagrad, ("lr", "eps", "initial_accumulator_value")),
}


def optimizer_from_torch(cls: type, kwargs: dict[str, Any] | None = None) -> Optimizer:
    """The fused rule equal to ``cls(params, **kwargs)`` for a ``torch.optim`` class.

    ``torch.optim.SGD`` maps to :class:`SGD` (``lr``), ``torch.optim.Adagrad`` to
    :class:`Adagrad` (``lr``, ``eps``, ``initial_accumulator_value``). Unspecified arguments take
    the torch class's own defaults (``SGD``'s ``lr`` is 0.001). Any other argument given a value
    other than its default (``momentum``, ``weight_decay``, ``nesterov``, ``lr_decay``,
    ``maximize``, ...) is refused: the fused update does not implement it. Implementation
    choices (``foreach``, ``fused``, ``capturable``, ``differentiable``) are accepted and unused.
    """
    if cls not in _FROM_TORCH:
        known = ", ".join(f"torch.optim.{c.__name__}" for c in _FROM_TORCH)
        raise InvalidInputError(
            f"optimizer: {getattr(cls, '__name__', cls)!r} has no fused update; use {known}, or "
            "ts.SGD, ts.Adagrad, ts.RowWiseAdagrad"
        )
    kwargs = dict(kwargs or {})
    rule, honoured = _FROM_TORCH[cls]
    signature = inspect.signature(cls.__init__)
    defaults = {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in ("self", "params") and p.default is not inspect.Parameter.empty
    }
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise InvalidInputError(f"optimizer: torch.optim.{cls.__name__} takes no {unknown}")
    refused = sorted(
        name
        for name, value in kwargs.items()
        if name not in honoured and name not in _IMPLEMENTATION_KWARGS and value != defaults[name]
    )
    if refused:
        raise InvalidInputError(
            f"optimizer: torch.optim.{cls.__name__} with {refused} is not supported by the fused "
            f"update (it honours {list(honoured)} exactly); leave them at their defaults"
        )
    values = {name: kwargs.get(name, defaults[name]) for name in honoured}
    if isinstance(values.get("lr"), torch.Tensor):
        values["lr"] = float(values["lr"])
    return rule(**values)


def resolve_optimizer(optimizer: Any) -> Optimizer | None:
    """The fused rule for a table's ``optimizer=`` argument.

    Accepted: ``None`` (no training), a tierstore rule (:class:`SGD`, :class:`Adagrad`,
    :class:`RowWiseAdagrad`), or a ``torch.optim`` class with its keyword arguments as a pair
    ``(torch.optim.Adagrad, {"lr": 0.01, "eps": 1e-10})`` (a bare class takes its defaults);
    see :func:`optimizer_from_torch` for what maps and what is refused."""
    if optimizer is None or isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, tuple) and len(optimizer) == 2 and isinstance(optimizer[1], dict):
        return optimizer_from_torch(optimizer[0], optimizer[1])
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer_from_torch(optimizer, {})
    raise InvalidInputError(
        "optimizer must be None, ts.SGD/ts.Adagrad/ts.RowWiseAdagrad, or a torch.optim class "
        f"with its keyword arguments as (torch.optim.SGD, {{'lr': 0.1}}); got {optimizer!r}"
    )


def _hyper_parameters(rule: Optimizer) -> dict[str, Any]:
    return dataclasses.asdict(rule)


class FusedOptimizer(torch.optim.Optimizer):
    """A table's fused optimizer, shaped as a ``torch.optim.Optimizer`` (TorchRec's convention).

    ``param_groups`` is one group ``{"params": [], "lr": ..., **other hyper-parameters}`` (the
    table has no dense parameter: ``params`` is empty). Each backward reads the group's ``lr``
    (and ``eps`` for AdaGrad) at that moment, so schedulers and manual changes take effect at
    the next backward. ``initial_accumulator_value`` is fixed when the table is made (it is the
    state never-written rows start with); changing it later raises at the next backward.

    ``step()`` runs ``closure`` if given and otherwise does nothing, and ``zero_grad()`` does
    nothing: the rows were already updated inside backward, and no gradient is kept. Call
    them as with any optimizer (a scheduler warns if ``step()`` is never called).
    ``state_dict()`` / ``load_state_dict()`` carry the hyper-parameters only; the rows and their
    optimizer state belong to the table.

    Example::

        >>> import torch, tierstore as ts
        >>> emb = ts.TieredEmbeddingBag(100, 4, optimizer=ts.SGD(lr=0.1), device="cpu")
        >>> sched = torch.optim.lr_scheduler.StepLR(emb.fused_optimizer, step_size=1, gamma=0.5)
        >>> sched.step(); emb.fused_optimizer.param_groups[0]["lr"]
        0.05
    """

    def __init__(self, rule: Optimizer):
        if not isinstance(rule, Optimizer):
            raise InvalidInputError(f"FusedOptimizer needs a tierstore rule, got {rule!r}")
        hyper = _hyper_parameters(rule)
        # Optimizer.__init__'s work by hand: its add_param_group imports torch._dynamo (seconds
        # on a first table), and a group with no parameter needs none of its checks
        _init_optimizer_fields(self, dict(hyper))
        self.param_groups = [{"params": [], **hyper}]
        self.state = defaultdict(dict)  # none: the rows' optimizer state lives in the tiers
        self._rule = rule
        self._names = tuple(hyper)  # the group's entries that make the rule
        self._seen = tuple(hyper.values())  # their values when the rule was last made

    @property
    def rule(self) -> Optimizer:
        """The update rule with the group's current hyper-parameters (what the next backward
        applies); raises :class:`InvalidInputError` if the group holds invalid values."""
        group = self.param_groups[0]
        try:
            now = tuple([_plain(group[k]) for k in self._names])  # a tensor lr: its value
        except KeyError as missing:
            raise InvalidInputError(
                f"{type(self._rule).__name__}'s param_groups[0] lost its {missing} entry"
            ) from None
        if now != self._seen:
            changed = dict(zip(self._names, now))
            for k in _FIXED_FIELDS:
                if k in changed and changed[k] != getattr(self._rule, k):
                    raise InvalidInputError(
                        f"{k} is fixed when the table is made (never-written rows start with it); "
                        f"param_groups[0] changed it from {getattr(self._rule, k)} to {changed[k]}"
                    )
            self._rule = dataclasses.replace(self._rule, **changed)
            self._seen = now
        return self._rule

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs ``closure`` (under grad mode) and returns its loss; updates nothing: the
        table's rows were updated inside its backward pass."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: a table keeps no gradient (each backward's is applied at once)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: a table's fused optimizer has exactly one group."""
        raise InvalidInputError("a table's fused optimizer has one param group; add none")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads hyper-parameters saved by :meth:`state_dict` of a table with the same rule."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        wanted = set(self._names)
        if not isinstance(groups, list) or len(groups) != 1 or not wanted <= set(groups[0]):
            raise InvalidInputError(
                f"load_state_dict: expected one param group with {sorted(wanted)} (a "
                f"{type(self._rule).__name__} fused optimizer's state_dict)"
            )
        old = self.param_groups
        super().load_state_dict(state_dict)
        try:
            self.rule  # noqa: B018 (validates the loaded values)
        except InvalidInputError:
            self.param_groups = old
            raise


def _init_optimizer_fields(opt: torch.optim.Optimizer, defaults: dict[str, Any]) -> None:
    """The fields ``torch.optim.Optimizer.__init__`` sets (its hooks, state and defaults), for
    the optimizers here that hold no parameter of their own."""
    opt.defaults = defaults
    opt._optimizer_step_pre_hooks = OrderedDict()
    opt._optimizer_step_post_hooks = OrderedDict()
    opt._optimizer_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_state_dict_post_hooks = OrderedDict()
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    opt._warned_capturable_if_run_uncaptured = True


def _plain(value: Any) -> Any:
    """A hyper-parameter as a Python number (schedulers may store tensors)."""
    return float(value) if isinstance(value, torch.Tensor) else value


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers as one, for one training loop: typically the dense model's and the
    tables' fused ones, ``ts.CombinedOptimizer([dense_opt, emb.fused_optimizer])``.

    ``param_groups`` is every optimizer's groups in order (the same dicts: a scheduler over
    the combined object sets each one's lr), ``step()`` / ``zero_grad()`` call each optimizer's,
    ``state_dict()`` is ``{"optimizers": [each one's state_dict]}`` and ``load_state_dict``
    reads it back.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        for o in self.optimizers:
            if not isinstance(o, torch.optim.Optimizer):
                raise InvalidInputError(
                    f"CombinedOptimizer takes torch.optim.Optimizer objects, got {o!r}"
                )
        if not self.optimizers:
            raise InvalidInputError("CombinedOptimizer needs at least one optimizer")
        # No Optimizer.__init__: it would copy the groups; param_groups stays a live view.
        _init_optimizer_fields(self, {})

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Every optimizer's param groups, in order (the optimizers' own dicts)."""
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Every optimizer's per-parameter state, merged (parameters are disjoint)."""
        merged: dict = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs ``closure`` once (if given), then every optimizer's ``step()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Every optimizer's ``zero_grad``."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: add the group to one of the combined optimizers."""
        raise InvalidInputError("add the param group to one of the combined optimizers")

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"optimizers": [state_dict of each, in order]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` returned into each optimizer, in order."""
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise InvalidInputError(
                f"load_state_dict: expected {{'optimizers': [{len(self.optimizers)} state "
                "dicts]}} from CombinedOptimizer.state_dict()"
            )
        for o, part in zip(self.optimizers, parts):
            o.load_state_dict(part)

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        return f"CombinedOptimizer([{inner}])"
