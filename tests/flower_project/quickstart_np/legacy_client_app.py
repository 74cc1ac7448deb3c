"""The same client in Flower's earlier API: a NumPyClient inside ClientApp(client_fn=...)."""

from __future__ import annotations

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from quickstart_np import task


class RegressionClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.context = context
        self.x, self.y = task.load_data(
            int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        )

    def fit(self, parameters, config):
        _ = config["server_round"]  # Flower always sends it (its sklearn example reads it)
        new, loss = task.train(
            parameters,
            self.x,
            self.y,
            lr=float(self.context.run_config["learning-rate"]),
            epochs=int(self.context.run_config["local-epochs"]),
        )
        return new, len(self.x), {"train_loss": loss}

    def evaluate(self, parameters, config):
        return task.evaluate(parameters, self.x, self.y), len(self.x), {}


def client_fn(context: Context):
    return RegressionClient(context).to_client()


app = ClientApp(client_fn=client_fn)
