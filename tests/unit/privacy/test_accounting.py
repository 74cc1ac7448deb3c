"""The accountant cross-checked against Google's independent dp-accounting implementation."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedpriv.privacy.accounting import GaussianSteps, epsilon, noise_multiplier_for

# (sample_rate, noise_multiplier, steps, delta): DP-SGD settings, a cross-silo DP-FedAvg
# setting with no subsampling, and extremes of small and large epsilon.
SETTINGS = [
    (0.01, 1.1, 1000, 1e-5),
    (0.134, 1.0, 150, 1e-5),
    (0.04, 0.8, 2250, 1e-6),
    (1.0, 5.0, 100, 1e-5),
    (0.001, 4.0, 10_000, 1e-8),
    (0.25, 1.5, 40, 1e-3),
]


def google_epsilon(q, sigma, steps, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), SETTINGS)
def test_epsilon_matches_dp_accounting_rdp_within_one_percent(q, sigma, steps, delta):
    ours = epsilon([GaussianSteps(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=delta)
    theirs = google_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_history_composes_like_one_long_run():
    split = [GaussianSteps(noise_multiplier=1.0, sample_rate=0.05, steps=100) for _ in range(5)]
    whole = [GaussianSteps(noise_multiplier=1.0, sample_rate=0.05, steps=500)]
    assert epsilon(split, delta=1e-5) == pytest.approx(epsilon(whole, delta=1e-5), rel=1e-9)
    assert epsilon([], delta=1e-5) == 0.0


def test_noise_multiplier_for_target_meets_the_target_tightly():
    sigma = noise_multiplier_for(8.0, delta=1e-5, sample_rate=0.1, steps=300)
    eps = epsilon([GaussianSteps(noise_multiplier=sigma, sample_rate=0.1, steps=300)], delta=1e-5)
    assert 7.8 <= eps <= 8.0
    assert eps == pytest.approx(google_epsilon(0.1, sigma, 300, 1e-5), rel=0.01)
