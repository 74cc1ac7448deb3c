"""The accountants cross-checked against Google's independent dp-accounting implementation.

The tight epsilon (PRV, or exact without sampling) is compared with dp-accounting's
privacy loss distribution (PLD) accountant; the RDP bound with its RDP accountant;
the unsampled Gaussian with Balle and Wang's formula, written out here with scipy.
"""

from __future__ import annotations

import logging
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import optimize, stats

from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import (
    Accountant,
    GaussianSteps,
    account,
    epsilon,
    epsilon_rdp,
    gaussian_epsilon,
    noise_multiplier_for,
)

# Histories of (noise_multiplier, sample_rate, steps), with delta: DP-SGD settings, a
# small-q many-step run, large q, a two-mechanism history, unsampled (q = 1) DP-FedAvg
# rounds, and sampled steps mixed with unsampled rounds.
TIGHT_SETTINGS = {
    "q=0.04 sigma=1.5 2250 steps": ([(1.5, 0.04, 2250)], 1e-5),
    "small q, 10k steps": ([(0.8, 0.001, 10_000)], 1e-8),
    "large q=0.5": ([(1.0, 0.5, 50)], 1e-5),
    "q=0.25 delta=1e-3": ([(1.5, 0.25, 40)], 1e-3),
    "two mechanisms": ([(1.0, 0.01, 1000), (2.0, 0.05, 500)], 1e-5),
    "q=1 sigma=5 100 rounds": ([(5.0, 1.0, 100)], 1e-5),
    "q=1 two multipliers": ([(1.0, 1.0, 2), (2.0, 1.0, 8)], 1e-5),
    "sampled and unsampled": ([(1.0, 0.01, 300), (5.0, 1.0, 10)], 1e-5),
}


def history_of(triples):
    return [GaussianSteps(noise_multiplier=z, sample_rate=q, steps=n) for z, q, n in triples]


def event_of(z, q):
    gaussian = dp_accounting.GaussianDpEvent(z)
    return gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def pld_epsilon(triples, delta):
    accountant = pld_privacy_accountant.PLDAccountant()
    for z, q, n in triples:
        accountant.compose(dp_accounting.SelfComposedDpEvent(event_of(z, q), n))
    return accountant.get_epsilon(delta)


