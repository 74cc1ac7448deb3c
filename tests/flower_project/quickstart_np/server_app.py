"""The ServerApp (Flower's Message API): FedAvg from flwr.serverapp.strategy."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart_np import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_evaluate=float(context.run_config["fraction-evaluate"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.initial_weights()),
        num_rounds=int(context.run_config["num-server-rounds"]),
        train_config=ConfigRecord({"note": "from the ServerApp"}),
    )
    # As Flower's templates do. Under fedpriv the rounds run in the coordinator,
    # which keeps every round's model as a checkpoint, and this line is not reached.
    np.savez("final_model", *result.arrays.to_numpy_ndarrays())
