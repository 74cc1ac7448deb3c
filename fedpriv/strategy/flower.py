"""Flower strategies (FedAdam, FedProx, FedTrimmedAvg, Krum, ...) as fedpriv strategies.

Flower's ``Strategy.aggregate_fit`` needs every update of a round at once, so
this adapter is a whole-update strategy: :meth:`FlowerStrategy.aggregate_updates`
reads the complete, validated updates from the coordinator's own spool files
(no second copy, no temporary directory) and hands them to the Flower strategy
as ``FitRes`` objects. Memory is then what the Flower strategy itself needs.

Only ``aggregate_fit`` is used. fedpriv's coordinator does the scheduling, so
``configure_fit`` is never called; :meth:`FlowerStrategy.configure` announces
what it would have added (``on_fit_config_fn``'s values, FedProx's
``proximal_mu``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flwr.server.strategy as flower_strategies
import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as FlowerStrategyBase

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.strategy.flower_message import FlowerMessageStrategy, flower_message_strategy
from fedpriv.strategy.protocol import SpooledUpdate
from fedpriv.wire import Model, TensorLayout

__all__ = ["LEGACY_MODULE", "MESSAGE_API_MODULE", "FlowerStrategy", "flower_strategy"]

LEGACY_MODULE = "flwr.server.strategy"
MESSAGE_API_MODULE = "flwr.serverapp.strategy"


class _Proxy(ClientProxy):
    """Names a silo in ``aggregate_fit``'s results (``cid`` is the silo's identity).

    A fedpriv silo is only reachable through the coordinator's own rounds, so a
    strategy that tries to call a client from ``aggregate_fit`` is refused.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"silo {self.cid!r} cannot be called from a strategy: fedpriv's coordinator "
            "schedules every task; put per-round settings in rounds.client_config"
        )

    get_properties = get_parameters = fit = evaluate = reconnect = _refuse


def _fit_result(silo: str, model: Model, *, weight: float) -> tuple[ClientProxy, FitRes]:
    """One update as ``aggregate_fit`` receives it."""
    return (
        _Proxy(silo),
        FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(list(model.arrays().values())),
            num_examples=int(weight),
            metrics={},
        ),
    )


def _aggregate_fit(
    strategy: FlowerStrategyBase,
    round: int,
    layout: TensorLayout,
    results: list[tuple[ClientProxy, FitRes]],
) -> Model:
    """Call ``aggregate_fit`` and lay its answer out in `layout`.

    Raises:
        RoundFailed: The strategy returned no model, or another number of arrays.
    """
    parameters, _ = strategy.aggregate_fit(round, results, [])
    if parameters is None:
        raise RoundFailed(f"the Flower strategy returned no model for round {round}")
    new = parameters_to_ndarrays(parameters)
    names = [spec.name for spec in layout.specs]
    if len(new) != len(names):
        raise RoundFailed(f"the Flower strategy returned {len(new)} arrays for {len(names)}")
    return Model.from_arrays(dict(zip(names, new, strict=True)), layout=layout)


class FlowerStrategy:
    """A fedpriv strategy that delegates to a Flower strategy.

    A :class:`~fedpriv.strategy.protocol.WholeUpdateStrategy`: a Flower strategy
    sees every update on its own, so it refuses secure aggregation. It keeps its
    own state (FedAdam's moments) across rounds.

    Args:
        strategy: A Flower strategy instance, e.g. ``flwr.server.strategy.FedAdam(...)``.
    """

    supports_secure_aggregation: ClassVar[bool] = False

    def __init__(self, strategy: FlowerStrategyBase) -> None:
        if not isinstance(strategy, FlowerStrategyBase):
            raise ConfigError(f"expected a Flower Strategy, got {type(strategy).__name__}")
        self.strategy = strategy

    @property
    def name(self) -> str:
        """The Flower class name."""
        return f"flower:{type(self.strategy).__name__}"

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """What Flower's ``configure_fit`` would add to the task config.

        That is ``on_fit_config_fn(round)`` and, for FedProx, ``proximal_mu``.

        Raises:
            ConfigError: ``on_fit_config_fn`` returned something other than plain scalars.
        """
        config: dict[str, Scalar] = {}
        on_fit_config_fn = getattr(self.strategy, "on_fit_config_fn", None)
        if on_fit_config_fn is not None:
            config.update(on_fit_config_fn(round))
        if isinstance(self.strategy, flower_strategies.FedProx):
            config["proximal_mu"] = float(self.strategy.proximal_mu)
        wrong = sorted(k for k, v in config.items() if not isinstance(v, str | int | float | bool))
        if wrong:
            raise ConfigError(
                f"{self.name}: on_fit_config_fn gave {', '.join(wrong)} values that are not "
                "plain scalars (bool, int, float, str)"
            )
        return config

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """Hand every update to ``aggregate_fit``, read from the coordinator's spool.

        Each update is read into memory once, as Flower's strategies need them all
        at once; the strategy keeps its own state (FedAdam's moments) across rounds.

        Raises:
            RoundFailed: No updates, one in another layout, or the strategy returned
                no model or another number of arrays.
        """
        if not updates:
            raise RoundFailed(f"{self.name}: round {round} has no complete update")
        layout = base.layout
        results = []
        for update in updates:
            if update.layout != layout:
                raise RoundFailed(
                    f"{self.name}: the update of {update.silo!r} is not in the model's layout"
                )
            payload = np.frombuffer(update.read(0, layout.payload_bytes), dtype=np.uint8)
            results.append(
                _fit_result(
                    update.silo, Model(layout=layout, payload=payload), weight=update.weight
                )
            )
        return _aggregate_fit(self.strategy, round, layout, results)


def flower_strategy(
    name: str, *, model: Model, options: Mapping[str, Scalar] | None = None
) -> FlowerStrategy | FlowerMessageStrategy:
    """Build ``flwr.server.strategy.<name>(**options)``, or the Message API's.

    `name` is a class in ``flwr.server.strategy`` (``"FedAdam"``, or
    ``"flwr.server.strategy:FedAdam"``) or in ``flwr.serverapp.strategy``
    (``"flwr.serverapp.strategy:FedAdam"``; see :mod:`fedpriv.strategy.flower_message`).
    Strategies that take ``initial_parameters`` (FedAdam, FedYogi, ...) get the
    global model; the scheduling arguments (``min_fit_clients`` ...) are left at
    Flower's defaults, as fedpriv's coordinator schedules rounds itself.

    Raises:
        ConfigError: No such strategy, or options it does not accept.
    """
    module, colon, attribute = name.rpartition(":")
    if colon:
        if module == MESSAGE_API_MODULE:
            return flower_message_strategy(attribute, model=model, options=options)
        if module != LEGACY_MODULE:
            raise ConfigError(
                f"strategy.flower = {name!r}: expected a class of {LEGACY_MODULE} or "
                f"{MESSAGE_API_MODULE} ('{MESSAGE_API_MODULE}:FedAdam')"
            )
        name = attribute
    cls = getattr(flower_strategies, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, FlowerStrategyBase)):
        raise ConfigError(f"strategy.flower = {name!r}: flwr.server.strategy has no such strategy")
    kwargs: dict[str, Any] = dict(options or {})
    accepted = inspect.signature(cls.__init__).parameters
    if "initial_parameters" in accepted and "initial_parameters" not in kwargs:
        kwargs["initial_parameters"] = ndarrays_to_parameters(list(model.arrays().values()))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"strategy.options: {name} does not accept {', '.join(unknown)}")
    try:
        return FlowerStrategy(cls(**kwargs))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.options for {name}: {err}") from err
