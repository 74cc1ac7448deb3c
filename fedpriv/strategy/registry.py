"""Strategies by name: what ``[strategy] name = ...`` and its options build.

Each name accepts a fixed set of options of fixed types; anything else is a
:class:`~fedpriv.errors.ConfigError` that lists what would have been accepted.
Flower's own strategies are built by :func:`fedpriv.strategy.flower.flower_strategy`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError
from fedpriv.strategy.fedavg import FedAvg
from fedpriv.strategy.fedopt import FedAdagrad, FedAdam, FedYogi
from fedpriv.strategy.fedprox import FedProx
from fedpriv.strategy.protocol import Strategy, WholeUpdateStrategy
from fedpriv.strategy.robust import Krum, Median, TrimmedMean
from fedpriv.wire import Model

__all__ = ["StrategyName", "build_strategy"]


class StrategyName(enum.Enum):
    """The native strategies."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    KRUM = "krum"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"


class _Kind(enum.Enum):
    """The type an option must have."""

    INT = "an integer"
    FLOAT = "a number"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Recipe:
    build: Callable[..., Strategy | WholeUpdateStrategy]
    options: Mapping[str, _Kind]
    required: frozenset[str] = frozenset()
    # Whether `build` takes the global model's layout (to allocate its state now).
    takes_layout: bool = False


_FEDOPT = {"eta": _Kind.FLOAT, "eta_l": _Kind.FLOAT, "tau": _Kind.FLOAT}
_MOMENTS = {**_FEDOPT, "beta_1": _Kind.FLOAT, "beta_2": _Kind.FLOAT}
_SLICES = {"slice_bytes": _Kind.INT}

_RECIPES: dict[StrategyName, _Recipe] = {
    StrategyName.FEDAVG: _Recipe(build=FedAvg, options={}),
    StrategyName.FEDPROX: _Recipe(
        build=FedProx,
        options={"proximal_mu": _Kind.FLOAT},
        required=frozenset({"proximal_mu"}),
    ),
    StrategyName.FEDADAM: _Recipe(build=FedAdam, options=_MOMENTS, takes_layout=True),
    StrategyName.FEDYOGI: _Recipe(build=FedYogi, options=_MOMENTS, takes_layout=True),
    StrategyName.FEDADAGRAD: _Recipe(build=FedAdagrad, options=_FEDOPT, takes_layout=True),
    StrategyName.KRUM: _Recipe(
        build=Krum,
        options={"byzantine": _Kind.INT, "keep": _Kind.INT, **_SLICES},
        required=frozenset({"byzantine"}),
    ),
    StrategyName.MEDIAN: _Recipe(build=Median, options=_SLICES),
    StrategyName.TRIMMED_MEAN: _Recipe(build=TrimmedMean, options={"beta": _Kind.FLOAT, **_SLICES}),
}


def _value(name: StrategyName, option: str, kind: _Kind, value: Scalar) -> int | float:
    """`value` as `kind`, or a ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"strategy.options.{option} for {name.value} = {value!r}: must be {kind.value}"
        )
    if kind is _Kind.INT:
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(
                    f"strategy.options.{option} for {name.value} = {value!r}: must be an integer"
                )
            return int(value)
        return value
    return float(value)


def build_strategy(
    name: str, *, model: Model, options: Mapping[str, Scalar]
) -> Strategy | WholeUpdateStrategy:
    """The native strategy called `name`, configured by `options`.

    Args:
        name: One of :class:`StrategyName`'s values (``"fedadam"``, ``"krum"``, ...).
        model: The initial global model; server optimisers allocate their moments for it.
        options: The strategy's keyword options, e.g. ``{"eta": 0.01}``.

    Returns:
        A :class:`~fedpriv.strategy.protocol.Strategy` (over the round's sum) or, for
        the robust rules, a :class:`~fedpriv.strategy.protocol.WholeUpdateStrategy`.

    Raises:
        ConfigError: An unknown name, an unknown, missing or mistyped option, or a
            value out of range; the message lists what is accepted.

    Example:
        >>> import numpy as np
        >>> model = Model.from_arrays({"w": np.zeros(2, np.float32)})
        >>> build_strategy("fedprox", model=model, options={"proximal_mu": 0.1}).configure(1)
        {'proximal_mu': 0.1}
    """
    try:
        strategy = StrategyName(name)
    except ValueError:
        accepted = ", ".join(n.value for n in StrategyName)
        raise ConfigError(
            f"strategy.name = {name!r}: not a native strategy; use one of {accepted}"
        ) from None
    recipe = _RECIPES[strategy]
    unknown = sorted(set(options) - set(recipe.options))
    missing = sorted(recipe.required - set(options))
    problems = []
    if unknown:
        problems.append(f"does not accept {', '.join(unknown)}")
    if missing:
        problems.append(f"needs {', '.join(missing)}")
    if problems:
        accepted = ", ".join(sorted(recipe.options)) or "no options"
        raise ConfigError(
            f"strategy.options for {strategy.value}: {'; '.join(problems)} (accepted: {accepted})"
        )
    kwargs: dict[str, Any] = {
        option: _value(strategy, option, recipe.options[option], value)
        for option, value in options.items()
    }
    if recipe.takes_layout:
        kwargs["layout"] = model.layout
    return recipe.build(**kwargs)
