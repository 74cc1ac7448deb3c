"""The ClientApp (Flower's Message API): train and evaluate handlers."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_np import task

app = ClientApp()


def _data(context: Context):
    partition = int(context.node_config["partition-id"])
    return task.load_data(partition, int(context.node_config["num-partitions"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y = _data(context)
    new, loss = task.train(
        msg.content["arrays"].to_numpy_ndarrays(),
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
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(x)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
