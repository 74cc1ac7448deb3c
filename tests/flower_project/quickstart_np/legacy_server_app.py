"""The same server in Flower's earlier API: ServerApp(server_fn=...) with a legacy strategy."""

from __future__ import annotations

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from quickstart_np import task


def server_fn(context: Context) -> ServerAppComponents:
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters(task.initial_weights()))
    return ServerAppComponents(
        strategy=strategy,
        config=ServerConfig(num_rounds=int(context.run_config["num-server-rounds"])),
    )


app = ServerApp(server_fn=server_fn)
