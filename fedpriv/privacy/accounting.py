"""Privacy accounting: pure functions from a mechanism history to (epsilon, delta).

The epsilon that fedpriv prints, budgets and ledgers is the tightest bound it can
prove for the history:

- Gaussian releases without sampling (``sample_rate = 1``, DP-FedAvg rounds):
  exact. T Gaussian mechanisms with multipliers z_i compose to one Gaussian
  mechanism with mu = sqrt(sum z_i^-2), whose epsilon at delta is found by a root
  finder on Balle and Wang's (2018) analytic formula.
- Poisson-subsampled Gaussian releases (DP-SGD steps): the privacy loss random
  variable (PRV) accountant of Gopi, Lee and Wutschitz (2021), computed with
  Opacus's PRV code. Its *upper* estimate is used: the true epsilon lies below it
  (to within ``eps_error`` of the estimate), at ``delta`` less ``delta / 1000``.
- Anything with a Skellam release (distributed DP): Rényi DP (Mironov 2017) at
  integer orders only, where Agarwal, Kairouz and Liu's (2021) bound is proven.

The Rényi DP bound of the same history (converted with the conversion of Balle et
al. 2020 that Opacus implements) is always computed beside it: it is reported as
``epsilon_rdp``, and the smaller of the two upper bounds is the one used. Nothing
here holds state: the ledger and the coordinator own their histories.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpriv.errors import ConfigError

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_ORDERS",
    "INTEGER_ORDERS",
    "PRV_EPSILON_ERROR",
    "Accountant",
    "GaussianSteps",
    "PrivacySpent",
    "SkellamSum",
    "account",
    "epsilon",
    "epsilon_from_rdp",
    "epsilon_rdp",
    "gaussian_epsilon",
    "noise_multiplier_for",
    "total_rdp",
]

logger = logging.getLogger(__name__)

# δ at which every ε is reported unless a config says otherwise (keep it below 1/N records).
DEFAULT_DELTA = 1e-5

# Integer orders are the only ones at which every RDP bound fedpriv uses holds
# (Skellam's needs them); small ones matter for large epsilon, large ones for small.
INTEGER_ORDERS: tuple[float, ...] = (*map(float, range(2, 64)), 128.0, 256.0, 512.0)

# Opacus's fine fractional grid near 1 plus the integer orders (with the large orders
# of Google's dp-accounting): for the subsampled Gaussian, fractional orders are proven.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted({1 + x / 10.0 for x in range(1, 100)} | set(INTEGER_ORDERS))
)

# The PRV accountant's epsilon is its estimate plus at most this much, or 0.1% of
# the RDP bound where that is larger: the printed figure stays within max(1%, 0.01)
# of the true epsilon, and a 2,250-step history accounts in under a second (a finer
# mesh costs time in proportion).
PRV_EPSILON_ERROR = 0.005
_PRV_RELATIVE_ERROR = 1e-3


class Accountant(enum.Enum):
    """Which analysis produced an epsilon."""

    EXACT = "exact"
    """No release, or Gaussian releases without sampling (Balle and Wang 2018)."""
    PRV = "prv"
    """Numerical composition of privacy loss random variables (Gopi et al. 2021)."""
    RDP = "rdp"
    """Rényi DP (Mironov 2017): Skellam releases, or where it beat the PRV bound."""


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
        term is the Gaussian mechanism's, the second the price of integers. The
        theorem holds for integer α ≥ 1 only, so every other order gets ∞ and can
        never be the one an epsilon is read at.

        Example:
            >>> SkellamSum(mu=100.0, l1_sensitivity=1.0, l2_sensitivity=1.0).rdp([1.5, 2.0])
            array([     inf, 0.010225])
        """
        a = np.asarray(orders, dtype=np.float64)
        d1, d2, mu = self.l1_sensitivity, self.l2_sensitivity, self.mu
        bound = a * d2**2 / (2 * mu) + np.minimum(
            ((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
        )
        proven = (a >= 1) & (a == np.floor(a))
        return np.where(proven, bound, np.inf)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySpent:
    """The epsilon of a history at `delta`, with the RDP bound beside it.

    Args:
        epsilon: The tightest proven epsilon (the one to print, budget and ledger).
        epsilon_rdp: The Rényi DP bound of the same history (never below `epsilon`).
        delta: The delta both are computed at.
        accountant: The analysis `epsilon` came from.
    """

    epsilon: float
    epsilon_rdp: float
    delta: float
    accountant: Accountant


def account(history: Sequence[GaussianSteps | SkellamSum], *, delta: float) -> PrivacySpent:
    """Epsilon at `delta` after every release in `history`, by the tightest analysis.

    Raises:
        ConfigError: `delta` is not in (0, 1).

    Example:
        >>> rounds = [GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=4)]
        >>> spent = account(rounds, delta=1e-5)
        >>> spent.accountant.value, round(spent.epsilon, 3), round(spent.epsilon_rdp, 3)
        ('exact', 9.997, 10.726)
    """
    _check_delta(delta)
    rdp_bound = epsilon_rdp(history, delta=delta)
    if any(isinstance(item, SkellamSum) for item in history):
        return PrivacySpent(
            epsilon=rdp_bound, epsilon_rdp=rdp_bound, delta=delta, accountant=Accountant.RDP
        )
    groups = _group([h for h in history if isinstance(h, GaussianSteps)])
    if not groups:
        return PrivacySpent(epsilon=0.0, epsilon_rdp=0.0, delta=delta, accountant=Accountant.EXACT)
    if all(q == 1.0 for _, q, _ in groups):
        mu = math.sqrt(sum(steps / z**2 for z, _, steps in groups))
        exact = gaussian_epsilon(mu, delta=delta)
        return PrivacySpent(
            epsilon=exact, epsilon_rdp=rdp_bound, delta=delta, accountant=Accountant.EXACT
        )
    tight = _prv_epsilon(
        groups, delta=delta, eps_error=max(PRV_EPSILON_ERROR, _PRV_RELATIVE_ERROR * rdp_bound)
    )
    if tight is None or tight >= rdp_bound:
        return PrivacySpent(
            epsilon=rdp_bound, epsilon_rdp=rdp_bound, delta=delta, accountant=Accountant.RDP
        )
    return PrivacySpent(
        epsilon=tight, epsilon_rdp=rdp_bound, delta=delta, accountant=Accountant.PRV
    )


def epsilon(history: Sequence[GaussianSteps | SkellamSum], *, delta: float) -> float:
    """The tightest proven epsilon at `delta` after `history` (0.0 for an empty one).

    Example:
        >>> round(epsilon([GaussianSteps(noise_multiplier=1.0, sample_rate=0.01, steps=1000)],
        ...               delta=1e-5), 2)
        1.83
    """
    return account(history, delta=delta).epsilon


def epsilon_rdp(
    history: Sequence[GaussianSteps | SkellamSum],
    *,
    delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """The Rényi DP bound at `delta` after `history` (0.0 for an empty one).

    Args:
        history: Releases, in any order.
        delta: Target delta.
        orders: RDP orders; by default `DEFAULT_ORDERS`, or `INTEGER_ORDERS` when the
            history holds a Skellam release.

    Example:
        >>> round(epsilon_rdp([GaussianSteps(noise_multiplier=1.0, sample_rate=0.01,
        ...                                  steps=1000)], delta=1e-5), 2)
        2.1
    """
    _check_delta(delta)
    if not any(isinstance(h, SkellamSum) or h.steps > 0 for h in history):
        return 0.0
    if orders is None:
        skellam = any(isinstance(h, SkellamSum) for h in history)
        orders = INTEGER_ORDERS if skellam else DEFAULT_ORDERS
    return epsilon_from_rdp(total_rdp(history, orders=orders), delta=delta, orders=orders)


def total_rdp(
    history: Sequence[GaussianSteps | SkellamSum], *, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP at `orders` of every release in `history` composed."""
    total = np.zeros(len(orders))
    for item in history:
        if isinstance(item, SkellamSum):
            total += item.rdp(orders)
        elif item.steps > 0:
            total += item.steps * _rdp_per_step(
                item.sample_rate, item.noise_multiplier, tuple(orders)
            )
    return total


def epsilon_from_rdp(
    rdp: np.ndarray, *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Convert accumulated RDP at `orders` into epsilon at `delta` (Balle et al., 2020)."""
    _check_delta(delta)
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # Opacus warns when the best order is the grid's smallest (very weak noise). The
        # result is still a valid upper bound, just loose; it is reported as is.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def gaussian_epsilon(mu: float, *, delta: float) -> float:
    """Exact epsilon at `delta` of a Gaussian mechanism with sensitivity/sigma = `mu`.

    Solves δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) = `delta` (Balle and Wang 2018,
    Theorem 8) and rounds up, so the result is never below the true epsilon.

    Raises:
        ConfigError: `mu` is not a finite number > 0, or `delta` not in (0, 1).

    Example:
        >>> round(gaussian_epsilon(1.0, delta=1e-5), 3)
        4.377
    """
    _check_delta(delta)
    if not mu > 0 or not math.isfinite(mu):
        raise ConfigError(f"mu = {mu}: must be a finite number > 0")
    from scipy import optimize, special  # imported here, like opacus: not every caller needs it

    def excess(eps: float) -> float:
        head = float(special.ndtr(-eps / mu + mu / 2))
        tail = math.exp(eps + float(special.log_ndtr(-eps / mu - mu / 2)))
        return head - tail - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
    root = float(optimize.brentq(excess, 0.0, high, xtol=1e-12, rtol=1e-14))
    while excess(root) > 0:  # brentq may land a hair below the root
        root += 1e-12 * max(1.0, root)
    return root


def noise_multiplier_for(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) whose `epsilon` is <= the target.

    The search runs on fedpriv's own `epsilon` (the tight accountant), so the noise it
    returns always meets the target as the ledger will account it.

    Raises:
        ConfigError: The target is not positive, `steps` < 1, or it needs a noise
            multiplier above 1e6.
    """
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon = {target_epsilon}: must be > 0")
    if steps < 1:
        raise ConfigError(f"steps = {steps}: must be >= 1 to calibrate noise")

    def spent(sigma: float) -> float:
        run = GaussianSteps(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return epsilon([run], delta=delta)

    low, high = 0.0, 1.0
    eps_high = spent(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ConfigError(
                f"target_epsilon = {target_epsilon} at delta = {delta} needs a noise "
                f"multiplier above 1e6 for {steps} steps at sample rate {sample_rate}; "
                "raise the target or train for fewer steps"
            )
        eps_high = spent(high)
    # Invariant: spent(high) <= target < spent(low) (spent(0) is infinite).
    while target_epsilon - eps_high > 0.01 and high - low > 1e-6 * high:
        middle = (low + high) / 2
        eps_middle = spent(middle)
        if eps_middle <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta}: must be in (0, 1)")


def _group(history: Sequence[GaussianSteps]) -> list[tuple[float, float, int]]:
    """Merge runs of one (noise, rate) and all unsampled ones: composition commutes."""
    steps: dict[tuple[float, float], int] = {}
    inverse_variance = 0.0
    for item in history:
        if item.steps == 0:
            continue
        if item.sample_rate == 1.0:
            # Unsampled Gaussians compose exactly into one Gaussian: add their mu^2.
            inverse_variance += item.steps / item.noise_multiplier**2
        else:
            key = (item.noise_multiplier, item.sample_rate)
            steps[key] = steps.get(key, 0) + item.steps
    groups = [(z, q, n) for (z, q), n in steps.items()]
    if inverse_variance > 0:
        groups.append((1.0 / math.sqrt(inverse_variance), 1.0, 1))
    return groups


@functools.lru_cache(maxsize=256)
def _rdp_per_step(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]
) -> np.ndarray:
    # Imported here: opacus imports torch, which the coordinator should not pay for
    # unless it accounts for central DP.
    from opacus.accountants.analysis import rdp as rdp_analysis

    per_step = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
        ),
        dtype=np.float64,
    )
    per_step.setflags(write=False)  # shared by every caller through the cache
    return per_step


def _prv_epsilon(
    groups: Sequence[tuple[float, float, int]], *, delta: float, eps_error: float
) -> float | None:
    """Upper bound on epsilon by the PRV accountant, or None where it cannot give one.

    This is Opacus's `PRVAccountant.get_epsilon` with its domain bound computed from
    fedpriv's cached RDP (the same construction, Gopi et al. 2021 remark 5.6).
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    delta_error = delta / 1000
    total_steps = sum(n for _, _, n in groups)
    whole = [GaussianSteps(noise_multiplier=z, sample_rate=q, steps=n) for z, q, n in groups]
    # The domain must hold all but delta_error/4 of the composed loss and all but
    # delta_error/(8T) of each step's; RDP bounds both tails.
    half_width = epsilon_rdp(whole, delta=delta_error / 4, orders=DEFAULT_ORDERS)
    for z, q, _ in groups:
        one = GaussianSteps(noise_multiplier=z, sample_rate=q, steps=1)
        half_width = max(
            half_width,
            epsilon_rdp([one], delta=delta_error / (8 * total_steps), orders=DEFAULT_ORDERS),
        )
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    try:
        # q = 1 makes log(1 - q) = -inf in Opacus's densities, which is the right limit.
        with np.errstate(divide="ignore"):
            domain = Domain.create_aligned(-half_width, half_width, mesh)
            discrete = [
                discretize(
                    TruncatedPrivacyRandomVariable(
                        PoissonSubsampledGaussianPRV(q, z), domain.t_min, domain.t_max
                    ),
                    domain,
                )
                for z, q, _ in groups
            ]
            composed = compose_heterogeneous(
                dprvs=discrete, num_self_compositions=[n for _, _, n in groups]
            )
            _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    except (ValueError, RuntimeError) as err:
        # Opacus refuses where floating point would dominate (tiny delta) or the
        # discretisation drifts; the RDP bound, still valid, is used instead.
        logger.warning("prv accountant unavailable, using rdp: %s", err)
        return None
    upper = float(upper)
    return max(upper, 0.0) if math.isfinite(upper) else None
