"""Flower compatibility with real Flower objects: NumPyClients as silos, Flower strategies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.client import NumPyClient
from flwr.server.strategy import FedAdam, FedAvg, Krum

from fedpriv.client.flower import FlowerClientAdapter, from_client_fn
from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.errors import ConfigError
from fedpriv.strategy.flower import FlowerStrategy, flower_strategy
from fedpriv.wire import Model
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos


class QuickstartClient(NumPyClient):
    """Shaped like the Flower quickstart's client: lists of arrays in, lists out."""

    def __init__(self, step: float) -> None:
        self.step = step

    def get_parameters(self, config):
        return []

    def fit(self, parameters, config):
        return [p + np.float32(self.step) for p in parameters], 10, {"train_loss": self.step}

    def evaluate(self, parameters, config):
        return float(np.mean(parameters[0])), 5, {"accuracy": 0.5}


ARRAYS = {"w": np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32)}


def federation(
    tmp_path,
    pki,
    *,
    strategy=None,
    clients=(1.0, 3.0),
    rounds=2,
    make_client=QuickstartClient,
    **config_kwargs,
):
    config = make_config(tmp_path, pki.root, ARRAYS, num_rounds=rounds, min_clients=len(clients))
    config = dataclasses.replace(config, **config_kwargs)
    reporter = CollectingReporter()
    names = ["silo-a", "silo-b", "silo-c"][: len(clients)]
    with Coordinator(config, strategy=strategy, reporter=reporter) as coordinator:
        import contextlib

        with contextlib.ExitStack() as stack:
            outcomes = [
                stack.enter_context(
                    silo_thread(
                        FlowerClientAdapter(
                            make_client(step).to_client() if i % 2 else make_client(step)
                        ),
                        port=coordinator.port,
                        tls=pki.tls(name),
                    )
                )
                for i, (step, name) in enumerate(zip(clients, names, strict=True))
            ]
            assert coordinator.wait(timeout_s=60)
            wait_silos(outcomes)
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    return reporter, read_checkpoint(committed.checkpoint).arrays()


def test_unmodified_numpy_clients_complete_a_fedpriv_federation(tmp_path, pki):
    # Both Flower client styles: NumPyClient and NumPyClient.to_client()
    reporter, final = federation(tmp_path, pki)
    assert [s.accepted for s in reporter.completed] == [2, 2]
    np.testing.assert_allclose(final["w"], 4.0)  # two rounds of the mean step (1 + 3) / 2
    assert reporter.completed[0].evaluation_metrics["accuracy"] == pytest.approx(0.5)
    assert reporter.completed[0].fit_metrics["train_loss"] == pytest.approx(2.0)


class SklearnStyleClient(QuickstartClient):
    """Reads ``config["server_round"]``, as Flower's sklearn example does; records what it saw."""

    seen: list[tuple[str, int]] = []

    def fit(self, parameters, config):
        SklearnStyleClient.seen.append(("fit", config["server_round"]))
        return super().fit(parameters, config)

    def evaluate(self, parameters, config):
        SklearnStyleClient.seen.append(("evaluate", config["server_round"]))
        return super().evaluate(parameters, config)


def test_a_flower_client_reads_server_round_in_fit_and_evaluate(tmp_path, pki):
    SklearnStyleClient.seen = []
    reporter, final = federation(tmp_path, pki, make_client=SklearnStyleClient)
    assert [s.accepted for s in reporter.completed] == [2, 2]
    np.testing.assert_allclose(final["w"], 4.0)
    # Two silos, two rounds: each fit and each evaluation saw its round's number.
    assert sorted(SklearnStyleClient.seen) == sorted(
        [(kind, round) for round in (1, 2) for kind in ("fit", "evaluate") for _ in range(2)]
    )


