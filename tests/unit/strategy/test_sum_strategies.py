"""FedAvg and FedProx under the sum contract: the mean of the round's sum, and what they announce."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.errors import ConfigError
from fedpriv.strategy import FedAvg, FedProx, UpdateSum
from fedpriv.strategy.protocol import Strategy, announced
from fedpriv.wire import Model
from tests.unit.strategy.spooling import update_sum


def models() -> list[Model]:
    return [
        Model.from_arrays(
            {
                "w": np.full((3, 2), v, np.float32),
                "h": np.full(4, v, np.float16),
                "n": np.array(int(v) * 10, np.int64),
            }
        )
        for v in (1.0, 2.0, 7.0)
    ]


@pytest.mark.parametrize(
    "strategy", [FedAvg(), FedProx(proximal_mu=0.5)], ids=["fedavg", "fedprox"]
)
def test_the_next_model_is_the_weighted_mean_of_the_sum(strategy):
    updates = models()
    new = strategy.aggregate(1, base=updates[0], total=update_sum(updates, [1, 2, 1]))
    arrays = new.arrays()
    np.testing.assert_allclose(arrays["w"], 3.0)  # (1 + 4 + 7) / 4
    np.testing.assert_allclose(arrays["h"], 3.0)
    assert arrays["h"].dtype == np.float16
    assert int(arrays["n"]) == 30
    assert isinstance(strategy, Strategy)
    assert strategy.supports_secure_aggregation


def test_fedavg_averages_in_the_sums_own_payload():
    base = Model.from_arrays({"w": np.zeros(4, np.float32)})
    payload = np.zeros(base.layout.payload_bytes, np.uint8)
    sums = [np.frombuffer(payload, np.float32, count=4)]
    sums[0][...] = [2.0, 4.0, 6.0, 8.0]
    total = UpdateSum(layout=base.layout, sums=sums, weight=2.0, contributors=2, payload=payload)
    new = FedAvg().aggregate(3, base=base, total=total)
    assert new.payload is payload  # no second model-sized buffer
    assert new.arrays()["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_fedavg_still_streams_for_the_current_engine():
    base = Model.from_arrays({"w": np.zeros(2, np.float32)})
    aggregator = FedAvg().begin_round(1, model=base)
    for offset, chunk in Model.from_arrays({"w": np.full(2, 4.0, np.float32)}).chunks():
        aggregator.fold(offset, chunk, weight=2.0)
    assert aggregator.finalize(total_weight=2.0).arrays()["w"].tolist() == [4.0, 4.0]


def test_fedavg_announces_nothing_and_fedprox_its_mu_every_round():
    assert announced(FedAvg(), 1) == {}
    strategy = FedProx(proximal_mu=0.01)
    assert strategy.name == "fedprox"
    assert [announced(strategy, r) for r in (1, 7)] == [{"proximal_mu": 0.01}] * 2
    assert FedProx(proximal_mu=0).configure(1) == {"proximal_mu": 0.0}


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf")])
def test_fedprox_refuses_a_negative_or_non_finite_mu(mu):
    with pytest.raises(ConfigError, match="proximal_mu"):
        FedProx(proximal_mu=mu)


def test_mean_delta_is_one_tensor_of_mean_deltas_and_keeps_the_sum():
    updates = models()
    base = updates[0]
    total = update_sum(updates, [1, 2, 1])
    whole = total.mean_deltas(base)
    for index, current in enumerate(base.arrays().values()):
        one = total.mean_delta(index, current)
        assert one.dtype == np.float64
        np.testing.assert_array_equal(one, whole[index])
    np.testing.assert_allclose(whole[0], 2.0)  # mean 3 - base 1
    assert len(total.sums) == 3  # kept for the step that follows
