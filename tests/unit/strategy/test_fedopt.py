"""FedAdam, FedYogi and FedAdagrad step exactly as Flower's strategies of the same name."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower

from fedpriv.errors import ConfigError
from fedpriv.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi
from fedpriv.strategy.protocol import Strategy
from fedpriv.wire import Model
from tests.unit.strategy.spooling import flower_results, update_sum

ROUNDS = 5
WEIGHTS = [3, 1, 5]

PAIRS = [
    (FedAdam, flower.FedAdam, {}),
    (FedYogi, flower.FedYogi, {}),
    (FedAdagrad, flower.FedAdagrad, {}),
    (FedAdam, flower.FedAdam, {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-3}),
    (FedYogi, flower.FedYogi, {"eta": 0.3, "beta_1": 0.0, "beta_2": 0.5, "tau": 1e-6}),
    (FedAdagrad, flower.FedAdagrad, {"eta": 0.02, "tau": 1e-2}),
]


def initial(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": rng.normal(size=(6, 5)).astype(dtype),
        "b": rng.normal(size=5).astype(dtype),
    }


def silo_models(base: Model, round: int) -> list[Model]:
    """Silos' models after local training: the base plus a drift of its own per silo."""
    rng = np.random.default_rng(100 + round)
    return [
        Model.from_arrays(
            {
                name: (values + rng.normal(scale=0.1 * (i + 1), size=values.shape)).astype(
                    values.dtype
                )
                for name, values in base.arrays().items()
            },
            layout=base.layout,
        )
        for i in range(len(WEIGHTS))
    ]


@pytest.mark.parametrize(("ours", "theirs", "options"), PAIRS)
@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-10), (np.float32, 1e-6)])
def test_server_optimiser_matches_flower_round_by_round(ours, theirs, options, dtype, rtol):
    # Arrange
    base = Model.from_arrays(initial(dtype))
    strategy = ours(**options)
    reference = theirs(
        initial_parameters=ndarrays_to_parameters(list(base.arrays().values())), **options
    )
    assert isinstance(strategy, Strategy)
    assert strategy.supports_secure_aggregation
    assert strategy.configure(1) == {}
    for round in range(1, ROUNDS + 1):
        models = silo_models(base, round)
        # Act
        new = strategy.aggregate(round, base=base, total=update_sum(models, WEIGHTS))
        parameters, _ = reference.aggregate_fit(round, flower_results(models, WEIGHTS), [])
        # Assert
        expected = parameters_to_ndarrays(parameters)
        for got, want in zip(new.arrays().values(), expected, strict=True):
            assert got.dtype == dtype
            # Relative to the tensor's scale: Flower computes partly in float32, so an
            # element near zero can differ by float32 rounding of its neighbours' size.
            assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want))
        # The optimiser really moved away from FedAvg's mean (its state is in play).
        mean = FedAvg().aggregate(round, base=base, total=update_sum(models, WEIGHTS))
        assert not np.allclose(new.arrays()["w"], mean.arrays()["w"], rtol=1e-3)
        base = new


def test_defaults_are_flowers():
    for ours, theirs in ((FedAdam, flower.FedAdam), (FedYogi, flower.FedYogi)):
        mine = ours()
        reference = theirs(initial_parameters=ndarrays_to_parameters([np.zeros(1)]))
        assert (mine.eta, mine.eta_l, mine.beta_1, mine.beta_2, mine.tau) == (
            reference.eta,
            reference.eta_l,
            reference.beta_1,
            reference.beta_2,
            reference.tau,
        )
    mine = FedAdagrad()
    reference = flower.FedAdagrad(initial_parameters=ndarrays_to_parameters([np.zeros(1)]))
    assert (mine.eta, mine.eta_l, mine.tau, mine.beta_1) == (
        reference.eta,
        reference.eta_l,
        reference.tau,
        reference.beta_1,
    )


def test_moments_keep_the_models_precision_and_integer_tensors_take_the_mean():
    arrays = {
        "w": np.zeros(4, np.float32),
        "d": np.zeros(3, np.float64),
        "steps": np.array(10, np.int64),
    }
    base = Model.from_arrays(arrays)
    strategy = FedAdam(layout=base.layout)  # allocated now, not in round 1
    assert [None if m is None else m.dtype for m in strategy._m] == [
        np.float32,
        np.float64,
        None,
    ]
    models = [
        Model.from_arrays(
            {"w": np.full(4, v, np.float32), "d": np.full(3, v), "steps": np.array(s, np.int64)}
        )
        for v, s in ((1.0, 20), (3.0, 31))
    ]
    new = strategy.aggregate(1, base=base, total=update_sum(models, [1, 1])).arrays()
    assert int(new["steps"]) == 26  # rint of 25.5 (round half to even)
    assert new["w"].dtype == np.float32 and new["d"].dtype == np.float64
    # delta = 2: m = 0.1 * 2, v = 0.01 * 4; Flower's bias correction counts round + 1.
    eta_t = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(new["d"], eta_t * 0.2 / (0.2 + 1e-9), rtol=1e-12)
    np.testing.assert_allclose(new["w"], eta_t * 0.2 / (0.2 + 1e-9), rtol=1e-6)


def test_a_layout_change_between_rounds_is_refused():
    first = Model.from_arrays({"w": np.zeros(4, np.float32)})
    other = Model.from_arrays({"w": np.zeros(5, np.float32)})
    strategy = FedYogi()
    strategy.aggregate(1, base=first, total=update_sum([first], [1]))
    with pytest.raises(ValueError, match="layout changed"):
        strategy.aggregate(2, base=other, total=update_sum([other], [1]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eta": -0.1}, "eta = -0.1"),
        ({"eta": 0.0}, "never change"),
        ({"beta_1": 1.0}, r"beta_1 = 1.0: must be in \[0.0, 1.0\)"),
        ({"beta_2": -0.5}, "beta_2"),
        ({"tau": float("nan")}, "tau = nan"),
        ({"eta_l": float("inf")}, "eta_l = inf"),
    ],
)
def test_out_of_range_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        FedAdam(**options)
