"""Krum, median and trimmed mean keep one poisoned silo out of the committed model; FedAvg does not.

Five silos federate for one round over loopback with mTLS. Four honest silos add
deltas 1.0, 1.1, 1.2 and 1.3 to every weight; the fifth adds 100 (100 times the
first honest silo's delta). All weigh the same (10 examples each).

The bound: each robust rule's output lies, element by element, inside the honest
silos' deltas. Krum (f = 1, n = 5 >= 2f + 3) picks one honest update, the
coordinate-wise median of {1.0, 1.1, 1.2, 1.3, 100} is 1.2, and the trimmed mean
with beta = 0.2 drops one value at each end and averages 1.1, 1.2, 1.3. So each is
within the honest spread, max |delta_i - 1.15| = 0.15, of the honest mean (plus
float32 rounding of values near 1). FedAvg's mean is (4.6 + 100) / 5 = 20.92, about
19.8 from the honest mean: far outside the bound.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.coordinator.config import StrategyConfig
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

HONEST_DELTAS = (1.0, 1.1, 1.2, 1.3)
POISON = 100.0 * HONEST_DELTAS[0]
SILOS = ("silo-a", "silo-b", "silo-c", "silo-d", "silo-e")  # silo-e is poisoned
HONEST_MEAN = float(np.mean(HONEST_DELTAS))
# The honest spread around their mean, plus float32 rounding of values near 1.
BOUND = max(abs(d - HONEST_MEAN) for d in HONEST_DELTAS) + 1e-5


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "w": rng.normal(size=(32, 8)).astype(np.float32),
        "b": rng.normal(size=8).astype(np.float32),
    }


def _federate(tmp_path, pki, array_client, strategy: StrategyConfig) -> dict[str, np.ndarray]:
    """One round with five silos; the committed model's arrays."""
    initial = _initial()
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, initial, min_clients=len(SILOS), num_rounds=1),
        strategy=strategy,
    )
    clients = [array_client(delta=d) for d in (*HONEST_DELTAS, POISON)]
    reporter = CollectingReporter()
    with Coordinator(config, reporter=reporter) as coordinator, contextlib.ExitStack() as stack:
        outcomes = [
            stack.enter_context(silo_thread(c, port=coordinator.port, tls=pki.tls(silo)))
            for c, silo in zip(clients, SILOS, strict=True)
        ]
        assert coordinator.wait(timeout_s=120)
        wait_silos(outcomes)
    assert reporter.failed == [] and len(reporter.completed) == 1
    assert [o.get("error") for o in outcomes] == [None] * len(SILOS)
    store = Store(config.state_dir)
    committed = store.last_committed()
    store.close()
    assert committed is not None and committed.round == 1
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    return {name: final[name].astype(np.float64) - initial[name] for name in initial}


def _distance(deltas: dict[str, np.ndarray]) -> float:
    """The largest element-wise distance of the committed delta from the honest mean."""
    return max(float(np.max(np.abs(d - HONEST_MEAN))) for d in deltas.values())


@pytest.mark.parametrize(
    "strategy",
    [
        StrategyConfig(name="krum", options={"byzantine": 1}),
        StrategyConfig(name="median"),
        StrategyConfig(name="trimmed_mean", options={"beta": 0.2}),
    ],
    ids=lambda s: s.name,
)
def test_a_robust_rule_commits_a_model_near_the_honest_mean(tmp_path, pki, array_client, strategy):
    deltas = _federate(tmp_path, pki, array_client, strategy)
    assert _distance(deltas) <= BOUND
    # Each delta is inside the honest silos' range (none of the poison leaks in).
    for d in deltas.values():
        assert np.all(d >= min(HONEST_DELTAS) - 1e-5) and np.all(d <= max(HONEST_DELTAS) + 1e-5)


def test_fedavg_lets_the_poisoned_silo_drag_the_model(tmp_path, pki, array_client):
    deltas = _federate(tmp_path, pki, array_client, StrategyConfig(name="fedavg"))
    expected = (sum(HONEST_DELTAS) + POISON) / len(SILOS)  # 20.92
    assert _distance(deltas) > 100 * BOUND
    for d in deltas.values():
        np.testing.assert_allclose(d, expected, atol=1e-4)
