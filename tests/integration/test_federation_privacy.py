"""The coordinator's side of a silo's privacy: reported epsilon never goes down, and rounds
without DP leave the federation with no guarantee (real gRPC, mTLS and SQLite)."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from fedpriv.cli.report import describe_guarantee, write_report
from fedpriv.cli.status import format_status, query_status
from fedpriv.client.config import ClientConfig
from fedpriv.coordinator import Store
from fedpriv.privacy import GaussianSteps, epsilon
from fedpriv.privacy.central import CentralDP
from tests.conftest import ArrayClient
from tests.helpers import make_config, run_three_silos
from tests.integration.test_processes import ROOT

SILOS = ("silo-a", "silo-b", "silo-c")


class ReportingClient(ArrayClient):
    """Reports the given epsilons, one per round: what a silo whose ledger was reset sends."""

    def __init__(self, epsilons: list[float]) -> None:
        super().__init__(delta=0.1)
        self.epsilons = list(epsilons)

    def fit(self, parameters, *, config):
        result = super().fit(parameters, config=config)
        metrics = {**result.metrics, "epsilon": self.epsilons.pop(0), "delta": 1e-5}
        return dataclasses.replace(result, metrics=metrics)


def run(config, pki, clients, **extra):
    query = (lambda coordinator: status(coordinator.port, pki)) if extra.get("status") else None
    return run_three_silos(config, pki, clients, SILOS, before_stop=query)


def status(port, pki):
    operator = ClientConfig(
        coordinator=f"127.0.0.1:{port}",
        ca=pki.root / "ca.crt",
        cert=pki.root / "operator.crt",
        key=pki.root / "operator.key",
    )
    return query_status(operator, insecure=False, identity=None, timeout_s=10)


def train_outcomes(state_dir, silo):
    with sqlite3.connect(state_dir / "state.sqlite3") as conn:
        return conn.execute(
            "SELECT round, outcome, detail FROM participants WHERE silo = ? AND task = 'train' "
            "ORDER BY id",
            (silo,),
        ).fetchall()


def test_an_epsilon_that_goes_down_is_rejected_the_round_completes_and_a_restart_keeps_it(
    tmp_path, pki
):
    # Arrange: silo-a reports 2.0, then 1.0 (its ledger was reset); b and c report none
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(8, np.float32)},
        min_clients=3,
        min_results=2,
        num_rounds=2,
        federated_evaluation=False,
    )
    # Act
    first, _ = run(config, pki, [ReportingClient([2.0, 1.0]), ArrayClient(), ArrayClient()])
    # Act: a new coordinator on the same state; silo-a reports 1.5, still below 2.0
    again = dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, num_rounds=3))
    second, _ = run(again, pki, [ReportingClient([1.5]), ArrayClient(), ArrayClient()])
    # Assert: round 1 accepted; rounds 2 and 3 completed without silo-a, with the reason
    outcomes = train_outcomes(config.state_dir, "silo-a")
    assert [(r, o) for r, o, _ in outcomes] == [(1, "accepted"), (2, "rejected"), (3, "rejected")]
    for _, _, detail in outcomes[1:]:
        assert "is below the 2 (delta 1e-05) this silo reported in round 1" in detail
        assert "ledger was reset or replaced" in detail
    assert [s.accepted for s in first.completed + second.completed] == [3, 2, 2]
    assert [s.rejected for s in first.completed + second.completed] == [0, 1, 1]
    store = Store(config.state_dir)
    try:
        assert store.rounds() == [0, 1, 2, 3]
        assert store.silo_spends()["silo-a"].epsilon == 2.0
    finally:
        store.close()


def test_rounds_without_dp_make_the_federation_epsilon_none_in_status_and_report(tmp_path, pki):
    # Arrange: two rounds without [dp], then [dp] on for round 3, then off again for round 4
    dp = CentralDP(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3)
    plain = dataclasses.replace(
        make_config(
            tmp_path,
            pki.root,
            {"w": np.zeros(8, np.float32)},
            min_clients=3,
            num_rounds=2,
            federated_evaluation=False,
        ),
        operators=frozenset({"operator"}),
    )
    private = dataclasses.replace(
        plain, dp=dp, rounds=dataclasses.replace(plain.rounds, num_rounds=3)
    )
    off_again = dataclasses.replace(plain, rounds=dataclasses.replace(plain.rounds, num_rounds=4))
    clients = [ArrayClient(delta=0.1) for _ in SILOS]
    # Act
    run(plain, pki, clients)
    reporter, with_dp = run(private, pki, clients, status=True)
    report_line = describe_guarantee(plain.state_dir)
    points = write_report(plain.state_dir, tmp_path / "report")
    report_cli = subprocess.run(
        [sys.executable, "-m", "fedpriv", "report", str(plain.state_dir), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _, without_dp = run(off_again, pki, clients, status=True)
    # Assert: the accountant's figure is kept for the one DP round, the federation's is none
    (summary,) = reporter.completed
    assert math.isinf(summary.federation_metrics["epsilon"])
    assert summary.federation_metrics["rounds_without_dp"] == 2
    assert summary.federation_metrics["epsilon_dp_rounds"] == pytest.approx(
        epsilon([GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1)], delta=1e-5)
    )
    assert with_dp["rounds_without_dp"] == [1, 2]
    assert "central DP: on, ε = none (rounds 1–2 ran without DP)" in format_status(with_dp)
    assert report_line.startswith("federation epsilon: none (rounds 1–2 ran without DP")
    assert report_cli.returncode == 0 and report_line in report_cli.stdout, report_cli.stderr
    assert points["epsilon.png"] == 1  # the DP round's own figure, nothing infinite
    assert without_dp["rounds_without_dp"] == [1, 2, 4]
    assert "central DP: off, ε = none (rounds 1–2, 4 ran without DP)" in format_status(without_dp)


def test_a_federation_that_never_ran_dp_claims_nothing(tmp_path, pki):
    config = dataclasses.replace(
        make_config(
            tmp_path,
            pki.root,
            {"w": np.zeros(8, np.float32)},
            min_clients=3,
            federated_evaluation=False,
        ),
        operators=frozenset({"operator"}),
    )
    reporter, shown = run(config, pki, [ArrayClient() for _ in SILOS], status=True)
    assert shown["rounds_without_dp"] == []
    assert "ε = none" not in format_status(shown)
    assert reporter.completed[0].federation_metrics == {}
    assert describe_guarantee(config.state_dir) is None
