"""Skellam releases are accounted at integer RDP orders only, where their bound is proven.

Agarwal, Kairouz and Liu (2021, Theorem 3.5) bound the Skellam mechanism's Rényi DP
for integer orders. Reading epsilon at a fractional order uses a bound nobody
proved; these tests recompute the accounting independently and show that no
fractional order can be the one an epsilon comes from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpriv.privacy.accounting import (
    DEFAULT_ORDERS,
    Accountant,
    GaussianSteps,
    SkellamSum,
    account,
    epsilon,
    epsilon_rdp,
)

# Written out, not imported: the integer grid fedpriv promises to read Skellam at.
INTEGERS = [float(a) for a in (*range(2, 64), 128, 256, 512)]


def skellam_rdp(alpha, *, mu, d1, d2):
    """Theorem 3.5 of Agarwal, Kairouz and Liu (2021), for one release."""
    return alpha * d2**2 / (2 * mu) + min(
        ((2 * alpha - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
    )


def to_epsilon(rdp, alpha, delta):
    """Balle et al. (2020), Theorem 21: RDP at one order to (epsilon, delta)."""
    return rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)


def best(orders, rdp_at, delta):
    """(epsilon, order) minimising the conversion over `orders`."""
    return min((to_epsilon(rdp_at(a), a, delta), a) for a in orders)


# Ten hospital-like rounds: sensitivity 1000 integer units, noise 0.5 of it, so the
# epsilon is large and the best order would be close to 1.
MU, SCALE, ROUNDS = (0.5 * 1000.0) ** 2, 1000.0, 10
RELEASES = [SkellamSum(mu=MU, l1_sensitivity=SCALE, l2_sensitivity=SCALE)] * ROUNDS


def composed(alpha):
    return ROUNDS * skellam_rdp(alpha, mu=MU, d1=SCALE, d2=SCALE)


def test_skellam_rdp_is_infinite_at_every_fractional_order():
    release = RELEASES[0]
    fractional = [a for a in DEFAULT_ORDERS if not float(a).is_integer()]
    assert fractional  # the default grid offers them
    assert np.all(np.isinf(release.rdp(fractional)))
    at_integers = release.rdp(INTEGERS)
    expected = [skellam_rdp(a, mu=MU, d1=SCALE, d2=SCALE) for a in INTEGERS]
    assert at_integers == pytest.approx(expected, rel=1e-12)


def test_skellam_epsilon_matches_an_independent_integer_order_computation():
    expected, _ = best(INTEGERS, composed, 1e-5)
    spent = account(RELEASES, delta=1e-5)
    assert spent.accountant is Accountant.RDP
    assert spent.epsilon == spent.epsilon_rdp == epsilon(RELEASES, delta=1e-5)
    assert spent.epsilon == pytest.approx(expected, rel=1e-9)


def test_a_fractional_order_cannot_be_chosen_even_when_offered():
    # Arrange: the flaw. Read at the default grid with fractional orders allowed, the
    # best order is fractional and the epsilon lower than any proven one.
    unproven, unproven_order = best(DEFAULT_ORDERS, composed, 1e-5)
    proven, proven_order = best([a for a in DEFAULT_ORDERS if a.is_integer()], composed, 1e-5)
    assert not unproven_order.is_integer() and unproven < proven - 0.1
    # Act: offer fedpriv the same fractional grid explicitly
    offered = epsilon_rdp(RELEASES, delta=1e-5, orders=DEFAULT_ORDERS)
    # Assert: it reads the proven integer order, never the fractional one
    assert proven_order.is_integer()
    assert offered == pytest.approx(proven, rel=1e-9)
    assert offered > unproven


def test_skellam_mixed_with_gaussian_rounds_is_accounted_at_integer_orders():
    z = 2.0
    history = [*RELEASES[:3], GaussianSteps(noise_multiplier=z, sample_rate=1.0, steps=5)]

    def both(alpha):  # Gaussian without sampling: alpha / (2 z^2) per round
        return 3 * skellam_rdp(alpha, mu=MU, d1=SCALE, d2=SCALE) + 5 * alpha / (2 * z**2)

    expected, order = best(INTEGERS, both, 1e-6)
    spent = account(history, delta=1e-6)
    assert order.is_integer() and spent.accountant is Accountant.RDP
    assert spent.epsilon == spent.epsilon_rdp
    assert spent.epsilon == pytest.approx(expected, rel=1e-9)
