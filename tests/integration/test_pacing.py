"""Resource-aware rounds: silos report their pace, and a slow one gets a step budget (mTLS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.cli.status import format_status, query_status
from fedpriv.client import FitResult
from fedpriv.client.base import EvaluateResult
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator.pacing import PROBE_AFTER, Pace
from fedpriv.privacy.accounting import GaussianSteps
from tests.helpers import make_config, run_three_silos

FULL_STEPS = 40


class PacedClient:
    """A silo that reports a measured pace and records the step budget each task gave it."""

    device = "cpu"

    def __init__(self, step_seconds: float, *, dp: bool = False) -> None:
        self.pace = (step_seconds, FULL_STEPS)
        self.budgets: list[int | None] = []
        self.privacy = object() if dp else None

    def plan_privacy(self, config: Mapping[str, Any]) -> GaussianSteps | None:
        if self.privacy is None:
            return None
        return GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=FULL_STEPS)

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        limit = config.get("max_steps")
        self.budgets.append(None if limit is None else int(limit))
        steps = FULL_STEPS if limit is None else int(limit)
        return FitResult(
            parameters={k: v + np.float32(steps / FULL_STEPS) for k, v in parameters.items()},
            num_examples=10,
        )

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        return EvaluateResult(num_examples=10, metrics={"loss": 1.0})


def _config(tmp_path, pki, pace: Pace):
    config = make_config(
        tmp_path, pki.root, {"w": np.zeros(4, np.float32)}, num_rounds=2, min_clients=3
    )
    return dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, pace=pace))


def _status(coordinator):
    return {s.name: s for s in coordinator.federation.status().silos}


def _admin_status(pki):
    """What `fedpriv status` prints, asked over mTLS with the operator's certificate."""

    def ask(coordinator):
        operator = ClientConfig(
            coordinator=f"127.0.0.1:{coordinator.port}",
            ca=pki.root / "ca.crt",
            cert=pki.root / "operator.crt",
            key=pki.root / "operator.key",
        )
        return format_status(query_status(operator, insecure=False, identity=None, timeout_s=10))

    return ask


def test_balanced_pace_budgets_the_slow_silo_to_the_median_time_and_all_contribute(tmp_path, pki):
    # Arrange: two silos at 0.01 s a step, one four times slower; 40 steps of full work
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(0.04)]
    # Act
    reporter, status = run_three_silos(
        _config(tmp_path, pki, Pace.BALANCED),
        pki,
        clients,
        ("silo-a", "silo-b", "silo-c"),
        before_stop=_status,
    )
    # Assert: the slow silo did what fits in the others' 0.4 s (10 steps), every round
    assert [r.round for r in reporter.completed] == [1, 2] and not reporter.failed
    assert all(r.accepted == 3 for r in reporter.completed)
    assert clients[0].budgets == clients[1].budgets == [None, None]
    assert clients[2].budgets == [10, 10]
    # the coordinator keeps what each silo reported
    assert status["silo-c"].resources.step_seconds == 0.04
    assert status["silo-c"].resources.full_steps == FULL_STEPS
    assert status["silo-a"].resources.device_kind == "cpu"


def test_fedpriv_status_shows_what_each_silo_reported(tmp_path, pki):
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(0.04)]
    config = dataclasses.replace(
        _config(tmp_path, pki, Pace.BALANCED), operators=frozenset({"operator"})
    )
    _, shown = run_three_silos(
        config, pki, clients, ("silo-a", "silo-b", "silo-c"), before_stop=_admin_status(pki)
    )
    table = shown.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("silo    device"))
    rows = {line.split()[0]: line.split() for line in table[header + 1 : header + 4]}
    assert rows["silo-c"][:5] == ["silo-c", "1", "cpu", "0.040", "40"]
    assert rows["silo-a"][:5] == ["silo-a", "1", "cpu", "0.010", "40"]


def test_without_the_policy_every_silo_does_its_full_work(tmp_path, pki):
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(0.04)]
    reporter, _ = run_three_silos(
        _config(tmp_path, pki, Pace.SLOWEST), pki, clients, ("silo-a", "silo-b", "silo-c")
    )
    assert [r.round for r in reporter.completed] == [1, 2]
    assert all(c.budgets == [None, None] for c in clients)


def test_a_dp_silo_keeps_its_pace_to_itself_and_so_gets_no_budget(tmp_path, pki):
    # Its pace is measured on private data: without [privacy] share_resources it is
    # not sent, and the coordinator sees only its hardware.
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(0.04, dp=True)]
    _, status = run_three_silos(
        _config(tmp_path, pki, Pace.BALANCED),
        pki,
        clients,
        ("silo-a", "silo-b", "silo-c"),
        before_stop=_status,
    )
    assert clients[2].budgets == [None, None]
    assert status["silo-c"].resources.device_kind == "cpu"
    assert status["silo-c"].resources.step_seconds == 0.0
    assert status["silo-c"].resources.full_steps == 0


def test_a_silo_that_cannot_answer_in_time_is_left_out_then_probed_again(tmp_path, pki):
    # Arrange: silo-c reports 100 s a step against a 60 s deadline; two results suffice
    rounds = PROBE_AFTER + 1
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(4, np.float32)},
        num_rounds=rounds,
        min_clients=3,
        min_results=2,
    )
    config = dataclasses.replace(
        config, rounds=dataclasses.replace(config.rounds, pace=Pace.BALANCED)
    )
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(100.0)]
    # Act
    reporter, _ = run_three_silos(config, pki, clients, ("silo-a", "silo-b", "silo-c"))
    # Assert: every round commits; silo-c trains only in the round after PROBE_AFTER
    # rounds out (on a one-step budget, the most that fits 90% of the deadline: none)
    assert [r.round for r in reporter.completed] == list(range(1, rounds + 1))
    assert [r.accepted for r in reporter.completed] == [2] * PROBE_AFTER + [3]
    assert clients[0].budgets == [None] * rounds
    assert clients[2].budgets == [1]


def test_without_the_policy_a_silo_that_cannot_answer_in_time_still_takes_part(tmp_path, pki):
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(4, np.float32)},
        num_rounds=2,
        min_clients=3,
        min_results=2,
    )
    clients = [PacedClient(0.01), PacedClient(0.01), PacedClient(100.0)]
    reporter, _ = run_three_silos(config, pki, clients, ("silo-a", "silo-b", "silo-c"))
    assert [r.accepted for r in reporter.completed] == [3, 3]
    assert clients[2].budgets == [None, None]
