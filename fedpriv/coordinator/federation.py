"""The rounds state machine: who is connected, which task each silo gets, when a round ends.

Everything here is plain Python with explicit state; the gRPC servicer only
translates messages. One background thread (``run``) drives the rounds; RPC
threads call ``join``, ``pull_task``, ``open_upload`` and ``complete_upload``.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.coordinator.audit import AuditKind
from fedpriv.coordinator.checkpoint import drop_page_cache
from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.guarantees import FederationGuarantee, SpendGuard, release_mode
from fedpriv.coordinator.privacy_record import RoundPrivacy
from fedpriv.coordinator.release_ledger import FederationAccount, Mechanism, Release
from fedpriv.coordinator.sessions import SessionRegistry
from fedpriv.coordinator.store import StagedRound, Store
from fedpriv.coordinator.upload import SpoolPool, Upload, UploadResult
from fedpriv.errors import ConfigError, ProtocolError, RoundFailed, UpdateRejected
from fedpriv.faults import FaultPoint, reach
from fedpriv.privacy.central import ClipState, add_gaussian_noise, secure_generator
from fedpriv.secagg import RingCodec, ServerSession
from fedpriv.secagg.server import RingSum
from fedpriv.strategy import Aggregator, NoisyAggregator, Strategy
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import Compression, DType, Model, TensorLayout, TensorSpec

__all__ = ["Assignment", "Federation", "RoundReporter", "RoundSummary", "TaskKind"]

logger = logging.getLogger(__name__)


class TaskKind(enum.Enum):
    """What a silo is asked to do (values equal the proto enum)."""

    WAIT = fleet_pb2.TASK_KIND_WAIT
    TRAIN = fleet_pb2.TASK_KIND_TRAIN
    EVALUATE = fleet_pb2.TASK_KIND_EVALUATE
    FINISHED = fleet_pb2.TASK_KIND_FINISHED


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """The answer to one PullTask call."""

    kind: TaskKind
    task_id: str = ""
    round: int = 0
    config: Mapping[str, Scalar] = field(default_factory=dict)
    model: Model | None = None
    deadline_unix_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SiloState:
    """One silo as the coordinator sees it now."""

    name: str
    seconds_since_seen: float
    live: bool
    round_outcome: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationStatus:
    """A snapshot for operators (``fedpriv status``)."""

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


class _LogReporter:
    def round_completed(self, summary: RoundSummary) -> None:
        logger.info(
            "round=%d accepted=%d selected=%d metrics=%s duration_s=%.2f",
            summary.round,
            summary.accepted,
            summary.selected,
            dict(summary.evaluation_metrics),
            summary.duration_s,
        )

    def round_failed(self, round: int, reason: str) -> None:
        logger.warning("round=%d failed reason=%s", round, reason)


@dataclass(slots=True, kw_only=True)
class _SecAggRound:
    """Secure aggregation state of one TRAIN phase."""

    session: ServerSession
    codec: RingCodec
    layout: TensorLayout
    ring: RingSum


@dataclass(slots=True)
class _Phase:
    """One task (TRAIN or EVALUATE) sent to a set of silos in one round."""

    kind: TaskKind
    round: int
    tasks: dict[str, str]
    model: Model
    config: Mapping[str, Scalar]
    deadline: float
    deadline_unix_s: float
    aggregator: Aggregator | None
    clip_norm: float | None = None
    secagg: _SecAggRound | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    results: list[UploadResult] = field(default_factory=list)
    total_weight: float = 0.0
    bytes_received: int = 0
    closed: bool = False
    # Accepted uploads being folded now; the phase's sum is read only when none is.
    folding: int = 0
    # Why a fold broke off half way (the sum is then unusable and the round fails).
    fold_error: str | None = None

    @property
    def pending(self) -> int:
        return len(self.tasks) - len(self.outcomes)

    @property
    def accepted(self) -> int:
        return len(self.results)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


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


class Federation:
    """Schedules rounds and keeps the state every RPC needs.

    Args:
        config: Coordinator configuration.
        strategy: Aggregation rule.
        store: Durable state.
        model: Current global model.
        next_round: First round to run (1, or last committed + 1 after a restart).
        reporter: Receives round events.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        strategy: Strategy,
        store: Store,
        model: Model,
        next_round: int,
        reporter: RoundReporter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._rounds = config.rounds
        self._strategy = strategy
        self._store = store
        self._model = model
        self._next_round = next_round
        self._reporter = reporter or _LogReporter()
        self._clock = clock
        self._cond = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._told_finished: set[str] = set()
        # Silos whose secure-aggregation shares did not authenticate at their peers and
        # made an attempt fail: left out of the round's further attempts.
        self._benched: set[str] = set()
        self._phase: _Phase | None = None
        self._finished = next_round > self._rounds.num_rounds
        self._stop = threading.Event()
        self._started = clock()
        # Upload spools, reused so their page-cache pages are rewritten, not reallocated.
        concurrent = max(config.rounds.min_clients, config.rounds.max_clients)
        self._spools = SpoolPool(store.directory / "spool", keep=max(8, 2 * concurrent))
        self._last_round_metrics: dict[str, float] = {}
        # The last round's checkpoint, written but not yet durable, and its summary.
        self._staged: StagedRound | None = None
        self._staged_summary: RoundSummary | None = None
        # A silo that neither polls nor heartbeats for this long counts as gone.
        self.liveness_s = max(3.0 * config.heartbeat_interval_s, config.poll_wait_s + 10.0)
        # One session per identity: a second connection is refused or takes over.
        self.sessions = SessionRegistry(
            liveness_s=self.liveness_s,
            clock=clock,
            audit=store.audit,
            last_activity=self._last_seen.get,
        )
        self._clip: ClipState | None = None
        # Every silo-level release so far, central (Gaussian) or distributed (Skellam).
        self._account: FederationAccount | None = None
        if config.secure_aggregation is not None:
            bad = [s.describe() for s in model.layout.specs if not s.dtype.is_floating]
            if bad:
                raise ConfigError(
                    "secure_aggregation = true needs a model of floating-point tensors only; "
                    f"this one also has {', '.join(bad)}"
                )
        if self._rounds.update_compression is not Compression.NONE:
            bad = [s.describe() for s in model.layout.specs if s.dtype is not DType.FLOAT32]
            if bad:
                raise ConfigError(
                    f"rounds.update_compression = {self._rounds.update_compression.value!r} "
                    f"needs a float32 model; this one also has {', '.join(bad)}"
                )
        if config.dp is not None:
            self._resume_dp(strategy, model)
        # What the rounds committed so far released, for the federation's guarantee,
        # and what each silo reported last, so that a silo's epsilon never goes down.
        self._guarantee = FederationGuarantee(
            {r: m for r, m in store.round_privacy().items() if r < next_round},
            claimed=config.dp is not None,
        )
        self._spends = SpendGuard(store.silo_spends())

    def _resume_dp(self, strategy: Strategy, model: Model) -> None:
        """Check the strategy can add noise; rebuild the accountant and clipping norm."""
        assert self.config.dp is not None  # caller checked
        if self.config.secure_aggregation is None and not isinstance(
            strategy.begin_round(0, model=model), NoisyAggregator
        ):
            raise ConfigError(
                f"[dp] needs a strategy whose aggregator can add noise; {strategy.name!r} cannot"
            )
        # The release ledger holds every committed round's release (rounds before
        # next_round): the accountant's history and the adaptive norm come from it.
        self._account = FederationAccount.resume(
            self._store.releases, next_round=self._next_round, delta=self.config.dp.delta
        )
        clip_norm = self._account.next_clip_norm
        # Only an adaptive norm carries over a restart; a fixed one is the configured one.
        self._clip = ClipState(
            self.config.dp, clip_norm=clip_norm if self.config.dp.adaptive else None
        )

    # ---- state read by the servicer and status ------------------------------------------

    @property
    def model(self) -> Model:
        """The current global model."""
        return self._model

    @property
    def finished(self) -> bool:
        """Whether every round has completed."""
        return self._finished

    def available(self) -> list[str]:
        """Silos seen within the liveness window, sorted."""
        now = self._clock()
        with self._cond:
            return sorted(s for s, t in self._last_seen.items() if now - t <= self.liveness_s)

    def status(self) -> FederationStatus:
        """What the federation is doing now, for operators."""
        now = self._clock()
        with self._cond:
            phase = self._phase
            outcomes: dict[str, str] = {}
            if phase is not None:
                outcomes = {s: phase.outcomes.get(s, "pending") for s in phase.tasks}
            if self._finished:
                state = "finished"
            elif self._stop.is_set():
                state = "stopped"
            elif phase is None:
                state = "waiting"
            else:
                state = "training" if phase.kind is TaskKind.TRAIN else "evaluating"
            silos = [
                SiloState(
                    name=name,
                    seconds_since_seen=now - seen,
                    live=now - seen <= self.liveness_s,
                    round_outcome=outcomes.get(name, ""),
                )
                for name, seen in sorted(self._last_seen.items())
            ]
            silos += [
                SiloState(name=name, seconds_since_seen=-1.0, live=False, round_outcome=outcome)
                for name, outcome in sorted(outcomes.items())
                if name not in self._last_seen
            ]
            return FederationStatus(
                federation=self.config.federation,
                state=state,
                round=min(self._next_round, self._rounds.num_rounds),
                num_rounds=self._rounds.num_rounds,
                completed_rounds=self._next_round - 1,
                min_clients=self._rounds.min_clients,
                silos=silos,
                last_round_metrics=dict(self._last_round_metrics),
                uptime_s=now - self._started,
                rounds_without_dp=self._guarantee.rounds_without_dp(),
            )

    # ---- RPC entry points -----------------------------------------------------------------

    def _touch(self, silo: str) -> None:
        self._last_seen[silo] = self._clock()

    def join(self, silo: str, *, sdk_version: str = "") -> None:
        """Register `silo` (again, after a restart)."""
        with self._cond:
            self._touch(silo)
            self._cond.notify_all()
        self._store.touch_silo(silo)
        self._audit(AuditKind.JOIN, silo, f"sdk {sdk_version}" if sdk_version else "")
        logger.info("joined silo=%s", silo)

    def _audit(self, kind: AuditKind, silo: str, detail: str) -> None:
        """Record an event of `silo` in the audit log, with its session's peer address."""
        self._store.audit.record(kind, silo, self.sessions.peer(silo), detail)

    def _mark_gone(self, silo: str, detail: str) -> None:
        """Forget `silo` until it calls again, and free its identity (caller holds the lock).

        Its upload broke off: the next attempt must not wait for it to time out.
        """
        self._last_seen.pop(silo, None)
        self._audit(AuditKind.GONE, silo, detail)
        self.sessions.end(silo)

    def heartbeat(self, silo: str) -> bool:
        """Note that `silo` is alive; False if it never joined (it should join again)."""
        with self._cond:
            known = silo in self._last_seen
            if known:
                self._touch(silo)
            return known

    def leave(self, silo: str, reason: str) -> None:
        """Forget `silo`; a task it holds counts as dropped."""
        with self._cond:
            self._last_seen.pop(silo, None)
            phase = self._phase
            if (
                phase
                and silo in phase.tasks
                and silo not in phase.outcomes
                and silo not in phase.uploads
            ):
                self._resolve(phase, silo, "dropped", f"left: {reason}")
            self._cond.notify_all()
        self._audit(AuditKind.LEAVE, silo, reason)
        self.sessions.end(silo)
        logger.info("left silo=%s reason=%s", silo, reason)

    def pull_task(self, silo: str, *, wait_s: float) -> Assignment:
        """Return the silo's next task, waiting up to `wait_s` for one."""
        deadline = self._clock() + max(0.0, min(wait_s, float(self.config.poll_wait_s)))
        with self._cond:
            self._touch(silo)
            while True:
                if self._finished:
                    self._told_finished.add(silo)
                    self._cond.notify_all()
                    return Assignment(kind=TaskKind.FINISHED)
                phase = self._phase
                if (
                    phase is not None
                    and not phase.closed
                    and silo in phase.tasks
                    and silo not in phase.outcomes
                    and silo not in phase.uploads
                ):
                    # Given again if asked again: the silo restarted and lost the first copy.
                    return Assignment(
                        kind=phase.kind,
                        task_id=phase.tasks[silo],
                        round=phase.round,
                        config=phase.config,
                        model=phase.model,
                        deadline_unix_s=phase.deadline_unix_s,
                    )
                remaining = deadline - self._clock()
                if remaining <= 0 or self._stop.is_set():
                    return Assignment(kind=TaskKind.WAIT)
                # A waiting poll must not keep a finished round's model alive.
                phase = None
                self._cond.wait(remaining)

    def decline(self, silo: str, *, task_id: str, round: int, reason: str) -> None:
        """Record that `silo` refused its task (for example: privacy budget exhausted).

        Raises:
            ProtocolError: The silo has no open task with that id.
        """
        with self._cond:
            self._touch(silo)
            phase = self._phase
            if phase is not None and phase.secagg is not None and phase.tasks.get(silo) == task_id:
                # Also after its upload: a survivor that will not reveal is not waited for.
                phase.secagg.session.withdraw(silo, reason[:1000])
            if phase is None or phase.closed or phase.tasks.get(silo) != task_id:
                raise ProtocolError(f"silo {silo!r} has no open task {task_id!r} for round {round}")
            self._resolve(phase, silo, "declined", reason[:1000])
            self._cond.notify_all()

    def open_upload(
        self,
        silo: str,
        *,
        task_id: str,
        round: int,
        kind: TaskKind,
        num_examples: int,
        metrics: Mapping[str, Scalar],
        metric_problems: list[str],
        layout: TensorLayout | None,
        header_problems: list[str],
        compression: str = "",
    ) -> Upload:
        """Check a result header against the silo's task and open its upload.

        Raises:
            ProtocolError: The silo has no open task with that id and round (stale,
                replayed or forged).
            UpdateRejected: The header is invalid; every problem is listed.
        """
        with self._cond:
            self._touch(silo)
            phase = self._phase
            if phase is None or phase.closed or phase.tasks.get(silo) != task_id:
                raise ProtocolError(
                    f"silo {silo!r} has no open task {task_id!r} for round {round}; "
                    "the result is stale or for another silo"
                )
            if silo in phase.uploads:
                raise ProtocolError(
                    f"silo {silo!r} already has an upload open for task {task_id!r}; "
                    "one result per silo and task is taken"
                )
            if silo in phase.outcomes:
                raise ProtocolError(f"silo {silo!r} already sent a result for task {task_id!r}")
            problems = list(header_problems) + list(metric_problems)
            reasons = ["layout"] * len(header_problems) + ["metrics"] * len(metric_problems)
            if round != phase.round:
                problems.append(f"round {round} != {phase.round}, the round of task {task_id!r}")
                reasons.append("round")
            if kind is not phase.kind:
                problems.append(f"result kind {kind.name} != task kind {phase.kind.name}")
                reasons.append("kind")
            if not 0 < num_examples <= self._rounds.max_num_examples:
                problems.append(
                    f"num_examples {num_examples} must be in [1, {self._rounds.max_num_examples}]"
                    " (rounds.max_num_examples)"
                )
                reasons.append("num_examples")
            announced = (
                self._rounds.update_compression
                if phase.kind is TaskKind.TRAIN and phase.secagg is None
                else Compression.NONE
            )
            if (compression or "none") != announced.value:
                problems.append(
                    f"compression {compression or 'none'!r} != {announced.value!r}, "
                    "the federation's update compression"
                )
                reasons.append("compression")
            if phase.kind is TaskKind.TRAIN:
                spend_problems = self._spends.problems(silo, metrics)
                problems += spend_problems
                reasons += ["privacy"] * len(spend_problems)
            if phase.secagg is not None:
                if not phase.secagg.session.may_upload(silo):
                    problems.append(
                        "this silo did not share its keys: its masks could not be removed"
                    )
                    reasons.append("secagg")
                layout_problems = _compare_layout(layout, phase.secagg.layout)
            elif phase.kind is TaskKind.TRAIN:
                layout_problems = _compare_layout(layout, phase.model.layout)
            else:
                layout_problems = (
                    ["an evaluation result must not carry tensors"]
                    if layout is not None and layout.specs
                    else []
                )
            problems += layout_problems
            reasons += ["layout"] * len(layout_problems)
            if problems:
                self._resolve(phase, silo, "rejected", "; ".join(problems), reason=reasons[0])
                raise UpdateRejected(silo=silo, round=round, problems=problems, reason=reasons[0])
            expected = phase.secagg.layout if phase.secagg is not None else phase.model.layout
            sink: Aggregator | None = (
                phase.aggregator if phase.secagg is None else phase.secagg.ring
            )
            opener = getattr(sink, "open_update", None)
            if opener is not None and phase.kind is TaskKind.TRAIN:
                # Strategies that need whole updates (Flower's) get one sink per silo.
                sink = opener(silo, weight=float(num_examples))
            upload = Upload(
                silo=silo,
                round=phase.round,
                layout=expected if phase.kind is TaskKind.TRAIN else None,
                aggregator=sink,
                num_examples=num_examples,
                metrics=metrics,
                spool_dir=self._store.directory / "spool",
                spools=self._spools,
                on_chunk=lambda: self._last_seen.__setitem__(silo, self._clock()),
                # DP-FedAvg weighs every silo equally: the sum's sensitivity is then C.
                # A ring sum adds each masked update once.
                weight=1.0 if phase.clip_norm is not None or phase.secagg else None,
                base=(
                    phase.model
                    if phase.clip_norm is not None or announced is not Compression.NONE
                    else None
                ),
                clip_norm=phase.clip_norm,
                compression=announced,
                max_value=self._rounds.max_update_value,
            )
            phase.uploads[silo] = upload
            return upload

    def complete_upload(
        self, upload: Upload, *, error: Exception | None = None, broken: bool = False
    ) -> None:
        """Finish `upload`: fold it into the round and accept it, or record why it failed.

        Nothing of an upload is in the round's sum until it is folded here, whole,
        once: an upload that fails or comes too late is dropped, never subtracted.
        An upload whose stream is `broken` (cancelled, disconnected), or that ended
        short with nothing wrong in what arrived, broke off: it is dropped, not
        rejected, and its silo counts as gone until it calls again.

        Raises:
            UpdateRejected: Validation failed at the end of the stream.
            ProtocolError: The round closed before the upload completed.
        """
        result: UploadResult | None = None
        failure: Exception | None = error
        if failure is None:
            try:
                result = upload.finish()
            except (UpdateRejected, ProtocolError) as err:
                failure = err
            if upload.broke_off:
                broken = True
                failure = ProtocolError(
                    f"the upload of silo {upload.silo!r} for round {upload.round} broke off "
                    f"after {upload.bytes_in} bytes; it counts as dropped"
                )
        else:
            upload.cancel(f"stream broken: {error}")
            if broken:
                failure = ProtocolError(
                    f"the upload of silo {upload.silo!r} for round {upload.round} broke off "
                    f"(cancelled or disconnected) after {upload.bytes_in} bytes"
                )
        with self._cond:
            phase = self._phase
            current = phase is not None and phase.uploads.get(upload.silo) is upload
            fold = current and phase is not None and result is not None and not phase.closed
            if fold and phase is not None:
                # Left in phase.uploads while it folds (its silo's result is on the way);
                # a closing phase waits for every fold before its sum is read.
                phase.folding += 1
            elif current and phase is not None:
                del phase.uploads[upload.silo]
                if result is not None:
                    upload.release()
                    failure = ProtocolError(
                        f"round {upload.round} closed before the upload completed"
                    )
                    self._resolve(phase, upload.silo, "late", str(failure))
                elif isinstance(failure, UpdateRejected):
                    self._resolve(
                        phase, upload.silo, "rejected", str(failure), reason=failure.reason
                    )
                else:
                    self._resolve(phase, upload.silo, "dropped", str(failure))
            elif result is not None:
                upload.release()
                failure = ProtocolError(f"round {upload.round} closed before the upload completed")
            if broken:
                self._mark_gone(upload.silo, str(failure))
            self._cond.notify_all()
        if fold and phase is not None and result is not None:
            self._fold(phase, upload, result)
        if failure is not None and error is None:
            raise failure

    def _fold(self, phase: _Phase, upload: Upload, result: UploadResult) -> None:
        """Fold an accepted upload into the phase's sum (outside the lock), then accept it.

        Raises:
            OSError: The spool could not be read back; the round fails.
        """
        try:
            upload.fold()
        except Exception as err:
            with self._cond:
                phase.folding -= 1
                del phase.uploads[upload.silo]
                detail = f"folding the update of silo {upload.silo!r} failed: {err}"
                phase.fold_error = phase.fold_error or detail
                self._resolve(phase, upload.silo, "dropped", detail)
                self._cond.notify_all()
            raise
        with self._cond:
            phase.folding -= 1
            del phase.uploads[upload.silo]
            phase.results.append(result)
            phase.bytes_received += result.bytes_received
            if phase.aggregator is not None:
                phase.total_weight += (
                    1.0
                    if phase.clip_norm is not None or phase.secagg is not None
                    else result.num_examples
                )
            self._resolve(phase, upload.silo, "accepted", "", result)
            if phase.kind is TaskKind.TRAIN:
                self._spends.note(phase.round, upload.silo, result.metrics)
            self._cond.notify_all()

    def _resolve(
        self,
        phase: _Phase,
        silo: str,
        outcome: str,
        detail: str,
        result: UploadResult | None = None,
        *,
        reason: str = "",
    ) -> None:
        """Record a silo's outcome for the phase (caller holds the lock)."""
        if silo in phase.outcomes:
            return
        phase.outcomes[silo] = outcome
        if outcome == "rejected":
            self._audit(AuditKind.REJECTED, silo, f"round {phase.round}: {detail}")
            rejected = getattr(self._reporter, "update_rejected", None)
            if rejected is not None:
                rejected(silo=silo, round=phase.round, reason=reason or "invalid", detail=detail)
        if outcome != "accepted":
            logger.warning(
                "[%s] silo=%s round=%d outcome=%s detail=%s",
                phase.kind.name,
                silo,
                phase.round,
                outcome,
                detail,
            )
        self._store.record_participant(
            round=phase.round,
            task=phase.kind.name.lower(),
            silo=silo,
            outcome=outcome,
            num_examples=result.num_examples if result else 0,
            bytes_received=result.bytes_received if result else 0,
            detail=detail,
        )

    # ---- the rounds loop ------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to return soon."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Free the kept upload spools (after ``stop`` and the server's shutdown)."""
        self._spools.close()

    def run(self) -> None:
        """Run rounds until all are complete or ``stop`` is called.

        Raises:
            RoundFailed: A round failed ``max_failed_attempts`` times in a row.
        """
        failures = 0
        try:
            while self._next_round <= self._rounds.num_rounds and not self._stop.is_set():
                silos = self._wait_for_silos()
                if silos is None:
                    return
                try:
                    self._run_round(self._next_round, silos)
                except RoundFailed as err:
                    failures += 1
                    self._reporter.round_failed(self._next_round, str(err))
                    if failures >= self._rounds.max_failed_attempts:
                        raise RoundFailed(
                            f"round {self._next_round} failed {failures} times in a row; "
                            f"last: {err}"
                        ) from err
                    continue
                failures = 0
                self._benched.clear()
                self._next_round += 1
        finally:
            self._commit_staged()
        with self._cond:
            self._finished = self._next_round > self._rounds.num_rounds
            self._cond.notify_all()

    def wait_until_silos_told(self, timeout_s: float) -> bool:
        """After the last round, wait until every live silo has been told FINISHED."""
        end = self._clock() + timeout_s
        with self._cond:
            while True:
                now = self._clock()
                live = {s for s, t in self._last_seen.items() if now - t <= self.liveness_s}
                if live <= self._told_finished:
                    return True
                if now >= end:
                    return False
                self._cond.wait(min(0.5, end - now))

    def _wait_for_silos(self) -> list[str] | None:
        needed = self._rounds.min_clients
        announced = False
        while not self._stop.is_set():
            available = [s for s in self.available() if s not in self._benched]
            if len(available) >= needed:
                if self._rounds.max_clients and len(available) > self._rounds.max_clients:
                    available = sorted(
                        secrets.SystemRandom().sample(available, self._rounds.max_clients)
                    )
                return available
            if not announced:
                logger.info("waiting for silos have=%d need=%d", len(available), needed)
                announced = True
            self._commit_staged()  # no round stays uncommitted while the federation waits
            with self._cond:
                self._cond.wait(1.0)
        return None

    def _open_phase(
        self, kind: TaskKind, round: int, silos: list[str], deadline_s: float
    ) -> _Phase:
        secure = kind is TaskKind.TRAIN and self.config.secure_aggregation is not None
        aggregator = (
            self._strategy.begin_round(round, model=self._model)
            if kind is TaskKind.TRAIN and not secure
            else None
        )
        config = dict(self._rounds.client_config)
        config["round"] = round
        if (
            kind is TaskKind.TRAIN
            and not secure
            and self._rounds.update_compression is not Compression.NONE
        ):
            config["compression"] = self._rounds.update_compression.value
        tasks = {silo: uuid.uuid4().hex for silo in silos}
        deadline = self._clock() + deadline_s
        secagg = self._open_secagg(round, tasks, deadline, config) if secure else None
        phase = _Phase(
            kind=kind,
            round=round,
            tasks=tasks,
            model=self._model,
            config=config,
            deadline=deadline,
            deadline_unix_s=time.time() + deadline_s,
            aggregator=aggregator if secagg is None else secagg.ring,
            clip_norm=(
                self._clip.clip_norm
                if self._clip and kind is TaskKind.TRAIN and secagg is None
                else None
            ),
            secagg=secagg,
        )
        with self._cond:
            self._phase = phase
            self._cond.notify_all()
        logger.info("[%s] round=%d silos=%s", kind.name, round, ",".join(silos))
        return phase

    def _alive(self, silo: str) -> bool:
        seen = self._last_seen.get(silo)
        return seen is not None and self._clock() - seen <= self.liveness_s

    def _open_secagg(
        self, round: int, tasks: Mapping[str, str], deadline: float, config: dict[str, Scalar]
    ) -> _SecAggRound:
        """Plan the ring and start the session; announce both in the task config."""
        settings = self.config.secure_aggregation
        assert settings is not None  # caller checked
        threshold = settings.threshold_for(len(tasks))
        size = sum(spec.numel for spec in self._model.layout.specs)
        dp = self.config.dp
        codec = RingCodec.plan(
            clip_norm=dp.clip_norm if dp is not None else settings.clip_norm,
            size=size,
            clients=len(tasks),
            threshold=threshold,
            noise_multiplier=dp.noise_multiplier if dp is not None else 0.0,
            tolerate_colluders=settings.tolerate_colluders,
        )
        layout = TensorLayout.from_specs(
            [TensorSpec(name="secagg", dtype=DType.INT32, shape=(size,))],
            chunk_bytes=self._model.layout.chunk_bytes,
        )
        session = ServerSession(
            session=uuid.uuid4().hex,
            round=round,
            tasks=tasks,
            threshold=threshold,
            deadline=deadline,
            alive=self._alive,
            clock=self._clock,
            on_refused=self._secagg_refused,
        )
        config.update(
            {
                "secagg.session": session.session,
                "secagg.threshold": threshold,
                "secagg.clip_norm": codec.clip_norm,
                "secagg.scale": codec.scale,
                "secagg.size": size,
                "secagg.noise_variance": codec.noise_variance,
                "secagg.chunk_bytes": layout.chunk_bytes,
            }
        )
        return _SecAggRound(
            session=session,
            codec=codec,
            layout=layout,
            ring=RingSum(size, chunk_bytes=layout.chunk_bytes),
        )

    def _secagg_refused(self, silo: str, reason: str) -> None:
        """A silo's secure-aggregation keys or shares were refused: it is out of the round."""
        with self._cond:
            phase = self._phase
            if phase is not None and phase.secagg is not None and silo in phase.tasks:
                self._resolve(phase, silo, "rejected", reason[:1000], reason="secagg")
                self._cond.notify_all()

    def secagg_session(self, silo: str, task_id: str) -> ServerSession:
        """The secure-aggregation session of `silo`'s open TRAIN task.

        Raises:
            ProtocolError: No such task, or the round has no secure aggregation.
        """
        with self._cond:
            self._touch(silo)
            phase = self._phase
            if phase is None or phase.secagg is None or phase.tasks.get(silo) != task_id:
                raise ProtocolError(
                    f"silo {silo!r} has no secure-aggregation task {task_id!r} in this round"
                )
            return phase.secagg.session

    def _unmask(self, train: _Phase, started_unix: float) -> tuple[Model, dict[str, float]]:
        """Remove the masks from the ring sum and decode the new model (secure aggregation)."""
        secagg = train.secagg
        assert secagg is not None and self.config.secure_aggregation is not None
        survivors = [r.silo for r in train.results]
        session = secagg.session
        try:
            if len(survivors) < session.threshold:
                raise RoundFailed(
                    f"round {train.round}: {len(survivors)} masked updates, "
                    f"{session.threshold} needed to unmask; no model is published"
                )
            session.set_roster(survivors)
            session.wait_for_shares(
                until=self._clock() + self.config.secure_aggregation.unmask_deadline_s
            )
            unmask_started = time.perf_counter()
            session.unmask_sum(secagg.ring.total)
            logger.info(
                "unmasked round=%d survivors=%d dropped=%d unmask_s=%.3f",
                train.round,
                len(survivors),
                len(secagg.session.tasks) - len(survivors),
                time.perf_counter() - unmask_started,
            )
        except RoundFailed as err:
            session.cancel(str(err))
            if session.blamed:
                self._benched.update(session.blamed)
                logger.warning(
                    "round=%d benched=%s until the round completes (shares did not authenticate)",
                    train.round,
                    ",".join(session.blamed),
                )
            self._store.record_attempt(
                round=train.round, started_unix_s=started_unix, outcome="failed", detail=str(err)
            )
            raise
        session.cancel("the round's secure aggregation is complete")
        total = secagg.codec.decode(secagg.ring.total)
        total /= len(survivors)
        arrays = {}
        position = 0
        for spec, current in zip(
            self._model.layout.specs, self._model.arrays().values(), strict=True
        ):
            part = total[position : position + spec.numel].reshape(spec.shape)
            position += spec.numel
            arrays[spec.name] = (current.astype(np.float64) + part).astype(current.dtype)
        self._model.evict(0, self._model.layout.payload_bytes)
        model = Model.from_arrays(arrays, layout=self._model.layout)
        metrics: dict[str, float] = {"survivors": float(len(survivors))}
        dp = self.config.dp
        if dp is not None:
            # Up to k colluding survivors know (and can subtract) their own noise: only
            # the other survivors' noise counts towards the guarantee.
            colluders = self.config.secure_aggregation.tolerate_colluders
            mu = (len(survivors) - colluders) * secagg.codec.noise_variance
            release = Release(
                round=train.round,
                mechanism=Mechanism.SKELLAM,
                noise_multiplier=dp.noise_multiplier,
                skellam_mu=mu,
                l1_sensitivity=secagg.codec.l1_sensitivity,
                l2_sensitivity=secagg.codec.l2_sensitivity,
                clip_norm=secagg.codec.clip_norm,
                colluders_tolerated=colluders,
                delta=dp.delta,
            )
            assert self._account is not None  # set with config.dp
            accounted = self._account.spend(release)
            spent = accounted.epsilon
            metrics.update(
                {
                    "epsilon": spent,
                    "epsilon_rdp": accounted.epsilon_rdp,
                    "delta": dp.delta,
                    "skellam_mu": mu,
                    "l1_sensitivity": secagg.codec.l1_sensitivity,
                    "l2_sensitivity": secagg.codec.l2_sensitivity,
                    "clip_norm": secagg.codec.clip_norm,
                    "noise_multiplier": dp.noise_multiplier,
                    "colluders_tolerated": float(colluders),
                }
            )
            logger.info(
                "distributed dp round=%d epsilon=%.4f delta=%g colluders_tolerated=%d",
                train.round,
                spent,
                dp.delta,
                colluders,
            )
        return model, metrics

    def _wait_phase(self, phase: _Phase, *, needed: int) -> None:
        """Wait until every silo answered, the deadline passed, or `needed` is out of reach."""
        with self._cond:
            while not self._stop.is_set():
                now = self._clock()
                for silo in phase.tasks:
                    seen = self._last_seen.get(silo)
                    gone = seen is None or now - seen > self.liveness_s
                    if gone and silo not in phase.outcomes and silo not in phase.uploads:
                        self._resolve(phase, silo, "dropped", "stopped polling and heartbeating")
                if phase.pending == 0 or now >= phase.deadline:
                    break
                if phase.accepted + phase.pending < needed:
                    break
                self._cond.wait(min(0.5, phase.deadline - now))
            phase.closed = True
            open_uploads = list(phase.uploads.values())
        for upload in open_uploads:
            if upload.cancel(f"round {phase.round} closed (deadline) before the upload completed"):
                with self._cond:
                    self._resolve(phase, upload.silo, "late", "deadline passed during upload")
        with self._cond:
            # Uploads accepted before the phase closed are being folded: the sum is read
            # only once they are all in (each notifies when its fold ends).
            self._cond.wait_for(lambda: phase.folding == 0)
            for silo in phase.tasks:
                if silo not in phase.outcomes and silo not in phase.uploads:
                    self._resolve(phase, silo, "timeout", "no result before the deadline")

    def _run_round(self, round: int, silos: list[str]) -> None:
        started = self._clock()
        started_unix = time.time()
        needed = self._rounds.required_results
        train = self._open_phase(TaskKind.TRAIN, round, silos, self._rounds.deadline_s)
        # The silos download the last round's model while it is made durable.
        self._commit_staged()
        self._wait_phase(train, needed=needed)
        if train.fold_error is not None:
            self._fail_attempt(round, started_unix, train.fold_error)
        if train.accepted < needed or train.aggregator is None:
            detail = (
                f"{train.accepted} of {len(silos)} updates accepted, {needed} needed "
                f"(rejected={train.count('rejected')} dropped={train.count('dropped')} "
                f"late={train.count('late') + train.count('timeout')})"
            )
            self._store.record_attempt(
                round=round, started_unix_s=started_unix, outcome="failed", detail=detail
            )
            raise RoundFailed(f"round {round}: {detail}; the global model is unchanged")
        if train.secagg is not None:
            model, federation_metrics = self._unmask(train, started_unix)
        else:
            if isinstance(train.aggregator, NoisyAggregator):
                # Checked before the noise, so that a failed attempt leaves the privacy
                # accounting and the adaptive norm as they were.
                self._check_finite(
                    round, started_unix, _nonfinite_sums(train.aggregator, train.model.layout)
                )
            federation_metrics = self._privatize(train)
            model = train.aggregator.finalize(total_weight=train.total_weight)
        self._check_finite(round, started_unix, _nonfinite_tensors(model))
        reach(FaultPoint.AFTER_FOLD_BEFORE_COMMIT)
        privacy = release_mode(self.config)
        federation_metrics = self._guarantee.record(round, privacy, federation_metrics)
        fit_metrics = weighted_means(train.results)
        silo_metrics = {r.silo: dict(r.metrics) for r in train.results}
        metrics: dict[str, Mapping[str, Scalar]] = {"fit": fit_metrics}
        metrics.update({f"silo:{silo}": values for silo, values in silo_metrics.items()})
        if federation_metrics:
            metrics["federation"] = federation_metrics
        # The served model's file is superseded: its pages become the new checkpoint's.
        drop_page_cache(self._store.checkpoint_path(round - 1))
        # The privacy spend is committed with the model it paid for, and with the
        # round's metrics and attempt: one transaction, one fsync. The checkpoint is
        # written now; it becomes durable (fsync, rename, transaction) once the next
        # phase has opened, so that the silos download while the disk syncs.
        staged = self._store.stage_round(
            round=round,
            model=model,
            started_unix_s=started_unix,
            selected=len(silos),
            accepted=train.accepted,
            total_weight=train.total_weight,
            metrics=metrics,
            record_attempt=True,
            privacy=privacy,
        )
        # Served from the checkpoint's pages from now on: the buffer `model` was summed
        # in is free for the next round's sum, so the process holds one model, not two.
        served = self._store.load_checkpoint(staged.temporary)
        with self._cond:
            self._model = served
            self._staged = staged
        if self.config.dp is not None:
            # A noised model's privacy spend is on disk before any silo can download it.
            self._commit_staged()
        evaluation: dict[str, float] = {}
        if self._rounds.federated_evaluation:
            evaluators = [r.silo for r in train.results if r.silo in self.available()]
            phase = self._open_phase(
                TaskKind.EVALUATE, round, evaluators, self._rounds.evaluation_deadline_s
            )
            self._commit_staged()
            # Wait for every evaluator (or the deadline): a missing one must not cut the others.
            self._wait_phase(phase, needed=min(1, len(evaluators)))
            evaluation = weighted_means(phase.results)
            self._store.record_metrics(round=round, source="evaluate", values=evaluation)
        last = {**fit_metrics, **evaluation}
        last.update({f"federation_{k}": v for k, v in federation_metrics.items()})
        epsilons = [float(v["epsilon"]) for v in silo_metrics.values() if "epsilon" in v]
        if epsilons:
            last["max_silo_epsilon"] = max(epsilons)
        with self._cond:
            self._phase = None
            self._last_round_metrics = last
        summary = RoundSummary(
            round=round,
            num_rounds=self._rounds.num_rounds,
            selected=len(silos),
            joined=len(self.available()),
            accepted=train.accepted,
            rejected=train.count("rejected"),
            dropped=len(silos) - train.accepted - train.count("rejected") - train.count("declined"),
            declined=train.count("declined"),
            fit_metrics=fit_metrics,
            evaluation_metrics=evaluation,
            silo_metrics=silo_metrics,
            federation_metrics=federation_metrics,
            bytes_received=train.bytes_received,
            duration_s=self._clock() - started,
            privacy=privacy,
        )
        if self._staged is None:
            self._reporter.round_completed(summary)
        else:  # reported once durable: a round shown as completed survives a crash
            self._staged_summary = summary

    def _check_finite(self, round: int, started_unix: float, nonfinite: list[str]) -> None:
        """Fail the attempt if the new model (or its sum) holds NaN or infinite values.

        Raises:
            RoundFailed: `nonfinite` names a tensor; nothing is committed.
        """
        if nonfinite:
            self._fail_attempt(
                round,
                started_unix,
                f"the aggregate is not finite ({'; '.join(nonfinite)}); no model is published. "
                "Every accepted update was within rounds.max_update_value and "
                "rounds.max_num_examples: lower them so that their sum stays finite",
            )

    def _fail_attempt(self, round: int, started_unix: float, detail: str) -> None:
        """Record a failed attempt at `round` and end it.

        Raises:
            RoundFailed: Always; the global model is unchanged.
        """
        self._store.record_attempt(
            round=round, started_unix_s=started_unix, outcome="failed", detail=detail
        )
        raise RoundFailed(f"round {round}: {detail}")

    def _commit_staged(self) -> None:
        """Make the staged round durable and report it (no-op when none is staged).

        Raises:
            StoreError: It could not be written; the round is not committed.
        """
        with self._cond:
            staged, summary = self._staged, self._staged_summary
            self._staged = self._staged_summary = None
        if staged is None:
            return
        self._store.commit_staged(staged)
        if summary is not None:
            self._reporter.round_completed(summary)

    def _privatize(self, train: _Phase) -> dict[str, float]:
        """DP-FedAvg: noise the sum of clipped updates and adapt the norm (no-op without [dp])."""
        if self._clip is None or train.clip_norm is None:
            return {}
        dp = self._clip.dp
        aggregator = train.aggregator
        assert isinstance(aggregator, NoisyAggregator)  # checked at start
        rng = secure_generator()
        stddev = self._clip.noise_stddev()
        aggregator.perturb_sums(lambda sums: add_gaussian_noise(sums, stddev=stddev, rng=rng))
        adaptive: dict[str, float] = {}
        if dp.adaptive:
            # Releases only the centred count, noised, over the configured expected_clients
            # (sensitivity 1/2, accounted in update_noise_multiplier); fixed clipping releases
            # no count at all, since none is accounted.
            unclipped = sum(1 for r in train.results if r.clip_scale == 1.0)
            adaptive = {
                "unclipped_fraction": self._clip.update(
                    unclipped=unclipped, count=train.accepted, rng=rng
                ),
                "clipped_count_stddev": dp.count_stddev,
                "count_sensitivity": dp.count_sensitivity,
            }
        assert self._account is not None  # set with self._clip
        # Every silo takes part in every round (no sampling amplification is claimed).
        accounted = self._account.spend(  # exact: Gaussian, q = 1
            Release(
                round=train.round,
                mechanism=Mechanism.GAUSSIAN,
                noise_multiplier=dp.noise_multiplier,
                l2_sensitivity=train.clip_norm,
                clip_norm=train.clip_norm,
                next_clip_norm=self._clip.clip_norm,
                delta=dp.delta,
            )
        )
        spent = accounted.epsilon
        logger.info(
            "dp round=%d clip_norm=%.4g noise_stddev=%.4g epsilon=%.4f delta=%g",
            train.round,
            train.clip_norm,
            stddev,
            spent,
            dp.delta,
        )
        return {
            "epsilon": spent,
            "epsilon_rdp": accounted.epsilon_rdp,
            "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier,
            "clip_norm": train.clip_norm,
            "noise_stddev": stddev,
            "next_clip_norm": self._clip.clip_norm,
            **adaptive,
        }


