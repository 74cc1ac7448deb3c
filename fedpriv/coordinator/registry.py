"""Which silos the coordinator knows, which are alive, and which a round selects.

A silo is alive while it polls, heartbeats or streams within the liveness
window of the injected clock. The registry holds no lock of its own: the round
loop calls it under its lock, so that liveness and a phase's outcomes change
together.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection

from fedpriv.wire.resources import Resources

__all__ = ["SiloRegistry"]

logger = logging.getLogger(__name__)


class SiloRegistry:
    """Last activity per silo, and the silos benched from the current round.

    Args:
        liveness_s: A silo silent for longer counts as gone.
        clock: Monotonic seconds.
    """

    def __init__(self, *, liveness_s: float, clock: Callable[[], float]) -> None:
        self.liveness_s = liveness_s
        self._clock = clock
        self._last_seen: dict[str, float] = {}
        self._told_finished: set[str] = set()
        # Silos whose secure-aggregation shares did not authenticate at their peers and
        # made an attempt fail: left out of the round's further attempts.
        self._benched: set[str] = set()
        # What each silo last reported of its hardware and pace (fedpriv.coordinator.pacing).
        self._resources: dict[str, Resources] = {}
        # Rounds in a row each silo was left out by the pacing policy.
        self._left_out: dict[str, int] = {}

    def note_resources(self, silo: str, resources: Resources) -> None:
        """Keep what `silo` reports of its hardware and pace; ignore values that make no sense."""
        problems = resources.problems()
        if problems:
            logger.warning(
                "silo=%s sent unusable resources (ignored): %s", silo, "; ".join(problems)
            )
            return
        self._resources[silo] = resources

    def resources(self) -> dict[str, Resources]:
        """The last resources each silo reported."""
        return dict(self._resources)

    def touch(self, silo: str) -> None:
        """Note activity of `silo` now."""
        self._last_seen[silo] = self._clock()

    def known(self, silo: str) -> bool:
        """Whether `silo` joined and has not left or gone since."""
        return silo in self._last_seen

    def last_seen(self, silo: str) -> float | None:
        """When `silo` was last active (clock seconds), None if not known."""
        return self._last_seen.get(silo)

    def forget(self, silo: str) -> None:
        """Drop `silo` until it calls again."""
        self._last_seen.pop(silo, None)

    def alive(self, silo: str) -> bool:
        """Whether `silo` was active within the liveness window."""
        seen = self._last_seen.get(silo)
        return seen is not None and self._clock() - seen <= self.liveness_s

    def available(self) -> list[str]:
        """Silos alive now, sorted."""
        now = self._clock()
        return sorted(s for s, t in self._last_seen.items() if now - t <= self.liveness_s)

    def seen(self) -> list[tuple[str, float]]:
        """Every known silo and its seconds since last activity, sorted by name."""
        now = self._clock()
        return [(name, now - seen) for name, seen in sorted(self._last_seen.items())]

    def bench(self, silos: Collection[str]) -> None:
        """Leave `silos` out of the current round's further attempts."""
        self._benched.update(silos)

    def unbench(self, silo: str) -> None:
        """Let `silo` take part again (it joined anew)."""
        self._benched.discard(silo)

    def benched(self) -> list[str]:
        """Silos left out of the current round's further attempts, sorted."""
        return sorted(self._benched)

    def round_done(self) -> None:
        """The round completed: benched silos may take part again."""
        self._benched.clear()

    def select(
        self, *, needed: int, at_most: int, avoid: Collection[str] = (), keep: int = 0
    ) -> list[str] | None:
        """Up to `at_most` (0: all) live, unbenched silos at random; None if fewer than `needed`.

        Silos in `avoid` are left out while at least `keep` others remain. The
        sample comes from the OS CSPRNG: a silo cannot predict when it is chosen.
        """
        candidates = [s for s in self.available() if s not in self._benched]
        if len(candidates) < needed:
            return None
        preferred = [s for s in candidates if s not in avoid]
        if avoid and len(preferred) >= max(1, keep):
            candidates = preferred
        if at_most and len(candidates) > at_most:
            candidates = sorted(secrets.SystemRandom().sample(candidates, at_most))
        return candidates

    def left_out_rounds(self, silo: str) -> int:
        """Rounds in a row the pacing policy has left `silo` out."""
        return self._left_out.get(silo, 0)

    def round_selected(self, selected: Collection[str], left_out: Collection[str]) -> None:
        """A round opened with `selected`; the pacing policy left `left_out` out of it."""
        for silo in selected:
            self._left_out.pop(silo, None)
        for silo in left_out:
            self._left_out[silo] = self._left_out.get(silo, 0) + 1

    def told_finished(self, silo: str) -> None:
        """`silo` received FINISHED."""
        self._told_finished.add(silo)

    def all_told_finished(self) -> bool:
        """Whether every live silo has received FINISHED."""
        return set(self.available()) <= self._told_finished
