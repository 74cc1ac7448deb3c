"""DP-FedAvg over real gRPC and mTLS: clipping, central noise, adaptive norm, federation epsilon."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.errors import ConfigError
from fedpriv.privacy import GaussianSteps, epsilon, epsilon_rdp
from fedpriv.privacy.central import CentralDP
from tests.helpers import make_config, run_three_silos

SILOS = ("silo-a", "silo-b", "silo-c")


def run_federation(config, pki, clients):
    reporter, _ = run_three_silos(config, pki, clients, SILOS)
    return reporter


def federation_metrics(state_dir):
    store = Store(state_dir)
    rows: dict[int, dict[str, float]] = {}
    for round, _, name, value in store.metrics(source="federation"):
        rows.setdefault(round, {})[name] = value
    committed = store.last_committed()
    store.close()
    return rows, committed


def test_updates_are_clipped_weighted_equally_and_noised_with_z_times_c(
    tmp_path, pki, array_client
):
    # Arrange: P = 200k; silo a and c move far (clipped to C = 1), silo b moves
    # 0.001 per element (norm 0.45, unclipped) and claims 100x the examples.
    size = 200_000
    dp = CentralDP(noise_multiplier=0.05, clip_norm=1.0, expected_clients=3)
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(size, np.float32)},
        min_clients=3,
        num_rounds=1,
        federated_evaluation=False,
        dp=dp,
    )
    clients = [
        array_client(delta=1.0, num_examples=10),
        array_client(delta=0.001, num_examples=1000),
        array_client(delta=0.5, num_examples=10),
    ]
    # Act
    reporter = run_federation(config, pki, clients)
    # Assert: the mean of clipped updates, unweighted, plus N(0, (z C / m)^2)
    rows, committed = federation_metrics(config.state_dir)
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()["w"]
    clipped = 1.0 / np.sqrt(size)
    expected = (clipped + 0.001 + clipped) / 3
    noise = final.astype(np.float64) - expected
    # standard error of the mean is 0.0167 / sqrt(200k) = 3.7e-5
    assert abs(float(noise.mean())) < 2e-4
    assert float(noise.std()) == pytest.approx(0.05 * 1.0 / 3, rel=0.02)
    assert rows[1]["noise_stddev"] == pytest.approx(0.05)
    assert rows[1]["clip_norm"] == 1.0
    assert rows[1]["epsilon"] == pytest.approx(
        epsilon([GaussianSteps(noise_multiplier=0.05, sample_rate=1.0, steps=1)], delta=1e-5)
    )
    assert reporter.completed[0].federation_metrics["epsilon"] == rows[1]["epsilon"]
    assert rows[1]["epsilon_rdp"] == pytest.approx(
        epsilon_rdp([GaussianSteps(noise_multiplier=0.05, sample_rate=1.0, steps=1)], delta=1e-5)
    )
    assert rows[1]["epsilon"] < rows[1]["epsilon_rdp"]  # exact Gaussian, below the RDP bound


def test_adaptive_norm_and_federation_epsilon_survive_a_restart(tmp_path, pki, array_client):
    # Arrange: every update (norm 0.1 * sqrt(1000) = 3.2) is far inside C = 100,
    # so the adaptive norm shrinks by about exp(-0.2 * 0.5) per round.
    dp = CentralDP(
        noise_multiplier=0.2,
        clip_norm=100.0,
        adaptive=True,
        clipped_count_stddev=0.15,
        expected_clients=3,
    )
    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(1000, np.float32)},
        min_clients=3,
        num_rounds=2,
        federated_evaluation=False,
        dp=dp,
    )
    clients = [array_client(delta=0.1) for _ in SILOS]
    # Act: two rounds, stop, then a new coordinator on the same state runs round 3
    run_federation(config, pki, clients)
    rows_before, _ = federation_metrics(config.state_dir)
    again = dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, num_rounds=3))
    run_federation(again, pki, [array_client(delta=0.1) for _ in SILOS])
    rows, committed = federation_metrics(config.state_dir)
    # Assert
    assert committed.round == 3 and rows_before.keys() == {1, 2}
    assert rows[1]["clip_norm"] == 100.0
    for round in (2, 3):
        assert rows[round]["clip_norm"] == rows[round - 1]["next_clip_norm"]
        # noised unclipped fraction = 1 + N(0, 0.05^2); within 5 sigma the step is
        # exp(-0.2 * (0.5 +- 0.25))
        assert 0.86 < rows[round]["clip_norm"] / rows[round - 1]["clip_norm"] < 0.952
    for round in (1, 2, 3):
        assert rows[round]["epsilon"] == pytest.approx(
            epsilon([GaussianSteps(noise_multiplier=0.2, sample_rate=1.0, steps=round)], delta=1e-5)
        )
    # The update noise is raised so that updates and count together cost z = 0.2
    assert rows[1]["noise_stddev"] == pytest.approx(100.0 * dp.update_noise_multiplier)
    assert dp.update_noise_multiplier > 0.2


def test_dp_with_a_strategy_that_cannot_add_noise_fails_at_start(tmp_path, pki):
    class Median:
        name = "median"

        def begin_round(self, round, *, model):
            return object()

    config = make_config(
        tmp_path,
        pki.root,
        {"w": np.zeros(4, np.float32)},
        dp=CentralDP(noise_multiplier=1.0, clip_norm=1.0),
    )
    with pytest.raises(ConfigError, match="'median' cannot"):
        Coordinator(config, strategy=Median())