def _nonfinite_tensors(model: Model) -> list[str]:
    """``"name: N NaN or infinite values"`` for each floating-point tensor that has any."""
    problems = []
    for spec, values in zip(model.layout.specs, model.arrays().values(), strict=True):
        if spec.dtype.is_floating:
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(f"{spec.name}: {bad} NaN or infinite values")
    return problems


def _nonfinite_sums(aggregator: NoisyAggregator, layout: TensorLayout) -> list[str]:
    """Like :func:`_nonfinite_tensors`, for an aggregator's running sums (only read)."""
    counts: list[int] = []

    def count(sums: npt.NDArray[np.floating]) -> None:
        counts.append(sums.size - int(np.count_nonzero(np.isfinite(sums))))

    aggregator.perturb_sums(count)
    names = (
        [spec.name for spec in layout.specs]
        if len(counts) == len(layout.specs)
        else [f"sum {index}" for index in range(len(counts))]
    )
    return [
        f"{name}: {bad} NaN or infinite values"
        for name, bad in zip(names, counts, strict=True)
        if bad
    ]


def _compare_layout(layout: TensorLayout | None, expected: TensorLayout) -> list[str]:
    """List every difference between an update's layout and the global model's."""
    if layout is None:
        return ["a training result must carry the updated tensors"]
    problems = []
    got = {s.name: s for s in layout.specs}
    want = {s.name: s for s in expected.specs}
    for name in want.keys() - got.keys():
        problems.append(f"{name}: missing")
    for name in got.keys() - want.keys():
        problems.append(f"{name}: not in the model")
    for name in want.keys() & got.keys():
        w, g = want[name], got[name]
        if g.shape != w.shape:
            problems.append(f"{name}: shape {g.shape} != expected {w.shape}")
        if g.dtype is not w.dtype:
            problems.append(
                f"{name}: dtype {g.dtype.name.lower()} != expected {w.dtype.name.lower()}"
            )
    if not problems and [s.name for s in layout.specs] != [s.name for s in expected.specs]:
        problems.append("tensors are in a different order than the model's")
    if not problems and layout.chunk_bytes != expected.chunk_bytes:
        problems.append(f"chunk_bytes {layout.chunk_bytes} != the model's {expected.chunk_bytes}")
    return sorted(problems)
