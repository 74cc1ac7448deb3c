"""What the federation may claim: its silo-level guarantee, and each silo's reported spend.

Two small pieces of state the round loop consults, each rebuilt from the store
at start-up:

- :class:`FederationGuarantee` knows which committed rounds ran under silo-level
  DP. A model that went through one round without noise is covered by no
  silo-level guarantee, whatever later rounds add, so the federation's epsilon
  is then none (infinite).
- :class:`SpendGuard` knows the sample-level epsilon each silo last reported in a
  committed round. A silo's spend never goes down; a lower one means its ledger
  was reset or replaced, and its update is refused.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping

from fedpriv._types import Scalar
from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.privacy_record import RoundPrivacy, SiloSpend

__all__ = ["FederationGuarantee", "SpendGuard", "release_mode"]

logger = logging.getLogger(__name__)


def release_mode(config: CoordinatorConfig) -> RoundPrivacy:
    """The silo-level DP a coordinator with `config` runs its rounds under."""
    if config.dp is None:
        return RoundPrivacy.NONE
    if config.secure_aggregation is not None:
        return RoundPrivacy.DISTRIBUTED
    return RoundPrivacy.CENTRAL


class FederationGuarantee:
    """The silo-level DP of every committed round, and what it lets the federation claim.

    Args:
        committed: The release mode of each round committed so far.
        claimed: Whether this coordinator runs silo-level DP now.
    """

    def __init__(self, committed: Mapping[int, RoundPrivacy], *, claimed: bool) -> None:
        self._modes = dict(committed)
        self._claimed = claimed
        self._lock = threading.Lock()  # read by status queries, written by the round loop

    def rounds_without_dp(self) -> tuple[int, ...]:
        """Committed rounds without silo-level DP, if any round claims it (else nothing)."""
        with self._lock:
            modes = dict(self._modes)
        claimed = self._claimed or any(mode is not RoundPrivacy.NONE for mode in modes.values())
        if not claimed:
            return ()
        return tuple(r for r, m in sorted(modes.items()) if m is RoundPrivacy.NONE)

    def record(self, round: int, mode: RoundPrivacy, metrics: dict[str, float]) -> dict[str, float]:
        """Note round `round`'s mode; return its federation metrics as they may be claimed.

        While any round lacked DP, epsilon is none (inf); the accountant's figure
        over the private rounds alone is kept as ``epsilon_dp_rounds``.
        """
        with self._lock:
            self._modes[round] = mode
        without = self.rounds_without_dp()
        if not without:
            return metrics
        guarded = dict(metrics)
        if "epsilon" in guarded:
            guarded["epsilon_dp_rounds"] = guarded["epsilon"]
        guarded["epsilon"] = math.inf
        guarded["rounds_without_dp"] = float(len(without))
        logger.warning(
            "federation epsilon round=%d: none, rounds=%s ran without silo-level DP",
            round,
            ",".join(map(str, without)),
        )
        return guarded


class SpendGuard:
    """The epsilon each silo last reported; refuses one that went down.

    Not locked: the federation calls it under its own lock.

    Args:
        spends: Each silo's last reported spend in a committed round.
    """

    def __init__(self, spends: Mapping[str, SiloSpend]) -> None:
        self._spends = dict(spends)

    def problems(self, silo: str, metrics: Mapping[str, Scalar]) -> list[str]:
        """Why the epsilon `silo` reports cannot be its spend (empty: it can)."""
        last = self._spends.get(silo)
        reported = metrics.get("epsilon")
        if reported is None:
            if last is None:
                return []
            return [
                f"no epsilon reported, though this silo reported {last.epsilon:.4g} in round "
                f"{last.round}: its privacy ledger was removed or disabled, and a spend "
                "cannot go back to unknown"
            ]
        if isinstance(reported, bool) or not isinstance(reported, int | float):
            return [f"epsilon {reported!r} must be a number"]
        if not math.isfinite(reported) or reported < 0:
            return [f"epsilon {reported!r} must be finite and >= 0"]
        if last is None:
            return []
        problems = []
        delta = metrics.get("delta")
        if not math.isnan(last.delta) and delta != last.delta:
            problems.append(
                f"delta {delta!r} != {last.delta:g}, the delta of the epsilon this silo "
                f"reported in round {last.round}: one silo's spend is compared at one delta"
            )
        if reported < last.epsilon:
            problems.append(
                f"epsilon {reported:.4g} is below the {last.epsilon:.4g} (delta {last.delta:g}) "
                f"this silo reported in round {last.round}: a silo's spend never goes down, so "
                "its privacy ledger was reset or replaced; its earlier releases still count"
            )
        return problems

    def note(self, round: int, silo: str, metrics: Mapping[str, Scalar]) -> None:
        """Remember the epsilon of `silo`'s accepted training update in `round`."""
        reported, delta = metrics.get("epsilon"), metrics.get("delta")
        if not isinstance(reported, int | float):
            return
        last = self._spends.get(silo)
        if last is None or reported >= last.epsilon:
            self._spends[silo] = SiloSpend(
                round=round,
                epsilon=float(reported),
                delta=float(delta) if isinstance(delta, int | float) else math.nan,
            )
