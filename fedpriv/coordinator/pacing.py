"""Rounds that the slowest silo does not pace: a step budget per silo from its reported pace.

Each silo reports how long one local step took in its last round and how many
steps a round's full work is (``Resources``, sent at join and with every
result). With ``[rounds] pace = "balanced"`` the coordinator gives a silo whose
full work would take longer than the median silo's a budget, ``max_steps``,
in its task config: as many steps as fit in the median silo's round time (at
least one, at least ``min_work`` of its full work, never more than fit in 90% of
the round's deadline). Faster silos keep their full
work. A silo whose pace is unknown (before its first round, or a DP silo that
does not share it) does its full work. ``pace = "slowest"`` (the default) gives
no budget: every round waits for the slowest silo, as without a policy.

A budget only shortens a silo's local training; its update is averaged as
before. Under DP fewer steps spend less: the silo's ledger records the steps it
took.

Membership changes in one case only (:func:`cannot_answer`): with ``pace =
"balanced"``, a silo whose single step takes more than 90% of the deadline
could not answer in time even on a one-step budget. The round leaves it out
while the others still reach ``min_results``, instead of waiting for it until
the deadline and making it train (and, under DP, spend) for an update that
would be refused. After ``PROBE_AFTER`` rounds left out it takes part again,
so that its pace is measured anew.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Collection, Mapping

from fedpriv.wire.resources import Resources

__all__ = ["PROBE_AFTER", "Pace", "cannot_answer", "step_budgets"]

# A silo within this factor of the median's round time keeps its full work.
TOLERANCE = 1.1
# The share of the round's deadline a budget may fill.
DEADLINE_SHARE = 0.9
#: Rounds a silo that cannot answer in time is left out before it takes part again.
PROBE_AFTER = 5


class Pace(enum.StrEnum):
    """How the coordinator sets each silo's local work."""

    SLOWEST = "slowest"  # every silo does its full work; the slowest sets the pace
    BALANCED = "balanced"  # slow silos get a step budget that fits the median's time


def step_budgets(
    pace: Pace,
    resources: Mapping[str, Resources],
    silos: Collection[str],
    *,
    min_work: float = 0.1,
    deadline_s: float | None = None,
) -> dict[str, int]:
    """``max_steps`` for each selected silo that should do less than its full work.

    With `deadline_s`, no budget lets a silo's steps take more than 90% of it (at
    least one step), so that a silo slower than the median still answers in time.

    Example:
        >>> fast, slow = Resources(step_seconds=0.1, full_steps=40), Resources(
        ...     step_seconds=0.4, full_steps=40)
        >>> step_budgets(Pace.BALANCED, {"a": fast, "b": fast, "c": slow}, ["a", "b", "c"])
        {'c': 10}
        >>> step_budgets(Pace.SLOWEST, {"a": fast, "b": fast, "c": slow}, ["a", "b", "c"])
        {}
    """
    if pace is Pace.SLOWEST:
        return {}
    times = {
        silo: seconds
        for silo in silos
        if silo in resources and (seconds := resources[silo].round_seconds) is not None
    }
    if len(times) < 2:
        return {}
    target = statistics.median(times.values())
    if deadline_s is not None:
        target = min(target, DEADLINE_SHARE * deadline_s)
    budgets = {}
    for silo, seconds in sorted(times.items()):
        if seconds <= target * TOLERANCE:
            continue
        reported = resources[silo]
        fits = math.floor(target / reported.step_seconds)
        floor = math.ceil(min_work * reported.full_steps)
        steps = max(floor, min(reported.full_steps, fits))
        if deadline_s is not None:  # the floor must not outlast the deadline either
            steps = min(steps, math.floor(DEADLINE_SHARE * deadline_s / reported.step_seconds))
        budgets[silo] = max(1, steps)
    return budgets


def cannot_answer(
    pace: Pace, resources: Mapping[str, Resources], silos: Collection[str], *, deadline_s: float
) -> dict[str, float]:
    """The silos whose one local step takes more than 90% of `deadline_s`: {silo: seconds}.

    Only with ``Pace.BALANCED`` and a known pace.

    Example:
        >>> slow = Resources(step_seconds=70.0, full_steps=40)
        >>> cannot_answer(Pace.BALANCED, {"a": slow}, ["a"], deadline_s=60)
        {'a': 70.0}
        >>> cannot_answer(Pace.SLOWEST, {"a": slow}, ["a"], deadline_s=60)
        {}
    """
    if pace is Pace.SLOWEST:
        return {}
    return {
        silo: resources[silo].step_seconds
        for silo in sorted(silos)
        if silo in resources
        and resources[silo].round_seconds is not None
        and resources[silo].step_seconds > DEADLINE_SHARE * deadline_s
    }