def google_rdp_epsilon(q, sigma, steps, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def balle_wang_epsilon(mu, delta):
    """Exact epsilon of a mu-GDP mechanism (Balle and Wang 2018, Theorem 8)."""

    def delta_at(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )

    return optimize.brentq(lambda eps: delta_at(eps) - delta, 0.0, 500.0, xtol=1e-13)


@pytest.mark.parametrize(("triples", "delta"), TIGHT_SETTINGS.values(), ids=TIGHT_SETTINGS)
def test_tight_epsilon_matches_dp_accounting_pld_within_one_percent_or_0_01(triples, delta):
    ours = epsilon(history_of(triples), delta=delta)
    theirs = pld_epsilon(triples, delta)
    assert abs(ours - theirs) <= max(0.01 * theirs, 0.01)


@pytest.mark.parametrize(("triples", "delta"), TIGHT_SETTINGS.values(), ids=TIGHT_SETTINGS)
def test_tight_epsilon_is_never_above_the_rdp_bound_reported_beside_it(triples, delta):
    spent = account(history_of(triples), delta=delta)
    assert spent.epsilon_rdp == epsilon_rdp(history_of(triples), delta=delta)
    assert spent.epsilon <= spent.epsilon_rdp
    assert spent.delta == delta
    unsampled = all(q == 1.0 for _, q, _ in triples)
    assert spent.accountant is (Accountant.EXACT if unsampled else Accountant.PRV)


def test_rdp_is_looser_than_the_tight_accountant_on_the_standard_setting():
    spent = account(history_of([(1.5, 0.04, 2250)]), delta=1e-5)
    assert spent.epsilon_rdp - spent.epsilon > 0.5  # about 7.33 against 6.78


@pytest.mark.parametrize(
    ("triples", "delta"),
    [
        ([(1.0, 1.0, 4)], 1e-5),
        ([(5.0, 1.0, 100)], 1e-6),
        ([(0.2, 1.0, 3)], 1e-5),
        ([(1.0, 1.0, 2), (2.0, 1.0, 8)], 1e-5),
        ([(30.0, 1.0, 1)], 1e-3),
    ],
)
def test_unsampled_gaussian_epsilon_is_the_exact_balle_wang_value_never_below(triples, delta):
    mu = math.sqrt(sum(n / z**2 for z, _, n in triples))
    exact = balle_wang_epsilon(mu, delta)
    ours = epsilon(history_of(triples), delta=delta)
    assert ours >= exact
    assert ours == pytest.approx(exact, abs=1e-9)
    assert gaussian_epsilon(mu, delta=delta) == ours


def test_weak_gaussian_costs_zero_epsilon_when_delta_covers_it():
    # delta(0) = Phi(mu/2) - Phi(-mu/2) ~ 0.4 * mu: for mu = 1e-6 that is below delta
    assert gaussian_epsilon(1e-6, delta=1e-5) == 0.0


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [
        (0.01, 1.1, 1000, 1e-5),
        (0.134, 1.0, 150, 1e-5),
        (0.04, 0.8, 2250, 1e-6),
        (1.0, 5.0, 100, 1e-5),
        (0.001, 4.0, 10_000, 1e-8),
        (0.25, 1.5, 40, 1e-3),
    ],
)
def test_rdp_bound_matches_dp_accounting_rdp_within_one_percent(q, sigma, steps, delta):
    ours = epsilon_rdp(
        [GaussianSteps(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=delta
    )
    theirs = google_rdp_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_history_composes_like_one_long_run_in_any_order():
    split = [GaussianSteps(noise_multiplier=1.0, sample_rate=0.05, steps=100) for _ in range(5)]
    whole = [GaussianSteps(noise_multiplier=1.0, sample_rate=0.05, steps=500)]
    assert epsilon(split, delta=1e-5) == pytest.approx(epsilon(whole, delta=1e-5), rel=1e-9)
    mixed = history_of([(1.0, 0.01, 1000), (2.0, 0.05, 500), (3.0, 1.0, 5)])
    assert epsilon(mixed, delta=1e-5) == pytest.approx(epsilon(mixed[::-1], delta=1e-5), rel=1e-9)


def test_empty_history_spends_nothing():
    spent = account([GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=0)], delta=1e-5)
    assert (spent.epsilon, spent.epsilon_rdp, spent.accountant) == (0.0, 0.0, Accountant.EXACT)
    assert epsilon([], delta=1e-5) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_the_open_unit_interval_is_a_config_error(delta):
    history = history_of([(1.0, 0.1, 10)])
    with pytest.raises(ConfigError, match="delta"):
        epsilon(history, delta=delta)
    with pytest.raises(ConfigError, match="delta"):
        epsilon_rdp(history, delta=delta)


def test_prv_falls_back_to_the_rdp_bound_where_floating_point_would_dominate(caplog):
    # Opacus's PRV code refuses deltas near the float resolution of its mesh
    history = history_of([(1.0, 0.01, 1000)])
    with caplog.at_level(logging.WARNING, logger="fedpriv.privacy.accounting"):
        spent = account(history, delta=1e-17)
    assert spent.accountant is Accountant.RDP
    assert spent.epsilon == spent.epsilon_rdp == epsilon_rdp(history, delta=1e-17)
    assert "prv accountant unavailable" in caplog.text


def test_noise_multiplier_for_target_meets_it_under_the_tight_accountant():
    sigma = noise_multiplier_for(8.0, delta=1e-5, sample_rate=0.1, steps=300)
    eps = epsilon([GaussianSteps(noise_multiplier=sigma, sample_rate=0.1, steps=300)], delta=1e-5)
    assert 7.99 <= eps <= 8.0
    assert eps == pytest.approx(pld_epsilon([(sigma, 0.1, 300)], 1e-5), abs=0.01)


def test_noise_multiplier_for_needs_less_noise_than_the_rdp_calibration():
    # Arrange: the standard DP-SGD setting, calibrated to the same target both ways
    target, q, steps = 6.78, 0.04, 2250
    # Act
    tight_sigma = noise_multiplier_for(target, delta=1e-5, sample_rate=q, steps=steps)
    rdp_sigma = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )
    # Assert: about 1.5 against 1.6; and the RDP sigma really is an RDP calibration
    assert tight_sigma < 0.97 * rdp_sigma
    rdp_eps = epsilon_rdp(
        [GaussianSteps(noise_multiplier=rdp_sigma, sample_rate=q, steps=steps)], delta=1e-5
    )
    assert rdp_eps <= target + 0.01


def test_noise_multiplier_for_unsampled_rounds_inverts_the_exact_gaussian():
    sigma = noise_multiplier_for(2.0, delta=1e-5, sample_rate=1.0, steps=10)
    mu = math.sqrt(10) / sigma
    assert 1.99 <= balle_wang_epsilon(mu, 1e-5) <= 2.0


@pytest.mark.parametrize(("target", "steps"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_noise_multiplier_for_rejects_a_target_it_cannot_calibrate(target, steps):
    with pytest.raises(ConfigError):
        noise_multiplier_for(target, delta=1e-5, sample_rate=0.1, steps=steps)
