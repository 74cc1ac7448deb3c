"""What a Flower ``ServerApp`` asks for: its strategy, rounds and initial model, without running it.

fedpriv's coordinator schedules rounds itself, so a ServerApp is not run as
Flower runs it. It is called once with a Grid that serves no node, while
``Strategy.start`` (the Message API) and ``start_grid`` (the legacy
``ServerApp(server_fn=...)``) are replaced by a recorder that stops the app as
soon as it hands over its rounds. What it handed over becomes the federation:

- Message API: ``strategy.start(grid, initial_arrays, num_rounds, train_config=...)``;
- legacy: ``ServerAppComponents(strategy=..., config=ServerConfig(num_rounds=...))``,
  with the model from the strategy's ``initial_parameters``.

A main that drives the Grid itself (``grid.send_and_receive`` in a loop, say)
cannot be scheduled by fedpriv and gets a :class:`ConfigError` naming the call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import flwr.serverapp.server_app as server_app_module
import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy as MessageStrategy

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError

__all__ = ["ServerPlan", "plan_server_app"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerPlan:
    """The federation a ServerApp asked for.

    Args:
        strategy: A ``flwr.serverapp.strategy`` or ``flwr.server.strategy`` strategy.
        num_rounds: Rounds to run.
        initial: The initial model, by parameter name.
        train_config: The Message API's ``train_config`` (announced every round).
    """

    strategy: MessageStrategy | LegacyStrategy
    num_rounds: int
    initial: Mapping[str, npt.NDArray[Any]]
    train_config: Mapping[str, Scalar] = field(default_factory=dict)


class _Handed(Exception):
    """Unwinds the ServerApp once it has handed over its rounds."""

    def __init__(self, plan: ServerPlan) -> None:
        super().__init__("handed over")
        self.plan = plan


class _NoNodesGrid(Grid):
    """The Grid a planned ServerApp sees: any use of it is a main fedpriv cannot schedule."""

    def _refuse(self, name: str) -> Any:
        raise ConfigError(
            f"the ServerApp's main calls grid.{name}() itself; fedpriv schedules the rounds, "
            "so it runs a main that hands them to strategy.start(grid=grid, initial_arrays=..., "
            "num_rounds=...) (or a ServerApp(server_fn=...)); move the loop into a strategy"
        )

    @property
    def run(self) -> Any:
        return self._refuse("run")

    def set_run(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("set_run")

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("create_message")

    def get_node_ids(self) -> Any:
        return self._refuse("get_node_ids")

    def push_messages(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("push_messages")

    def pull_messages(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("pull_messages")

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("send_and_receive")


def _scalars(record: ConfigRecord | None, what: str) -> dict[str, Scalar]:
    values: dict[str, Scalar] = {}
    for key, value in dict(record or {}).items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"{what}: {key} is not a plain scalar (bool, int, float, str)")
        values[key] = value
    return values


def _message_start(
    strategy: MessageStrategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int = 3,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Any = None,
) -> Any:
    if evaluate_config:
        logger.warning(
            "the ServerApp's evaluate_config is not sent: fedpriv's evaluation tasks carry "
            "the round's config"
        )
    if evaluate_fn is not None:
        logger.warning(
            "the ServerApp's evaluate_fn is not run: fedpriv evaluates on the silos; evaluate "
            "the checkpoints in the state directory centrally"
        )
    initial = {k: np.asarray(v.numpy()) for k, v in initial_arrays.items()}
    raise _Handed(
        ServerPlan(
            strategy=strategy,
            num_rounds=int(num_rounds),
            initial=initial,
            train_config=_scalars(train_config, "strategy.start(train_config=...)"),
        )
    )


def _legacy_start(
    *,
    grid: Grid,
    server: Any = None,
    config: Any = None,
    strategy: LegacyStrategy | None = None,
    client_manager: Any = None,
) -> Any:
    if server is not None or client_manager is not None:
        part = "server" if server is not None else "client_manager"
        raise ConfigError(
            f"the ServerApp gives a custom {part}; fedpriv's coordinator is the server and "
            "selects the silos itself, so give only strategy and config"
        )
    strategy = strategy if strategy is not None else LegacyFedAvg()
    parameters = getattr(strategy, "initial_parameters", None)
    if parameters is None:
        raise ConfigError(
            f"the ServerApp's {type(strategy).__name__} has no initial_parameters; fedpriv "
            "takes the initial model from the server, not from a silo: pass "
            "initial_parameters=ndarrays_to_parameters(...)"
        )
    arrays = parameters_to_ndarrays(parameters)
    num_rounds = int(getattr(config, "num_rounds", 1))
    raise _Handed(
        ServerPlan(
            strategy=strategy,
            num_rounds=num_rounds,
            initial={str(i): np.asarray(a) for i, a in enumerate(arrays)},
        )
    )


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    with (
        mock.patch.object(MessageStrategy, "start", _message_start),
        mock.patch.object(server_app_module, "start_grid", _legacy_start),
    ):
        yield


def plan_server_app(app: ServerApp, context: Context) -> ServerPlan:
    """Call `app` until it hands over its rounds; what it asked for.

    Raises:
        ConfigError: `app` is not a ServerApp, drives the Grid itself, returns
            without handing over rounds, or gives what fedpriv cannot run.
    """
    if not isinstance(app, ServerApp):
        raise ConfigError(f"serverapp: expected a flwr ServerApp, got {type(app).__name__}")
    try:
        with _recording():
            app(_NoNodesGrid(), context)
    except _Handed as handed:
        return handed.plan
    raise ConfigError(
        "the ServerApp returned without starting a strategy: fedpriv runs a main that calls "
        "strategy.start(...) or a ServerApp(server_fn=...)"
    )
