"""Privacy accounting: pure functions from a mechanism history to (epsilon, delta).

The accountant is Rényi DP (Mironov 2017) for the subsampled Gaussian mechanism,
computed by Opacus's analysis module, converted to (epsilon, delta) with the
tighter conversion of Balle et al. (2020) that Opacus implements. Nothing here
holds state: the ledger owns the history and calls these functions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpriv.errors import ConfigError

__all__ = [
    "DEFAULT_ORDERS",
    "GaussianSteps",
    "SkellamSum",
    "epsilon",
    "epsilon_from_rdp",
    "total_rdp",
    "noise_multiplier_for",
]

# Fine orders near 1 matter for large epsilon, large ones for small epsilon; this
# grid is Opacus's default plus the large orders of Google's dp-accounting.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1 + x / 10.0 for x in range(1, 100)}
        | set(map(float, range(12, 64)))
        | {128.0, 256.0, 512.0}
    )
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GaussianSteps:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: Noise standard deviation divided by the clipping norm.
        sample_rate: Probability that each record (or silo) is in a batch (1.0: always).
        steps: Number of compositions (optimizer steps, or rounds).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ConfigError(
                f"noise_multiplier = {self.noise_multiplier}: must be a finite number > 0"
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate = {self.sample_rate}: must be in (0, 1]")
        if self.steps < 0:
            raise ConfigError(f"steps = {self.steps}: must be >= 0")


def epsilon(
    history: Sequence[GaussianSteps], *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Epsilon at `delta` after every mechanism in `history` (0.0 for an empty history).

    Example:
        >>> round(epsilon([GaussianSteps(noise_multiplier=1.0, sample_rate=0.01, steps=1000)],
        ...               delta=1e-5), 2)
        2.1
    """
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta}: must be in (0, 1)")
    active = [h for h in history if h.steps > 0]
    if not active:
        return 0.0
    # Imported here: opacus imports torch, which the coordinator should not pay for
    # unless it accounts for central DP.
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = np.zeros(len(orders))
    for item in active:
        rdp += rdp_analysis.compute_rdp(
            q=item.sample_rate,
            noise_multiplier=item.noise_multiplier,
            steps=item.steps,
            orders=list(orders),
        )
    with warnings.catch_warnings():
        # Opacus warns when the best order is the grid's smallest (very weak noise). The
        # result is still a valid upper bound, just loose; it is reported as is.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def noise_multiplier_for(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int
) -> float:
    """Smallest noise multiplier (to Opacus's 0.01 tolerance) that keeps epsilon <= target.

    Raises:
        ConfigError: The target is not positive.
    """
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon = {target_epsilon}: must be > 0")
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
    )
    # Opacus searches with its own order grid; make sure ours agrees, nudging up if not.
    while (
        epsilon(
            [GaussianSteps(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)],
            delta=delta,
        )
        > target_epsilon
    ):
        sigma *= 1.01
    return float(sigma)


@dataclass(frozen=True, slots=True, kw_only=True)
class SkellamSum:
    """One release of an integer sum with Skellam noise of total variance `mu`.

    Args:
        mu: Variance of the Skellam noise in the released sum (integer units).
        l1_sensitivity: Largest L1 change of the sum when one party is added or removed.
        l2_sensitivity: Largest L2 change, likewise.
    """

    mu: float
    l1_sensitivity: float
    l2_sensitivity: float

    def rdp(self, orders: Sequence[float]) -> np.ndarray:
        """Rényi DP at each order (Agarwal, Kairouz and Liu, 2021, Theorem 3.5).

        ε(α) = α·Δ2²/(2μ) + min(((2α − 1)·Δ2² + 6·Δ1) / (4μ²), 3·Δ1/(2μ)); the first
        term is the Gaussian mechanism's, the second the price of integers.
        """
        a = np.asarray(orders, dtype=np.float64)
        d1, d2, mu = self.l1_sensitivity, self.l2_sensitivity, self.mu
        return a * d2**2 / (2 * mu) + np.minimum(
            ((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
        )


def total_rdp(
    history: Sequence[GaussianSteps | SkellamSum], *, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP at `orders` of every release in `history` composed."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    total = np.zeros(len(orders))
    for item in history:
        if isinstance(item, SkellamSum):
            total += item.rdp(orders)
        elif item.steps > 0:
            total += rdp_analysis.compute_rdp(
                q=item.sample_rate,
                noise_multiplier=item.noise_multiplier,
                steps=item.steps,
                orders=list(orders),
            )
    return total


def epsilon_from_rdp(
    rdp: np.ndarray, *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Convert accumulated RDP at `orders` into epsilon at `delta` (Balle et al., 2020)."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta}: must be in (0, 1)")
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)
