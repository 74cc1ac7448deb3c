"""Run an unmodified Flower client as a fedpriv silo.

Flower clients exchange lists of numpy arrays; fedpriv exchanges named arrays
in the global model's order. The adapter maps between the two by position, so
a Flower client sees exactly the list it would have received from Flower's
server. Both :class:`flwr.client.NumPyClient` and the lower-level
:class:`flwr.client.Client` (``NumPyClient.to_client()``) are accepted, as is a
Flower ``client_fn(context)``.

Example::

    # silo.py: the Flower quickstart's client, untouched
    from flwr.client import NumPyClient
    class FlowerClient(NumPyClient): ...
    def client_fn(context): return FlowerClient().to_client()

    # fedpriv client --flower-app silo:client_fn --config silo.toml
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.client import Client as FlowerClient
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    Context,
    EvaluateIns,
    FitIns,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common import Scalar as FlowerScalar

from fedpriv._types import Scalar
from fedpriv.client.base import EvaluateResult, FitResult
from fedpriv.errors import ConfigError

__all__ = ["FlowerClientAdapter", "flower_config", "from_client_fn", "scalars"]


def scalars(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    """Flower metrics may hold bytes or lists; fedpriv carries scalars only."""
    return {k: v for k, v in metrics.items() if isinstance(v, bool | int | float | str)}


def flower_config(config: Mapping[str, Scalar]) -> dict[str, FlowerScalar]:
    """The task's config as Flower gives it to a client: ``server_round`` is always there.

    >>> flower_config({"round": 3, "lr": 0.1})
    {'round': 3, 'lr': 0.1, 'server_round': 3}
    """
    flower: dict[str, FlowerScalar] = dict(config)
    if "round" in config:
        flower["server_round"] = config["round"]
    return flower


class FlowerClientAdapter:
    """A :class:`fedpriv.Client` backed by a Flower ``NumPyClient`` or ``Client``.

    Args:
        client: The Flower client.
    """

    def __init__(self, client: NumPyClient | FlowerClient) -> None:
        if not isinstance(client, NumPyClient | FlowerClient):
            raise ConfigError(
                f"expected a Flower NumPyClient or Client, got {type(client).__name__}"
            )
        self.client = client

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Call the Flower client's ``fit`` with the arrays in model order."""
        names = list(parameters)
        arrays = [np.asarray(parameters[name]) for name in names]
        if isinstance(self.client, NumPyClient):
            new, num_examples, metrics = self.client.fit(arrays, flower_config(config))
        else:
            reply = self.client.fit(FitIns(ndarrays_to_parameters(arrays), flower_config(config)))
            if reply.status.code != Code.OK:
                raise RuntimeError(f"Flower client fit failed: {reply.status.message}")
            new = parameters_to_ndarrays(reply.parameters)
            num_examples, metrics = reply.num_examples, reply.metrics
        if len(new) != len(names):
            raise ValueError(
                f"the Flower client returned {len(new)} arrays for a model of {len(names)}"
            )
        return FitResult(
            parameters=dict(zip(names, new, strict=True)),
            num_examples=int(num_examples),
            metrics=scalars(metrics or {}),
        )

    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Call the Flower client's ``evaluate``; its loss is reported as ``loss``."""
        arrays = [np.asarray(v) for v in parameters.values()]
        if isinstance(self.client, NumPyClient):
            loss, num_examples, metrics = self.client.evaluate(arrays, flower_config(config))
        else:
            reply = self.client.evaluate(
                EvaluateIns(ndarrays_to_parameters(arrays), flower_config(config))
            )
            if reply.status.code != Code.OK:
                raise RuntimeError(f"Flower client evaluate failed: {reply.status.message}")
            loss, num_examples, metrics = reply.loss, reply.num_examples, reply.metrics
        return EvaluateResult(
            num_examples=int(num_examples),
            metrics={"loss": float(loss), **scalars(metrics or {})},
        )


def from_client_fn(
    client_fn: Callable[[Context], NumPyClient | FlowerClient],
    *,
    node_config: Mapping[str, Scalar] | None = None,
    context: Context | None = None,
) -> FlowerClientAdapter:
    """Build the adapter from a Flower ``client_fn(context)``.

    Without `context`, the context's ``node_config`` is `node_config` (the silo's
    ``[app]`` table, Flower's ``--node-config``) and its ``run_config`` is empty;
    :func:`fedpriv.client.flower_app.load_flower_app` fills it from the app's project.
    """
    if context is None:
        context = Context(
            run_id=0,
            node_id=0,
            node_config=dict(node_config or {}),
            state=RecordDict(),
            run_config={},
        )
    return FlowerClientAdapter(client_fn(context))