def test_flower_fedadam_runs_as_the_fedpriv_strategy(tmp_path, pki):
    model = Model.from_arrays(ARRAYS)
    strategy = flower_strategy("FedAdam", model=model, options={"eta": 0.1, "tau": 1e-3})
    assert isinstance(strategy.strategy, FedAdam)
    reporter, final = federation(tmp_path, pki, strategy=strategy)
    assert [s.accepted for s in reporter.completed] == [2, 2]
    # The same two rounds through Flower's FedAdam directly, for the expected model
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    reference = FedAdam(
        initial_parameters=ndarrays_to_parameters(list(ARRAYS.values())), eta=0.1, tau=1e-3
    )
    current = list(ARRAYS.values())
    for round in (1, 2):
        results = [
            (
                None,
                FitRes(
                    Status(Code.OK, ""),
                    ndarrays_to_parameters([a + np.float32(s) for a in current]),
                    10,
                    {},
                ),
            )
            for s in (1.0, 3.0)
        ]
        current = parameters_to_ndarrays(reference.aggregate_fit(round, results, [])[0])
    np.testing.assert_allclose(final["w"], current[0], rtol=1e-5)
    assert not np.allclose(final["w"], 4.0)  # FedAdam, not FedAvg


def test_robust_flower_strategies_aggregate_whole_updates(tmp_path, pki):
    # FedTrimmedAvg cuts the extremes: with steps 1, 2 and 100, trimming 1/3 leaves 2
    model = Model.from_arrays(ARRAYS)
    strategy = flower_strategy("FedTrimmedAvg", model=model, options={"beta": 0.34})
    _, final = federation(tmp_path, pki, strategy=strategy, clients=(1.0, 2.0, 100.0), rounds=1)
    np.testing.assert_allclose(final["w"], 2.0)
    krum = flower_strategy("Krum", model=model, options={"num_malicious_clients": 0})
    assert isinstance(krum, FlowerStrategy) and isinstance(krum.strategy, Krum)


def test_flower_strategy_settings_are_checked(tmp_path, pki):
    model = Model.from_arrays(ARRAYS)
    with pytest.raises(ConfigError, match="no such strategy"):
        flower_strategy("FedMagic", model=model)
    with pytest.raises(ConfigError, match="FedAvg does not accept eta"):
        flower_strategy("FedAvg", model=model, options={"eta": 0.1})
    assert isinstance(flower_strategy("FedAvg", model=model).strategy, FedAvg)


def test_client_fn_gets_the_silo_app_table_as_node_config():
    seen = {}

    def client_fn(context):
        seen.update(context.node_config)
        return QuickstartClient(1.0).to_client()

    adapter = from_client_fn(client_fn, node_config={"partition-id": 2})
    assert seen == {"partition-id": 2}
    result = adapter.fit({"w": np.zeros(2, np.float32)}, config={})
    np.testing.assert_allclose(result.parameters["w"], 1.0)
    assert result.num_examples == 10


def test_fedpriv_client_runs_a_flower_client_fn_as_a_process(tmp_path, pki):
    import subprocess
    import sys

    from tests.integration.test_processes import ROOT

    config = make_config(
        tmp_path, pki.root, ARRAYS, num_rounds=1, min_clients=1, federated_evaluation=False
    )
    with Coordinator(config) as coordinator:
        (tmp_path / "silo.toml").write_text(
            f'[coordinator]\naddress = "127.0.0.1:{coordinator.port}"\n'
            f'[tls]\nca = "{pki.root / "ca.crt"}"\ncert = "{pki.root / "silo-a.crt"}"\n'
            f'key = "{pki.root / "silo-a.key"}"\n[app]\nstep = 2.5\n'
        )
        silo = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpriv",
                "client",
                "--flower-app",
                "tests.apps:flower_client_fn",
                "--config",
                str(tmp_path / "silo.toml"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert coordinator.wait(timeout_s=30)
    assert silo.returncode == 0, silo.stderr
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    np.testing.assert_allclose(read_checkpoint(committed.checkpoint).arrays()["w"], 2.5)
