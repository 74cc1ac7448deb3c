"""SecAgg+ over real gRPC and mTLS: a sparse graph round, and a coordinator that imposes its own."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fedpriv.client.tasks import TaskLimits
from fedpriv.coordinator import Coordinator, SecAggConfig
from fedpriv.errors import RoundFailed
from fedpriv.secagg import ServerSession
from tests.conftest import SILOS
from tests.integration.test_secagg_adversary import (
    assert_finished_cleanly,
    assert_mean_of,
    assert_no_checkpoint,
    assert_running_and_clean,
    committed_model,
    honest_silos,
    participants,
    secure_config,
)


def graph_config(tmp_path, pki):
    config = secure_config(tmp_path, pki=pki, threshold=3, min_clients=5)
    # Five silos, no dropout or collusion planned for: a cycle (k = 2, t = 2 of 3)
    settings = SecAggConfig(graph="harary", dropout=0.0, corrupt_fraction=0.0, unmask_deadline_s=15)
    return dataclasses.replace(config, secure_aggregation=settings)


def test_a_sparse_graph_round_commits_the_exact_mean_of_every_silo(tmp_path, pki, caplog):
    # Arrange
    config = graph_config(tmp_path, pki)
    caplog.set_level(logging.INFO, logger="fedpriv.coordinator.modes_secagg")
    # Act
    with Coordinator(config) as coordinator, honest_silos(coordinator.port, pki, SILOS) as outcomes:
        assert coordinator.wait(timeout_s=120)
    # Assert: the plan was logged, and the mean of all five is committed
    assert_finished_cleanly(outcomes)
    assert "graph=harary silos=5 k=2 t=2" in caplog.text
    assert_mean_of(committed_model(config), SILOS)


def test_silos_refuse_a_graph_the_coordinator_imposes_and_nothing_is_published(
    tmp_path, pki, monkeypatch
):
    # Arrange: the coordinator routes each silo's shares to neighbours of its choosing
    original = ServerSession.open_graph

    def imposed(self, silo, task_id, contribution):
        contributions, _ = original(self, silo, task_id, contribution)
        others = [name for name in sorted(contributions) if name != silo]
        return contributions, others[:2]

    monkeypatch.setattr(ServerSession, "open_graph", imposed)
    config = graph_config(tmp_path, pki)
    # Act
    with Coordinator(config) as coordinator, honest_silos(coordinator.port, pki, SILOS) as outcomes:
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        # Assert: every silo still serves, no model is published, and the reason says why
        assert_running_and_clean(outcomes)
    assert_no_checkpoint(config)
    reasons = " ".join(detail for _, detail in participants(config).values())
    assert "not the one the silos' contributions fix" in reasons


def declined_by(config, pki, limits: TaskLimits) -> str:
    """Run the round with silos under `limits`; return the reasons they declined it.

    Asserts that the round failed, every silo still serves, and nothing was published.
    """
    with (
        Coordinator(config) as coordinator,
        honest_silos(coordinator.port, pki, SILOS, limits=limits) as outcomes,
    ):
        with pytest.raises(RoundFailed):
            coordinator.wait(timeout_s=120)
        assert_running_and_clean(outcomes)
    assert_no_checkpoint(config)
    return " ".join(detail for _, detail in participants(config).values())


def test_silos_decline_a_graph_sparser_than_their_own_assumption_allows(tmp_path, pki):
    # Arrange: the coordinator plans a cycle for no collusion; the silos assume 40% of
    # the round may collude with it, under which a cycle's bound is 1
    config = graph_config(tmp_path, pki)
    # Act
    reasons = declined_by(config, pki, TaskLimits(secagg_corrupt_fraction=0.4))
    # Assert
    assert "the announced graph (5 silos, k=2, t=2" in reasons
    assert "if 2 silos collude with the coordinator" in reasons


def test_silos_that_require_distributed_noise_decline_a_round_without_it(tmp_path, pki):
    # Arrange: secure aggregation without [dp] (no noise); the silos require z >= 1
    config = secure_config(tmp_path, pki=pki)
    # Act
    reasons = declined_by(config, pki, TaskLimits(secagg_min_noise_multiplier=1.0))
    # Assert
    assert (
        "noise multiplier of 0, below this silo's [limits] secagg_min_noise_multiplier" in reasons
    )
