"""A read-only view of the federation for operators (``fedpriv status``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedpriv.coordinator.phases import FederationState, Outcome, Phase, TaskKind
from fedpriv.coordinator.registry import SiloRegistry
from fedpriv.wire.resources import Resources

__all__ = ["FederationStatus", "SiloState", "describe"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SiloState:
    """One silo as the coordinator sees it now."""

    name: str
    seconds_since_seen: float
    live: bool
    round_outcome: str
    resources: Resources = Resources()
    max_steps: int = 0  # its step budget in the open round (0: full work)


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationStatus:
    """A snapshot for operators."""

    federation: str
    state: str
    round: int
    num_rounds: int
    completed_rounds: int
    min_clients: int
    silos: list[SiloState]
    last_round_metrics: Mapping[str, float]
    uptime_s: float
    rounds_without_dp: tuple[int, ...] = ()
    bytes_received: int = 0  # by the current phase so far


def describe(
    *,
    federation: str,
    registry: SiloRegistry,
    phase: Phase | None,
    finished: bool,
    stopped: bool,
    next_round: int,
    num_rounds: int,
    min_clients: int,
    last_round_metrics: Mapping[str, float],
    uptime_s: float,
    rounds_without_dp: tuple[int, ...],
) -> FederationStatus:
    """The status of a federation in this state (the caller holds its lock)."""
    outcomes: dict[str, str] = {}
    if phase is not None:
        outcomes = {s: phase.outcomes.get(s, Outcome.PENDING).value for s in phase.tasks}
    if finished:
        state = FederationState.FINISHED
    elif stopped:
        state = FederationState.STOPPED
    elif phase is None:
        state = FederationState.WAITING
    elif phase.kind is TaskKind.TRAIN:
        state = FederationState.TRAINING
    else:
        state = FederationState.EVALUATING
    seen = registry.seen()
    reported = registry.resources()
    budgets = {} if phase is None else phase.silo_config
    silos = [
        SiloState(
            name=name,
            seconds_since_seen=since,
            live=since <= registry.liveness_s,
            round_outcome=outcomes.get(name, ""),
            resources=reported.get(name, Resources()),
            max_steps=int(budgets.get(name, {}).get("max_steps", 0)),
        )
        for name, since in seen
    ]
    known = {name for name, _ in seen}
    silos += [
        SiloState(name=name, seconds_since_seen=-1.0, live=False, round_outcome=outcome)
        for name, outcome in sorted(outcomes.items())
        if name not in known
    ]
    return FederationStatus(
        federation=federation,
        state=state.value,
        round=min(next_round, num_rounds),
        num_rounds=num_rounds,
        completed_rounds=next_round - 1,
        min_clients=min_clients,
        silos=silos,
        last_round_metrics=dict(last_round_metrics),
        uptime_s=uptime_s,
        rounds_without_dp=rounds_without_dp,
        bytes_received=0 if phase is None else phase.bytes_received,
    )
