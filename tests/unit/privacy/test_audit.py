"""The one-run audit's statistics, checked against scipy's binomial distribution."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from fedpriv.privacy.audit import epsilon_lower_bound, p_value


def reference_p_value(r, v, eps, delta, m):
    """Theorem 5.2 of Steinke, Nasr and Jagielski (2023), written with scipy."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(v - 1, r, q)
    ratios = [
        (stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i
        for i in range(1, v + 1)
    ]
    return min(1.0, tail + 2 * m * delta * max(ratios, default=0.0))


@pytest.mark.parametrize(
    ("r", "v", "eps", "delta", "m"),
    [
        (200, 194, 2.0, 1e-5, 1000),
        (200, 134, 0.3, 1e-5, 1000),
        (100, 100, 3.0, 0.0, 1000),
        (50, 30, 0.0, 1e-3, 200),
        (1000, 700, 1.0, 1e-6, 10_000),
    ],
)
def test_p_value_matches_an_independent_scipy_implementation(r, v, eps, delta, m):
    ours = p_value(guesses=r, correct=v, epsilon=eps, delta=delta, canaries=m)
    assert ours == pytest.approx(reference_p_value(r, v, eps, delta, m), rel=1e-6, abs=1e-12)


def test_bound_is_where_the_p_value_crosses_five_percent():
    eps = epsilon_lower_bound(guesses=200, correct=180, delta=0.0, canaries=1000)
    q = 1 / (1 + math.exp(-eps))
    assert stats.binom.sf(179, 200, q) == pytest.approx(0.05, rel=1e-3)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    bounds = [
        epsilon_lower_bound(guesses=200, correct=v, delta=1e-5, canaries=1000)
        for v in (100, 120, 150, 180, 200)
    ]
    assert bounds[0] == 0.0
    assert bounds == sorted(bounds) and bounds[-1] > 3.0


def test_inconsistent_counts_are_refused():
    with pytest.raises(ValueError):
        p_value(guesses=10, correct=11, epsilon=1.0, delta=0.0, canaries=20)
