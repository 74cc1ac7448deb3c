"""An exception in a silo's own fit fails that task only: the round goes on, the silo stays up.

Real gRPC over mTLS, three silo threads: a native client, a Flower NumPyClient
and a DP-accounted client each raise in one round. The coordinator's round
record (the store's participants) names each error, and the private silo's
message, which quotes a record, never leaves it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from fedpriv.client.flower import FlowerClientAdapter
from fedpriv.coordinator import Coordinator, Store
from tests.apps import AccountedClient
from tests.conftest import ArrayClient
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

ARRAYS = {"w": np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32)}


class FailingNative(ArrayClient):
    """A native fedpriv client whose fit raises in round 1."""

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        if config["round"] == 1:
            raise ValueError("no batches: the data loader is empty")
        return super().fit(parameters, config=config)


class FailingFlower(NumPyClient):
    """A Flower client whose fit raises in round 2 (Flower's server_round)."""

    def fit(self, parameters, config):
        if config["server_round"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return [p + np.float32(1.0) for p in parameters], 10, {}

    def evaluate(self, parameters, config):
        return 0.0, 5, {}


class FailingPrivate(AccountedClient):
    """Declares a DP mechanism; its fit raises in round 3 with a message that quotes data."""

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> Any:
        if config["round"] == 3:
            raise KeyError("bad value 37.2 in row 'patient-118'")
        return super().fit(parameters, config=config)


def test_a_raising_fit_fails_its_task_and_the_silo_takes_the_next(tmp_path, pki):
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=3, min_clients=3, min_results=2)
    reporter = CollectingReporter()
    clients = {
        "silo-a": FailingNative(delta=1.0),
        "silo-b": FlowerClientAdapter(FailingFlower()),
        "silo-c": FailingPrivate(1.0),
    }
    with Coordinator(config, reporter=reporter) as coordinator:
        with contextlib.ExitStack() as stack:
            outcomes = [
                stack.enter_context(silo_thread(client, port=coordinator.port, tls=pki.tls(name)))
                for name, client in clients.items()
            ]
            assert coordinator.wait(timeout_s=120)
            stats = wait_silos(outcomes)
    # Every round completed with the two silos that did not raise.
    assert [s.round for s in reporter.completed] == [1, 2, 3]
    assert [s.accepted for s in reporter.completed] == [2, 2, 2]
    assert not reporter.failed
    # No silo died: each ran to the end of the federation and trained in the other rounds.
    assert [o.get("error") for o in outcomes] == [None, None, None]
    assert [s.trained for s in stats] == [2, 2, 2]

    store = Store(config.state_dir)
    try:
        declined = {
            round: [
                (silo, detail)
                for task, silo, outcome, detail in store.participants(round)
                if task == "train" and outcome == "declined"
            ]
            for round in (1, 2, 3)
        }
    finally:
        store.close()
    assert declined[1] == [
        ("silo-a", "fit raised ValueError: no batches: the data loader is empty")
    ]
    assert declined[2] == [("silo-b", "fit raised RuntimeError: CUDA out of memory (simulated)")]
    # The private silo's reason names the exception's type only: its message quotes a record.
    [(silo, detail)] = declined[3]
    assert silo == "silo-c"
    assert detail.startswith("fit raised KeyError (message withheld")
    assert "patient-118" not in detail and "37.2" not in detail
