"""SecAgg+ neighbour graphs (Bell et al., CCS 2020): who masks and shares with whom.

Over the complete graph every silo masks with all n − 1 others and shares its
secrets among all of them. SecAgg+ replaces it with a sparse graph of degree
k = O(log n): a silo masks with its k neighbours only, and Shamir-shares its
two secrets among its neighbourhood (itself and its neighbours, k + 1 silos)
with a threshold t per neighbourhood.

The graph is the Harary graph H(k, n) over the round's silos in an order no
single party chooses. Each silo commits to a random 32-byte contribution when
it advertises its keys, and opens it once the key list is fixed; the order is
keyed by the hash of every contribution. The coordinator sees the
commitments, not the contributions, before it must fix the list, so it cannot
steer the graph by choosing whom to list; it cannot leave out an opened
contribution either, because every listed silo needs all of them.

:func:`plan` picks k and t from n, the fraction of silos the operator lets
drop out after sharing, and the silos that may collude with the coordinator.
Both failure probabilities are exact hypergeometric tails under a uniformly
random order, summed over silos (a union bound):

- **correctness**: some silo's secret has fewer than t shares among the
  survivors of its neighbourhood, so the round cannot unmask (it fails with no
  model published) — at most 2^-η;
- **security**: the honest survivors' graph falls apart (then the coordinator
  learns the sum of each part, not only the total), or t colluders sit in one
  neighbourhood (then they recover a survivor's mask key) — at most 2^-σ.

The byte layouts of the commitment, the seed and the order are in
docs/secure-aggregation.md, for silos in other languages.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

__all__ = [
    "CONTRIBUTION_BYTES",
    "GraphPlan",
    "commitment",
    "graph_seed",
    "harary_neighbours",
    "plan",
    "security_failure",
    "correctness_failure",
    "refusal",
]

CONTRIBUTION_BYTES = 32
_COMMIT_LABEL = b"fedpriv/v1/secagg/graph-commit"
_SEED_LABEL = b"fedpriv/v1/secagg/graph-seed"
_ROUND = struct.Struct(">Q")
# Bell et al. use σ = 40 bits of security and η = 30 bits of correctness.
DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 30
#: The share of a round's silos assumed to collude with the coordinator, by default.
DEFAULT_CORRUPT_FRACTION = 0.05


def _field(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"a bound name is {len(raw)} bytes long, at most 65535 allowed")
    return len(raw).to_bytes(2, "big") + raw


def _prefix(label: bytes, *, session: str, round: int) -> bytes:
    return label + b"\x00" + _field(session) + _ROUND.pack(round)


def commitment(*, session: str, round: int, silo: str, contribution: bytes) -> bytes:
    """SHA-256 commitment of `silo` to its graph `contribution` in one round.

    ``SHA-256(label || 0x00 || lp(session) || u64(round) || lp(silo) || contribution)``
    """
    if len(contribution) != CONTRIBUTION_BYTES:
        raise ValueError(f"a graph contribution is {CONTRIBUTION_BYTES} bytes")
    data = _prefix(_COMMIT_LABEL, session=session, round=round) + _field(silo) + contribution
    return hashlib.sha256(data).digest()


def graph_seed(*, session: str, round: int, contributions: Mapping[str, bytes]) -> bytes:
    """The round's graph seed: SHA-256 over every silo's opened contribution, by name.

    ``SHA-256(label || 0x00 || lp(session) || u64(round) || Σ_silo lp(silo) || contribution)``
    with the silos in the order of their names' UTF-8 bytes.
    """
    data = bytearray(_prefix(_SEED_LABEL, session=session, round=round))
    for silo in sorted(contributions, key=str.encode):
        value = contributions[silo]
        if len(value) != CONTRIBUTION_BYTES:
            raise ValueError(f"a graph contribution is {CONTRIBUTION_BYTES} bytes")
        data += _field(silo) + value
    return hashlib.sha256(bytes(data)).digest()


def harary_neighbours(
    silos: Sequence[str], *, degree: int, seed: bytes
) -> dict[str, frozenset[str]]:
    """Each silo's neighbours in H(`degree`, n) over the order that `seed` keys.

    The order sorts the silos by ``HMAC-SHA256(seed, name)``; silo i's
    neighbours are those at positions i ± 1 … i ± degree/2 (mod n).

    Raises:
        ValueError: `degree` is odd, below 2, or not below n.
    """
    n = len(silos)
    if degree < 2 or degree % 2 or degree >= n:
        raise ValueError(f"a Harary graph of {n} silos needs an even degree in [2, {n - 1}]")
    order = sorted(silos, key=lambda s: (hmac.digest(seed, s.encode(), "sha256"), s.encode()))
    half = degree // 2
    return {
        silo: frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d)
        for i, silo in enumerate(order)
    }


@cache
def _tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P(X ≥ at_least) for X ~ Hypergeometric(population, marked, draws)."""
    if at_least <= 0:
        return 1.0
    top = min(marked, draws)
    if at_least > top:
        return 0.0
    total = math.comb(population, draws)
    hits = sum(
        math.comb(marked, x) * math.comb(population - marked, draws - x)
        for x in range(at_least, top + 1)
    )
    return hits / total


