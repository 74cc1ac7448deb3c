"""Flower's Message API strategies (``flwr.serverapp.strategy``) as fedpriv strategies.

A ``flwr.serverapp.strategy.Strategy`` runs a round as ``configure_train`` (the
config each node gets, and the current model, which FedAdam and the DP wrappers
keep) and then ``aggregate_train`` over the reply ``Message`` objects. fedpriv's
coordinator schedules rounds itself, so this adapter calls the two with what
Flower would pass:

- :meth:`FlowerMessageStrategy.configure` calls ``configure_train`` with the
  current global model and the ServerApp's ``train_config`` and announces the
  config it puts in the messages (``proximal-mu`` for FedProx, the clipping norm
  of the client-side DP wrappers, the ``train_config`` values);
- :meth:`FlowerMessageStrategy.aggregate_updates` calls ``configure_train`` with
  the round's base model (so a server optimiser steps from it) and then
  ``aggregate_train`` with one reply per update, read from the coordinator's
  spool: ``"arrays"`` (an ArrayRecord keyed by parameter name) and ``"metrics"``
  (``num-examples``, the update's weight).

The strategy never reaches a node: ``configure_train`` sees a Grid that lists
node ids and refuses every other call with a :class:`ConfigError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import flwr.serverapp.strategy as message_strategies
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as MessageStrategyBase
from flwr.supercore.task_identity import TaskIdentity

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.strategy.protocol import SpooledUpdate
from fedpriv.wire import Model

__all__ = ["FlowerMessageStrategy", "flower_message_strategy"]

_TTL_S = 43200.0


class _ConfigGrid(Grid):
    """The Grid ``configure_train`` sees: node ids to sample from, and nothing else.

    fedpriv's coordinator selects the round's silos and sends their tasks; Flower's
    sampling inside ``configure_train`` only shapes messages that are then unpacked
    for their config.
    """

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.nodes + 1)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(
            "a flwr.serverapp strategy called the Grid beyond get_node_ids: fedpriv's "
            "coordinator sends every task, so a strategy may only configure and aggregate"
        )

    run = property(_refuse)
    set_run = create_message = push_messages = pull_messages = send_and_receive = _refuse


def _array_record(model: Model) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in model.arrays().items()})


def _reply(silo: str, index: int, round: int, model: Model, weight: float) -> Message:
    """One update as ``aggregate_train`` receives it: a reply from node `index`."""
    metadata = Metadata(
        run_id=0,
        message_id=f"{round}-{silo}",
        src_node_id=index,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(round),
        created_at=0.0,
        ttl=_TTL_S,
        message_type="train",
    )
    content = RecordDict(
        {"arrays": _array_record(model), "metrics": MetricRecord({"num-examples": int(weight)})}
    )
    # Flower's own runtime builds replies with metadata set; the public overloads need
    # the instruction message, which fedpriv's coordinator never builds.
    message: Message = Message(content=content, metadata=metadata)  # type: ignore[call-overload]
    return message


def _play_the_server_task() -> None:
    """Give this process the task identity Flower's ServerApp process has.

    ``configure_train`` builds instruction messages, and Flower's ``Message``
    reads the sender's run and node from ``TaskIdentity``, which only Flower's
    runtime sets. The coordinator plays the ServerApp's part (run 0, node 0).
    """
    for key in ("run_id", "node_id", "task_id"):
        try:
            getattr(TaskIdentity, key)
        except RuntimeError:
            setattr(TaskIdentity, key, 0)


class FlowerMessageStrategy:
    """A fedpriv whole-update strategy that delegates to a ``flwr.serverapp`` strategy.

    Args:
        strategy: For example ``flwr.serverapp.strategy.FedAdam(...)``.
        model: The initial global model (what ``configure`` describes until a round ends).
        train_config: The ServerApp's ``train_config`` (``strategy.start(train_config=...)``).
    """

    supports_secure_aggregation: ClassVar[bool] = False

    def __init__(
        self,
        strategy: MessageStrategyBase,
        *,
        model: Model,
        train_config: Mapping[str, Scalar] | None = None,
    ) -> None:
        if not isinstance(strategy, MessageStrategyBase):
            raise ConfigError(
                f"expected a flwr.serverapp.strategy Strategy, got {type(strategy).__name__}"
            )
        _play_the_server_task()
        self.strategy = strategy
        self.current = model
        self.train_config = dict(train_config or {})

    @property
    def name(self) -> str:
        """The Flower class name."""
        return f"flower:{type(self.strategy).__name__}"

    def _grid(self) -> _ConfigGrid:
        # Enough ids that Flower's sampling never waits for nodes to connect.
        wanted = [
            int(getattr(self.strategy, key, 0) or 0)
            for key in ("min_available_nodes", "min_train_nodes")
        ]
        return _ConfigGrid(max([1, *wanted]))

    def _configure_train(self, round: int, model: Model) -> Mapping[str, Any]:
        messages = list(
            self.strategy.configure_train(
                round, _array_record(model), ConfigRecord(dict(self.train_config)), self._grid()
            )
        )
        if not messages:
            return {}
        return dict(messages[0].content.config_records.get("config", {}))

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """What ``configure_train`` puts in every node's config (``server-round`` aside).

        Raises:
            ConfigError: A value is not a plain scalar (bool, int, float, str).
        """
        config = {
            k: v
            for k, v in self._configure_train(round, self.current).items()
            if k != "server-round"
        }
        wrong = sorted(k for k, v in config.items() if not isinstance(v, str | int | float | bool))
        if wrong:
            raise ConfigError(
                f"{self.name}: configure_train gave {', '.join(wrong)} values that are not "
                "plain scalars (bool, int, float, str)"
            )
        return config

    def aggregate_updates(
        self, round: int, *, base: Model, updates: Sequence[SpooledUpdate]
    ) -> Model:
        """``aggregate_train`` over one reply per update, read from the coordinator's spool.

        Raises:
            RoundFailed: No updates, one in another layout, or the strategy returned
                no model or other arrays than the model's.
        """
        if not updates:
            raise RoundFailed(f"{self.name}: round {round} has no complete update")
        layout = base.layout
        self._configure_train(round, base)
        replies = []
        for index, update in enumerate(updates, start=1):
            if update.layout != layout:
                raise RoundFailed(
                    f"{self.name}: the update of {update.silo!r} is not in the model's layout"
                )
            payload = np.frombuffer(update.read(0, layout.payload_bytes), dtype=np.uint8)
            model = Model(layout=layout, payload=payload)
            replies.append(_reply(update.silo, index, round, model, update.weight))
        arrays, _ = self.strategy.aggregate_train(round, replies)
        if arrays is None:
            raise RoundFailed(f"{self.name} returned no model for round {round}")
        names = [spec.name for spec in layout.specs]
        if sorted(arrays.keys()) != sorted(names):
            raise RoundFailed(f"{self.name} returned arrays {sorted(arrays.keys())} for {names}")
        new = Model.from_arrays({n: arrays[n].numpy() for n in names}, layout=layout)
        self.current = new
        return new


def flower_message_strategy(
    name: str, *, model: Model, options: Mapping[str, Scalar] | None = None
) -> FlowerMessageStrategy:
    """Build ``flwr.serverapp.strategy.<name>(**options)``.

    Raises:
        ConfigError: No such strategy, a wrapper that needs a strategy object (the DP
            wrappers: build them in a ServerApp, see ``fedpriv run``), or options it
            does not accept.
    """
    cls = getattr(message_strategies, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, MessageStrategyBase)):
        raise ConfigError(
            f"strategy.flower = 'flwr.serverapp.strategy:{name}': no such strategy there"
        )
    accepted = inspect.signature(cls.__init__).parameters
    if "strategy" in accepted:
        raise ConfigError(
            f"strategy.flower = 'flwr.serverapp.strategy:{name}' wraps another strategy object, "
            "which a config file cannot give; build it in a ServerApp and run it with "
            "`fedpriv run PROJECT_DIR`"
        )
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        raise ConfigError(f"strategy.options: {name} does not accept {', '.join(unknown)}")
    try:
        return FlowerMessageStrategy(cls(**dict(options or {})), model=model)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.options for {name}: {err}") from err
