"""A server optimiser's moments survive a restart: state(), then restore() into a new one."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.strategy import FedAdagrad, FedAdam, FedYogi
from fedpriv.strategy.protocol import StatefulStrategy
from fedpriv.wire import Model
from tests.unit.strategy.spooling import update_sum
from tests.unit.strategy.test_fedopt import WEIGHTS, initial, silo_models

OPTIMISERS = [FedAdam, FedYogi, FedAdagrad]


def run(strategy, base: Model, rounds: range) -> Model:
    for round in rounds:
        base = strategy.aggregate(
            round, base=base, total=update_sum(silo_models(base, round), WEIGHTS)
        )
    return base


@pytest.mark.parametrize("optimiser", OPTIMISERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_restored_optimiser_takes_exactly_the_uninterrupted_step(optimiser, dtype):
    start = Model.from_arrays(initial(dtype))
    uninterrupted = run(optimiser(layout=start.layout), start, range(1, 6))

    first = optimiser(layout=start.layout)
    after_three = run(first, start, range(1, 4))
    state = first.state()
    assert state is not None
    # A fresh process: the moments come only from the stored state.
    resumed = optimiser(layout=start.layout)
    resumed.restore(Model(layout=state.layout, payload=state.payload.copy()))
    final = run(resumed, after_three, range(4, 6))

    assert isinstance(resumed, StatefulStrategy)
    for name, values in uninterrupted.arrays().items():
        np.testing.assert_array_equal(final.arrays()[name], values)
    # Without the moments, the resumed run goes elsewhere: the test can tell.
    fresh = run(optimiser(layout=start.layout), after_three, range(4, 6))
    assert any(not np.array_equal(fresh.arrays()[n], v) for n, v in uninterrupted.arrays().items())


def test_moments_restored_before_the_layout_is_known_apply_at_the_first_round():
    start = Model.from_arrays(initial(np.float32))
    first = FedAdam(layout=start.layout)
    after_two = run(first, start, range(1, 3))
    state = first.state()
    uninterrupted = run(first, after_two, range(3, 4))

    resumed = FedAdam()  # a user's strategy object: no layout until the first round
    resumed.restore(state)
    assert resumed.state() is None
    final = run(resumed, after_two, range(3, 4))
    np.testing.assert_array_equal(final.arrays()["w"], uninterrupted.arrays()["w"])


def test_moments_of_another_model_are_refused():
    small = Model.from_arrays({"w": np.zeros(3, np.float32)})
    other = FedAdam(layout=small.layout)
    run(other, small, range(1, 2))
    start = Model.from_arrays(initial(np.float32))
    with pytest.raises(ValueError, match="not those of this model's tensors"):
        FedAdam(layout=start.layout).restore(other.state())


def test_state_is_none_before_the_first_round():
    assert FedYogi().state() is None
