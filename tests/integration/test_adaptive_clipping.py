"""Adaptive clipping at the coordinator, with the digits demo's [dp] settings: what it accounts."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from examples.digits.demo import write_configs
from fedpriv.coordinator import CoordinatorConfig
from fedpriv.privacy import GaussianSteps, epsilon
from tests.helpers import make_config
from tests.integration.test_central_dp import federation_metrics, run_federation


def joint_noise_multiplier(row: dict[str, float], *, count_sensitivity: float) -> float:
    """Noise multiplier of the round's (updates, count) pair, from the noise actually applied."""
    z_updates = row["noise_stddev"] / row["clip_norm"]
    z_count = row["clipped_count_stddev"] / count_sensitivity
    return float((z_updates**-2 + z_count**-2) ** -0.5)


def test_digits_demo_federation_epsilon_accounts_the_count_at_its_sensitivity(
    tmp_path, pki, array_client
):
    # Arrange: the demo's own coordinator.toml (z = 0.02, clipped_count_stddev = z,
    # adaptive, 3 silos, 5 rounds); one silo is clipped (norm 10 > C = 5), two are not.
    write_configs(
        tmp_path, rounds=5, silos=3, port=0, dp=True, fed_noise=0.02, clip=5.0, secagg=False
    )
    demo = CoordinatorConfig.from_dict(
        tomllib.loads((tmp_path / "coordinator.toml").read_text()), base_dir=tmp_path
    )
    assert demo.dp is not None and demo.dp.expected_clients == 3
    config = make_config(
        tmp_path / "run",
        pki.root,
        {"w": np.zeros(100, np.float32)},
        min_clients=3,
        num_rounds=demo.rounds.num_rounds,
        federated_evaluation=False,
        dp=demo.dp,
    )
    clients = [array_client(delta=d) for d in (1.0, 0.1, 0.2)]
    # Act
    run_federation(config, pki, clients)
    rows, committed = federation_metrics(config.state_dir)
    # Assert: five rounds, each accounted as one Gaussian mechanism whose noise multiplier
    # is that of the noise applied to the updates and to the centred count (sensitivity 1/2)
    assert committed.round == 5
    for round in range(1, 6):
        row = rows[round]
        assert row["count_sensitivity"] == 0.5
        assert row["clipped_count_stddev"] == 0.02
        joint = joint_noise_multiplier(row, count_sensitivity=row["count_sensitivity"])
        assert joint == pytest.approx(0.02, rel=1e-9)
        assert row["epsilon"] == pytest.approx(
            epsilon(
                [GaussianSteps(noise_multiplier=joint, sample_rate=1.0, steps=round)], delta=1e-5
            ),
            rel=1e-9,
        )
    # The uncentred count of the old release (sensitivity 1) under the same noise would
    # have cost much more than was printed.
    uncentred = joint_noise_multiplier(rows[5], count_sensitivity=1.0)
    assert (
        epsilon([GaussianSteps(noise_multiplier=uncentred, sample_rate=1.0, steps=5)], delta=1e-5)
        > 1.5 * rows[5]["epsilon"]
    )
    # The norm moved: the noised fraction of unclipped updates is about 2/3 > 1/2.
    assert rows[5]["next_clip_norm"] < 5.0
