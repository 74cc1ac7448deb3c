"""A Flower app written against Flower's API alone runs unchanged as fedpriv silos.

The app (tests/flower_project, in the layout of a `flwr new` project) reads
``context.run_config`` from its pyproject.toml, ``context.node_config`` and the
round number Flower sends. Its silos run over real gRPC with mTLS, and the final
model is compared with what Flower's own ``Strategy.start`` loop produces on the
same clients (tests/flower_reference.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedpriv.client.flower_app import load_flower_app, run_config_for
from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.coordinator.settings import StrategyConfig
from fedpriv.errors import ConfigError
from tests.flower_reference import flower_run
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

PROJECT = pathlib.Path(__file__).resolve().parents[1] / "flower_project"
SILOS = ("silo-a", "silo-b", "silo-c")
ROUNDS = 3  # the app's num-server-rounds


@pytest.fixture
def app_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT))
    from quickstart_np import client_app, task

    return client_app, task


class Recording:
    """Stands between a silo and its ClientApp: records each message, then calls the app."""

    def __init__(self, app, partition: int, seen: list) -> None:
        self.app, self.partition, self.seen = app, partition, seen

    def __call__(self, message, context):
        config = dict(message.content["config"]) if "config" in message.content else {}
        self.seen.append((message.metadata.message_type, self.partition, config))
        return self.app(message, context)


def fedpriv_run(
    tmp_path, pki, task, *, app: str, strategy: StrategyConfig | None = None, seen=None
):
    """The federation as fedpriv runs it: a coordinator and three silos of `app`, over mTLS.

    With a `seen` list, each Message API silo's messages are recorded in it.
    """
    w, b = task.initial_weights()
    config = make_config(
        tmp_path, pki.root, {"w": w, "b": b}, num_rounds=ROUNDS, min_clients=len(SILOS)
    )
    if strategy is not None:
        config = dataclasses.replace(config, strategy=strategy)
    reporter = CollectingReporter()
    clients = [
        load_flower_app(app, node_config={"partition-id": i, "num-partitions": len(SILOS)})
        for i in range(len(SILOS))
    ]
    if seen is not None:
        for i, client in enumerate(clients):
            client.app = Recording(client.app, i, seen)
    with Coordinator(config, reporter=reporter) as coordinator:
        with contextlib.ExitStack() as stack:
            outcomes = [
                stack.enter_context(silo_thread(c, port=coordinator.port, tls=pki.tls(name)))
                for c, name in zip(clients, SILOS, strict=True)
            ]
            assert coordinator.wait(timeout_s=120)
            wait_silos(outcomes)
    assert [o.get("error") for o in outcomes] == [None] * len(SILOS)
    assert [s.accepted for s in reporter.completed] == [len(SILOS)] * ROUNDS
    store = Store(config.state_dir)
    try:
        final = read_checkpoint(store.last_committed().checkpoint).arrays()
    finally:
        store.close()
    return reporter, [final["w"], final["b"]]


def test_message_api_client_app_completes_three_rounds_over_mtls(tmp_path, pki, app_path):
    client_app, task = app_path
    seen = []
    reporter, final = fedpriv_run(
        tmp_path, pki, task, app="quickstart_np.client_app:app", seen=seen
    )
    # Every silo trained and evaluated in every round, and saw Flower's server-round.
    assert sorted((kind, p, c["server-round"]) for kind, p, c in seen) == sorted(
        (kind, partition, round)
        for kind in ("train", "evaluate")
        for partition in range(3)
        for round in range(1, ROUNDS + 1)
    )
    assert "eval_loss" in reporter.completed[-1].evaluation_metrics
    # The same app under Flower's own loop with Flower's FedAvg: the same model.
    expected = flower_run(
        FedAvg(),
        client_app.app,
        PROJECT,
        partitions=3,
        initial=task.initial_weights(),
        num_rounds=ROUNDS,
    )
    for got, want in zip(final, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert not np.allclose(final[0], 0.0)  # it trained


@pytest.mark.parametrize(
    "name, options",
    [("FedAvg", {}), ("FedAdam", {"eta": 0.05}), ("FedProx", {"proximal_mu": 0.1})],
)
def test_a_serverapp_strategy_gives_flowers_model(tmp_path, pki, app_path, name, options):
    client_app, task = app_path
    _, final = fedpriv_run(
        tmp_path,
        pki,
        task,
        app="quickstart_np.client_app:app",
        strategy=StrategyConfig(flower=f"flwr.serverapp.strategy:{name}", options=options),
        seen=(seen := []),
    )
    fedpriv_configs = [config for kind, _, config in seen if kind == "train"]
    strategies = {"FedAvg": FedAvg, "FedAdam": FedAdam, "FedProx": FedProx}
    reference = {}
    for kind in {name, "FedAvg"}:
        reference[kind] = flower_run(
            strategies[kind](**options if kind == name else {}),
            client_app.app,
            PROJECT,
            partitions=3,
            initial=task.initial_weights(),
            num_rounds=ROUNDS,
        )
    for got, want in zip(final, reference[name], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # What the strategy's configure_train puts in the config reaches every silo.
    assert len(fedpriv_configs) == len(SILOS) * ROUNDS
    if name == "FedProx":
        assert all(c["proximal-mu"] == 0.1 for c in fedpriv_configs)
    if name == "FedAdam":  # a server optimiser, not the mean
        assert not np.allclose(final[0], reference["FedAvg"][0], atol=1e-3)


def test_legacy_client_app_with_a_legacy_strategy_gives_flowers_model(tmp_path, pki, app_path):
    client_app, task = app_path
    _, legacy = fedpriv_run(
        tmp_path,
        pki,
        task,
        app="quickstart_np.legacy_client_app:app",
        strategy=StrategyConfig(flower="FedAvg"),
    )
    # The legacy client trains exactly as the Message API one: Flower's FedAvg over
    # the Message API app is the reference for both.
    expected = flower_run(
        FedAvg(),
        client_app.app,
        PROJECT,
        partitions=3,
        initial=task.initial_weights(),
        num_rounds=ROUNDS,
    )
    for got, want in zip(legacy, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_run_config_comes_from_the_project_with_the_silo_overrides_over_it():
    assert run_config_for(PROJECT, {}) == {
        "num-server-rounds": 3,
        "learning-rate": 0.1,
        "local-epochs": 2,
        "fraction-evaluate": 1.0,
    }
    assert run_config_for(PROJECT, {"local-epochs": 5})["local-epochs"] == 5
    with pytest.raises(ConfigError, match="local-epoch"):
        run_config_for(PROJECT, {"local-epoch": 5})
    assert run_config_for(None, {"lr": 0.5}) == {"lr": 0.5}


def test_a_wrapper_strategy_in_a_config_file_is_refused_with_the_way_out():
    from fedpriv.strategy.flower import flower_strategy
    from fedpriv.wire import Model

    model = Model.from_arrays({"w": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="fedpriv run"):
        flower_strategy(
            "flwr.serverapp.strategy:DifferentialPrivacyServerSideFixedClipping", model=model
        )
    with pytest.raises(ConfigError, match="no such strategy"):
        flower_strategy("flwr.serverapp.strategy:FedNothing", model=model)
    with pytest.raises(ConfigError, match="expected a class of"):
        flower_strategy("mypackage.strategies:FedAvg", model=model)
