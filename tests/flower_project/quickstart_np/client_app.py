"""The ClientApp (Flower's Message API): train and evaluate handlers."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_np import task

app = ClientApp()

# What each handler saw, for the tests to check (a real app would not keep this).
SEEN: list[tuple[str, int, int]] = []
TRAIN_CONFIGS: list[dict] = []


def _data(context: Context):
    return task.load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y = _data(context)
    weights = msg.content["arrays"].to_numpy_ndarrays()
    server_round = int(msg.content["config"]["server-round"])
    TRAIN_CONFIGS.append(dict(msg.content["config"]))
    SEEN.append(("train", int(context.node_config["partition-id"]), server_round))
    new, loss = task.train(
        weights,
        x,
        y,
        lr=float(context.run_config["learning-rate"]),
        epochs=int(context.run_config["local-epochs"]),
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(x)})
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    x, y = _data(context)
    loss = task.evaluate(msg.content["arrays"].to_numpy_ndarrays(), x, y)
    SEEN.append(
        (
            "evaluate",
            int(context.node_config["partition-id"]),
            int(msg.content["config"]["server-round"]),
        )
    )
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(x)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
