"""Flower's own round loop, in process: ``Strategy.start`` over a Grid that calls ClientApps.

The reference a Flower app's fedpriv run is compared against. It is Flower's code
end to end (its strategy's ``start``, ``configure_train``, ``aggregate_train`` and the
app's handlers); only the transport is a function call instead of a SuperLink.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Nodes 1..N, each a ClientApp with its own Context."""

    def __init__(self, app: ClientApp, contexts: Mapping[int, Context]) -> None:
        self.app = app
        self.contexts = dict(contexts)
        self.sent = 0

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for message in messages:
            self.sent += 1
            message.metadata.__dict__["_message_id"] = f"m{self.sent}"
            node = message.metadata.dst_node_id
            replies.append(self.app(message, self.contexts[node]))
        return replies


def contexts(project: pathlib.Path, partitions: int) -> dict[int, Context]:
    run_config = dict(get_fused_config_from_dir(project, {}))
    return {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": node - 1, "num-partitions": partitions},
            state=RecordDict(),
            run_config=run_config,
        )
        for node in range(1, partitions + 1)
    }


def flower_run(
    strategy: Any,
    app: ClientApp,
    project: pathlib.Path,
    *,
    partitions: int,
    initial: list[Any],
    num_rounds: int,
    train_config: Mapping[str, Any] | None = None,
) -> list[Any]:
    """The final arrays of Flower's ``strategy.start`` over `partitions` in-process nodes."""
    for key in ("run_id", "node_id", "task_id"):
        try:
            getattr(TaskIdentity, key)
        except RuntimeError:
            setattr(TaskIdentity, key, 0)
    result = strategy.start(
        grid=InProcessGrid(app, contexts(project, partitions)),
        initial_arrays=ArrayRecord(initial),
        num_rounds=num_rounds,
        train_config=ConfigRecord(dict(train_config or {})),
    )
    return result.arrays.to_numpy_ndarrays()
