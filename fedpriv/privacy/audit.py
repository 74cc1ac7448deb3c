"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr and Jagielski, 2023).

`m` canaries are each put into the training data with probability 1/2,
independently. After training, an auditor guesses "in" for the `k` canaries it
scores highest and "out" for the `k` it scores lowest, and abstains on the
rest. If training is (ε, δ)-DP, the number of correct guesses v among r = 2k is
stochastically dominated by Binomial(r, e^ε / (1 + e^ε)), up to a δ term
(their Theorem 5.2):

    p(ε) = P[Bin(r, q) ≥ v] + 2·m·δ · max_{1≤i≤v} P[v − i ≤ Bin(r, q) < v] / i.

The reported bound is the largest ε for which observing v would have
probability below 1 − confidence: the run is then not (ε, δ)-DP at that
confidence. The guess counts are fixed before the scores are seen; choosing
them from the scores would invalidate the test.

Pure functions on numbers; the training harness lives in ``fedpriv.client.audit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AuditResult", "epsilon_lower_bound", "p_value"]


def _log_binomial_pmf(k: int, n: int, q: float) -> float:
    if q <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if q >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(q)
        + (n - k) * math.log1p(-q)
    )


def _pmfs(n: int, q: float) -> list[float]:
    return [math.exp(_log_binomial_pmf(k, n, q)) for k in range(n + 1)]


def p_value(*, guesses: int, correct: int, epsilon: float, delta: float, canaries: int) -> float:
    """Probability of `correct` or more right guesses out of `guesses` under (ε, δ)-DP.

    Example:
        >>> round(p_value(guesses=10, correct=10, epsilon=0.0, delta=0.0, canaries=10), 6)
        0.000977
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and delta in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = _pmfs(guesses, q)
    tail = math.fsum(pmf[correct:])
    worst = 0.0
    window = 0.0  # P[correct - i <= Bin < correct]
    for i in range(1, correct + 1):
        window += pmf[correct - i]
        worst = max(worst, window / i)
    return min(1.0, tail + 2.0 * canaries * delta * worst)


def epsilon_lower_bound(
    *,
    guesses: int,
    correct: int,
    delta: float,
    canaries: int,
    confidence: float = 0.95,
    tolerance: float = 1e-6,
) -> float:
    """Largest ε such that the observed guesses reject (ε, δ)-DP at `confidence` (0.0 if none).

    Example:
        >>> round(epsilon_lower_bound(guesses=100, correct=100, delta=0.0, canaries=1000), 3)
        3.493
        >>> epsilon_lower_bound(guesses=100, correct=50, delta=0.0, canaries=1000)
        0.0
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence

    def rejects(eps: float) -> bool:
        return (
            p_value(guesses=guesses, correct=correct, epsilon=eps, delta=delta, canaries=canaries)
            < alpha
        )

    if not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):
        low, high = high, 2.0 * high
        if high > 1e4:  # only reachable with absurd inputs; report the finite part
            return low
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        if rejects(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditResult:
    """What one audit observed and concluded.

    Args:
        canaries: Canaries drawn (each trained on with probability 1/2).
        included: How many were trained on.
        guesses: Guesses made (half "in", half "out").
        correct: Correct guesses.
        epsilon_lower_bound: Empirical lower bound on ε at `confidence`.
        accountant_epsilon: The accountant's ε for the same run (None without DP).
        delta: δ of both numbers.
        confidence: Confidence of the lower bound.
    """

    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    accountant_epsilon: float | None
    delta: float
    confidence: float
