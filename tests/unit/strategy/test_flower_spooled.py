"""The Flower adapter under the whole-update contract: it reads the engine's spool files,
makes no spool or temporary directory of its own, and gives Flower's own answer."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower

from fedpriv.errors import ConfigError, RoundFailed
from fedpriv.strategy.flower import FlowerStrategy, flower_strategy
from fedpriv.strategy.protocol import WholeUpdateStrategy, announced
from fedpriv.wire import Model
from tests.unit.strategy.spooling import flower_results

WEIGHTS = [2, 5, 1, 4]


def round_models(seed: int) -> list[Model]:
    rng = np.random.default_rng(seed)
    return [
        Model.from_arrays(
            {
                "w": rng.normal(size=(5, 3)).astype(np.float32),
                "b": rng.normal(size=3).astype(np.float32),
            },
            chunk_bytes=16,
        )
        for _ in WEIGHTS
    ]


@pytest.fixture
def no_temp_dirs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the adapter made a temporary file or directory")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)


@pytest.mark.parametrize(
    "build",
    [
        lambda p: flower.FedAvg(),
        lambda p: flower.FedMedian(),
        lambda p: flower.Krum(num_malicious_clients=1),
        lambda p: flower.FedAdam(initial_parameters=p, eta=0.05, tau=1e-3),
        lambda p: flower.FedYogi(initial_parameters=p),
    ],
    ids=["FedAvg", "FedMedian", "Krum", "FedAdam", "FedYogi"],
)
def test_aggregate_updates_gives_flowers_answer_round_after_round(build, spools, no_temp_dirs):
    # Arrange: two instances of the same Flower strategy, one behind the adapter.
    base = round_models(99)[0]
    initial = ndarrays_to_parameters(list(base.arrays().values()))
    adapter = FlowerStrategy(build(initial))
    reference = build(initial)
    assert isinstance(adapter, WholeUpdateStrategy)
    assert not adapter.supports_secure_aggregation
    for round in (1, 2, 3):
        models = round_models(round)
        updates = spools.updates(models, WEIGHTS)
        # Act
        new = adapter.aggregate_updates(round, base=base, updates=updates)
        parameters, _ = reference.aggregate_fit(round, flower_results(models, WEIGHTS), [])
        # Assert
        assert new.layout == base.layout
        for got, want in zip(
            new.arrays().values(), parameters_to_ndarrays(parameters), strict=True
        ):
            np.testing.assert_array_equal(got, want.astype(got.dtype))
        base = new


def test_the_silos_identity_and_weight_reach_flower(spools):
    seen = []

    class Recording(flower.FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            seen.extend((proxy.cid, res.num_examples) for proxy, res in results)
            return super().aggregate_fit(server_round, results, failures)

    models = round_models(1)
    FlowerStrategy(Recording()).aggregate_updates(
        4, base=models[0], updates=spools.updates(models, WEIGHTS)
    )
    assert seen == [(f"silo-{i}", w) for i, w in enumerate(WEIGHTS)]


def test_configure_announces_what_configure_fit_would_add():
    assert FlowerStrategy(flower.FedAvg()).configure(1) == {}
    prox = FlowerStrategy(flower.FedProx(proximal_mu=0.3))
    assert announced(prox, 2) == {"proximal_mu": 0.3}
    fit_config = FlowerStrategy(flower.FedAvg(on_fit_config_fn=lambda r: {"epochs": r, "lr": 0.1}))
    assert fit_config.configure(3) == {"epochs": 3, "lr": 0.1}
    bad = FlowerStrategy(flower.FedAvg(on_fit_config_fn=lambda r: {"lrs": [0.1]}))
    with pytest.raises(ConfigError, match="lrs"):
        bad.configure(1)


def test_no_updates_a_foreign_layout_or_no_model_fail_the_round(spools):
    models = round_models(1)
    adapter = flower_strategy("FedAvg", model=models[0])
    with pytest.raises(RoundFailed, match="no complete update"):
        adapter.aggregate_updates(1, base=models[0], updates=[])
    other = Model.from_arrays({"w": np.zeros(2, np.float32)})
    with pytest.raises(RoundFailed, match="'silo-1'"):
        adapter.aggregate_updates(1, base=models[0], updates=spools.updates([models[0], other]))

    class Nothing(flower.FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            return None, {}

    with pytest.raises(RoundFailed, match="no model for round 5"):
        FlowerStrategy(Nothing()).aggregate_updates(
            5, base=models[0], updates=spools.updates(models, WEIGHTS)
        )
