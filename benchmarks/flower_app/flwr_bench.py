"""The vs_flower workload for Flower: FedAvg over clients that return the model plus a perturbation.

Runs under Flower's Deployment Engine (SuperLink, SuperNodes, ServerApp as
separate processes). The ServerApp writes when each round's fit started and
when its aggregate was ready to the file named by the run config's ``timings``.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg


def model_arrays(params: int, pieces: int = 4) -> list[np.ndarray]:
    size = params // pieces
    arrays = [np.zeros(size, np.float32) for _ in range(pieces)]
    if params - size * pieces:
        arrays.append(np.zeros(params - size * pieces, np.float32))
    return arrays


class PerturbClient(NumPyClient):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters, config):
        step = np.float32(self.rng.uniform(-1e-3, 1e-3))
        # In place where writable, as fedpriv's benchmark client does.
        out = []
        for p in parameters:
            if p.flags.writeable:
                np.add(p, step, out=p)
                out.append(p)
            else:
                out.append(p + step)
        return out, 100, {}


def client_fn(context: Context):
    return PerturbClient(int(context.node_id) % 2**32).to_client()


client_app = ClientApp(client_fn=client_fn)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's fit starts and when its aggregate is ready."""

    def __init__(self, timings: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timings = timings
        self.starts: list[float] = []
        self.ends: list[float] = []

    def configure_fit(self, server_round, parameters, client_manager):
        self.starts.append(time.monotonic())
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.ends.append(time.monotonic())
        with open(self.timings, "w") as handle:
            json.dump(
                {"starts": self.starts, "ends": self.ends, "failures": [str(f) for f in failures]},
                handle,
            )
        return aggregated


def server_fn(context: Context) -> ServerAppComponents:
    config = context.run_config
    clients = int(config["clients"])
    strategy = TimedFedAvg(
        timings=str(config["timings"]),
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(model_arrays(int(config["params"]))),
    )
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=int(config["num-rounds"]))
    )


server_app = ServerApp(server_fn=server_fn)