def correctness_failure(*, silos: int, degree: int, threshold: int, dropped: int) -> float:
    """Union bound on P(some secret has fewer than t surviving holders), `dropped` silos gone.

    A survivor's secret has shares at itself and its k neighbours, a dropped
    silo's at its k neighbours only; only survivors reveal.
    """
    n, k, t, d = silos, degree, threshold, dropped
    if d == 0:
        return 0.0 if t <= k + 1 else 1.0
    # A dropped silo: too many of its k neighbours among the other d - 1 dropped ones.
    gone = d * _tail(n - 1, d - 1, k, k - t + 1)
    # A survivor holds its own share: too many of its k neighbours among the d dropped.
    alive = (n - d) * _tail(n - 1, d, k, k + 2 - t)
    return min(1.0, gone + alive)


def security_failure(
    *, silos: int, degree: int, threshold: int, dropped: int, colluders: int
) -> float:
    """Union bound on P(the honest survivors' graph splits, or t colluders share a neighbourhood).

    The honest survivors of H(k, n) stay connected unless two runs of k/2
    consecutive silos of the order are all removed (dropped or colluding), and
    2 · (k/2) given positions are all removed with probability
    ``Π_{i<k} (r − i)/(n − i)``; there are at most n(n − 1)/2 pairs of runs.
    """
    n, k, t = silos, degree, threshold
    removed = dropped + colluders
    split = 0.0
    if removed >= k:
        product = 1.0
        for i in range(k):
            product *= (removed - i) / (n - i)
        split = n * (n - 1) / 2 * product
    # An honest silo's mask key: t of its k neighbours among the colluders.
    recovered = n * _tail(n - 1, colluders, k, t) if colluders else 0.0
    return min(1.0, split + recovered)


@dataclass(frozen=True, slots=True)
class GraphPlan:
    """The graph of one round: degree, threshold and their failure probabilities.

    Args:
        silos: n, silos in the round.
        degree: k, neighbours per silo (n − 1: the complete graph).
        threshold: t, shares that recover a secret, per neighbourhood of k + 1.
        dropped: Silos that may drop out after sharing while the round still unmasks.
        colluders: Silos that may collude with the coordinator.
        security: Bound on the probability that the coordinator learns more than the sum.
        correctness: Bound on the probability that the round cannot unmask.
    """

    silos: int
    degree: int
    threshold: int
    dropped: int
    colluders: int
    security: float
    correctness: float

    @property
    def complete(self) -> bool:
        """Whether every silo neighbours every other."""
        return self.degree >= self.silos - 1

    @property
    def min_survivors(self) -> int:
        """Survivors a round needs to unmask under this plan."""
        return self.silos - self.dropped

    @property
    def masks_per_silo(self) -> int:
        """Keystreams of the model's size each silo expands: its self mask and k pairwise."""
        return self.degree + 1

    def describe(self) -> str:
        """One line for the coordinator's log."""
        kind = "complete" if self.complete else "harary"
        return (
            f"graph={kind} silos={self.silos} k={self.degree} t={self.threshold} "
            f"dropouts_tolerated={self.dropped} colluders_tolerated={self.colluders} "
            f"p_security<={self.security:.1e} p_correctness<={self.correctness:.1e}"
        )


