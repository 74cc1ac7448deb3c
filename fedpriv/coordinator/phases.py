"""The vocabulary of a round: task kinds, outcomes, rejection reasons, and one open phase.

A round has a TRAIN phase and, optionally, an EVALUATE phase. Each phase sends
one task to each selected silo and ends with an :class:`Outcome` per silo.
Everything here is plain data: the round loop (``federation.py``) changes it
under its lock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fedpriv._types import Scalar
from fedpriv.coordinator.privacy_record import RoundPrivacy
from fedpriv.secagg.settings import SecAggSettings
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import Compression, Model

if TYPE_CHECKING:
    from fedpriv.coordinator.modes import Announcement, RoundAggregation
    from fedpriv.coordinator.upload import Upload, UploadResult

__all__ = [
    "Assignment",
    "FederationState",
    "Outcome",
    "Phase",
    "Reason",
    "RejectionReporter",
    "RoundReporter",
    "RoundSummary",
    "TaskKind",
]


class TaskKind(enum.Enum):
    """What a silo is asked to do (values equal the proto enum)."""

    WAIT = fleet_pb2.TASK_KIND_WAIT
    TRAIN = fleet_pb2.TASK_KIND_TRAIN
    EVALUATE = fleet_pb2.TASK_KIND_EVALUATE
    FINISHED = fleet_pb2.TASK_KIND_FINISHED


class Outcome(enum.StrEnum):
    """How one silo's task in one phase ended (stored in the participants table)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # the update broke a rule
    DROPPED = "dropped"  # the silo went away, or its upload broke off
    DECLINED = "declined"  # the silo refused the task (privacy budget, user error)
    LATE = "late"  # the deadline passed during its upload
    TIMEOUT = "timeout"  # no result before the deadline
    # The round was called off before the deadline (too few results could still arrive):
    # the silo did nothing wrong, and its result is not wanted.
    CANCELLED = "cancelled"


class Reason(enum.StrEnum):
    """Why an update was rejected: the kind of its first problem (a metrics label)."""

    LAYOUT = "layout"
    METRICS = "metrics"
    ROUND = "round"
    KIND = "kind"
    NUM_EXAMPLES = "num_examples"
    COMPRESSION = "compression"
    PRIVACY = "privacy"  # the reported epsilon went down
    SECAGG = "secagg"
    NON_FINITE = "non_finite"
    BOUNDS = "bounds"  # a value beyond rounds.max_update_value
    STREAM = "stream"
    INVALID = "invalid"


class FederationState(enum.StrEnum):
    """What the federation is doing (``fedpriv status``)."""

    WAITING = "waiting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    STOPPED = "stopped"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """The answer to one PullTask call."""

    kind: TaskKind
    task_id: str = ""
    round: int = 0
    config: Mapping[str, Scalar] = field(default_factory=dict)
    model: Model | None = None
    deadline_unix_s: float = 0.0
    # Set on a TRAIN task of a secure-aggregation round.
    secagg: SecAggSettings | None = None
    compression: Compression = Compression.NONE
    # On FINISHED: why the federation stopped without completing ("" when it completed).
    stop_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundSummary:
    """What happened in one completed round."""

    round: int
    num_rounds: int
    selected: int
    joined: int
    accepted: int
    rejected: int
    dropped: int
    declined: int
    fit_metrics: Mapping[str, float]
    evaluation_metrics: Mapping[str, float]
    silo_metrics: Mapping[str, Mapping[str, Scalar]]
    federation_metrics: Mapping[str, float]
    bytes_received: int
    duration_s: float
    privacy: RoundPrivacy = RoundPrivacy.NONE


class RoundReporter(Protocol):
    """Receives round events (the CLI prints them; tests collect them)."""

    def round_completed(self, summary: RoundSummary) -> None:
        """A round's model was committed and evaluated."""
        ...

    def round_failed(self, round: int, reason: str) -> None:
        """An attempt at a round ended without publishing a model."""
        ...


@runtime_checkable
class RejectionReporter(Protocol):
    """A reporter that also wants each rejected update (telemetry counts them)."""

    def update_rejected(self, *, silo: str, round: int, reason: str, detail: str) -> None:
        """An update was rejected; the round goes on without it."""
        ...


@dataclass(slots=True, eq=False)
class Phase:
    """One task (TRAIN or EVALUATE) sent to a set of silos in one round.

    Attributes:
        aggregation: How the TRAIN phase's updates are folded (None for EVALUATE).
        outcomes: Each silo's outcome once it has one.
        details: Why, for each silo with an outcome (the declined reason, ...).
        uploads: Uploads open now (a silo with one has no outcome yet).
        folding: Accepted uploads being folded now; the sum is read only when none is.
        fold_error: Why a fold broke off half way (the sum is unusable; the round fails).
    """

    kind: TaskKind
    round: int
    tasks: dict[str, str]
    model: Model
    config: Mapping[str, Scalar]
    deadline: float
    deadline_unix_s: float
    aggregation: RoundAggregation | None = None
    announcement: Announcement | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    results: list[UploadResult] = field(default_factory=list)
    total_weight: float = 0.0
    bytes_received: int = 0
    closed: bool = False
    folding: int = 0
    fold_error: str | None = None
    # Task config for one silo on top of `config` (a pacing budget: max_steps).
    silo_config: dict[str, dict[str, Scalar]] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Silos without an outcome yet."""
        return len(self.tasks) - len(self.outcomes)

    @property
    def accepted(self) -> int:
        """Updates accepted so far."""
        return len(self.results)

    def count(self, *outcomes: Outcome) -> int:
        """Silos whose outcome is one of `outcomes`."""
        return sum(1 for o in self.outcomes.values() if o in outcomes)

    def takes_result(self, silo: str, task_id: str) -> bool:
        """Whether the phase still waits for `silo`'s result of task `task_id`."""
        return not self.closed and self.tasks.get(silo) == task_id and silo not in self.outcomes

    def waiting_on(self, silo: str) -> bool:
        """Whether `silo` holds a task of this phase with neither an outcome nor an upload."""
        return silo in self.tasks and silo not in self.outcomes and silo not in self.uploads

    def assignment(self, silo: str) -> Assignment:
        """The task of `silo` in this phase, as a PullTask answer."""
        return Assignment(
            kind=self.kind,
            task_id=self.tasks[silo],
            round=self.round,
            config={**self.config, **self.silo_config.get(silo, {})},
            model=self.model,
            deadline_unix_s=self.deadline_unix_s,
            secagg=self.announcement.secagg if self.announcement else None,
            compression=self.announcement.compression if self.announcement else Compression.NONE,
        )


def weighted_means(results: list[UploadResult]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric the results report."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for result in results:
        for name, value in result.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums[name] = sums.get(name, 0.0) + value * result.num_examples
                weights[name] = weights.get(name, 0.0) + result.num_examples
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