def complete_plan(*, silos: int, threshold: int, colluders: int = 0) -> GraphPlan:
    """The complete graph with threshold t: it unmasks while t silos survive."""
    return GraphPlan(
        silos=silos,
        degree=silos - 1,
        threshold=threshold,
        dropped=silos - threshold,
        colluders=colluders,
        security=0.0,
        correctness=0.0,
    )


def plan(
    *,
    silos: int,
    dropout: float,
    colluders: int = 0,
    security_bits: int = DEFAULT_SECURITY_BITS,
    correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
) -> GraphPlan | None:
    """The sparsest Harary graph whose failure bounds meet 2^-σ and 2^-η, or None.

    `dropout` is the fraction of the round's silos that may drop after sharing
    (rounded down to whole silos). t is the smallest threshold above half of a
    neighbourhood (so that no split roster yields both secrets of one silo)
    that meets both bounds. None: no degree below n − 1 does (use the complete graph).
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout {dropout}: must be in [0, 1)")
    n = silos
    dropped = math.floor(dropout * n + 1e-9)
    security_max = 2.0**-security_bits
    correctness_max = 2.0**-correctness_bits
    for k in range(2, n - 1, 2):
        for t in range(k // 2 + 1, k + 2):
            if 2 * t <= k + 1:
                continue
            correct = correctness_failure(silos=n, degree=k, threshold=t, dropped=dropped)
            if correct > correctness_max:
                break  # a larger t only needs more survivors
            secure = security_failure(
                silos=n, degree=k, threshold=t, dropped=dropped, colluders=colluders
            )
            if secure <= security_max:
                return GraphPlan(
                    silos=n,
                    degree=k,
                    threshold=t,
                    dropped=dropped,
                    colluders=colluders,
                    security=secure,
                    correctness=correct,
                )
    return None


def refusal(
    *,
    silos: int,
    degree: int,
    threshold: int,
    max_dropped: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    security_bits: int = DEFAULT_SECURITY_BITS,
) -> str | None:
    """Why a silo should refuse the sparse graph a coordinator announced, or None.

    The coordinator plans k and t from settings the silos cannot see; a silo
    judges the announced graph against its own assumption instead: with
    ``ceil(corrupt_fraction · n)`` silos colluding and up to `max_dropped`
    dropping, the security bound must stay within 2^-`security_bits`. The
    complete graph (degree 0) is judged by its majority threshold instead.

    Example:
        >>> refusal(silos=100, degree=20, threshold=11, max_dropped=10) is None
        True
        >>> refusal(silos=100, degree=4, threshold=3, max_dropped=1)[:35]
        'the announced graph (100 silos, k=4'
    """
    if not degree:
        return None
    colluders = math.ceil(corrupt_fraction * silos)  # as the coordinator plans it
    failure = security_failure(
        silos=silos, degree=degree, threshold=threshold, dropped=max_dropped, colluders=colluders
    )
    if failure <= 2.0**-security_bits:
        return None
    return (
        f"the announced graph ({silos} silos, k={degree}, t={threshold}, up to {max_dropped} "
        f"dropping) fails with probability up to {failure:.1e} if {colluders} silos collude "
        f"with the coordinator, above this silo's 2^-{security_bits} "
        "([limits] secagg_corrupt_fraction, secagg_security_bits); this silo takes no part"
    )
