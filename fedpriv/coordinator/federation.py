"""The federation's shared state and the RPC entry points that change it.

Everything here is plain Python with explicit state; the gRPC servicer only
translates messages. RPC threads call ``join``, ``pull_task``,
``open_upload`` and ``complete_upload``; one background thread
(``run``, in ``rounds.py``) opens and closes the phases. One condition
variable guards the state and wakes whoever waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

from fedpriv._types import Scalar
from fedpriv.coordinator import intake
from fedpriv.coordinator.admission import Header
from fedpriv.coordinator.aggregation import AnyStrategy, build_mode
from fedpriv.coordinator.audit import AuditKind
from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.guarantees import FederationGuarantee, SpendGuard
from fedpriv.coordinator.modes_secagg import SecureRound
from fedpriv.coordinator.phases import (
    Assignment,
    Outcome,
    Phase,
    Reason,
    RejectionReporter,
    RoundReporter,
    RoundSummary,
    TaskKind,
)
from fedpriv.coordinator.registry import SiloRegistry
from fedpriv.coordinator.rounds import RoundLoop
from fedpriv.coordinator.sessions import SessionRegistry
from fedpriv.coordinator.staging import StagedCommit
from fedpriv.coordinator.status import FederationStatus, describe
from fedpriv.coordinator.store import Store
from fedpriv.coordinator.upload import SpoolPool, Upload, UploadResult
from fedpriv.errors import ProtocolError
from fedpriv.secagg import ServerSession
from fedpriv.wire import Model
from fedpriv.wire.resources import Resources

__all__ = ["Assignment", "Federation", "RoundReporter", "RoundSummary", "TaskKind"]

logger = logging.getLogger(__name__)


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


class Federation:
    """Schedules rounds and keeps the state every RPC needs.

    Args:
        config: Coordinator configuration.
        strategy: Aggregation rule (a streaming or a whole-update strategy).
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
        strategy: AnyStrategy,
        store: Store,
        model: Model,
        next_round: int,
        reporter: RoundReporter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.rounds = config.rounds
        self.strategy = strategy
        self.store = store
        self.model = model
        self.next_round = next_round
        self.reporter: RoundReporter = reporter or _LogReporter()
        self.clock = clock
        self.cond = threading.Condition()
        self.phase: Phase | None = None
        self._finished = next_round > self.rounds.num_rounds
        self._stop_reason = ""
        self.stopping = threading.Event()
        self._started = clock()
        self.last_round_metrics: dict[str, float] = {}
        # A silo that neither polls nor heartbeats for this long counts as gone.
        liveness_s = max(3.0 * config.heartbeat_interval_s, config.poll_wait_s + 10.0)
        self.registry = SiloRegistry(liveness_s=liveness_s, clock=clock)
        # One session per identity: a second connection is refused or takes over.
        self.sessions = SessionRegistry(
            liveness_s=liveness_s,
            clock=clock,
            audit=store.audit,
            last_activity=self.registry.last_seen,
        )
        # Upload spools, reused so their page-cache pages are rewritten, not reallocated.
        concurrent = max(config.rounds.min_clients, config.rounds.max_clients)
        self.spools = SpoolPool(store.directory / "spool", keep=max(8, 2 * concurrent))
        self.staged = StagedCommit(store, self.reporter)
        self.mode = build_mode(
            config,
            strategy=strategy,
            store=store,
            model=model,
            next_round=next_round,
            spools=self.spools,
            alive=self._alive,
            clock=clock,
            on_refused=self._secagg_refused,
            bench=self._bench,
        )
        # What the rounds committed so far released, for the federation's guarantee,
        # and what each silo reported last, so that a silo's epsilon never goes down.
        self.guarantee = FederationGuarantee(
            {r: m for r, m in store.round_privacy().items() if r < next_round},
            claimed=config.dp is not None,
        )
        self.spends = SpendGuard(store.silo_spends())
        self._loop = RoundLoop(self)

    # ---- state read by the servicer and status ------------------------------------------

    @property
    def liveness_s(self) -> float:
        """Seconds of silence after which a silo counts as gone."""
        return self.registry.liveness_s

    @property
    def finished(self) -> bool:
        """Whether every round has completed."""
        return self._finished

    def mark_finished(self) -> None:
        """Every round has completed (called by the round loop)."""
        with self.cond:
            self._finished = True
            self.cond.notify_all()

    def mark_failed(self, reason: str) -> None:
        """The federation stopped without completing: every silo that polls is told why."""
        with self.cond:
            self._stop_reason = reason[:1000] or "the federation stopped"
            self.cond.notify_all()

    def available(self) -> list[str]:
        """Silos seen within the liveness window, sorted."""
        with self.cond:
            return self.registry.available()

    def status(self) -> FederationStatus:
        """What the federation is doing now, for operators."""
        with self.cond:
            return describe(
                federation=self.config.federation,
                registry=self.registry,
                phase=self.phase,
                finished=self._finished,
                stopped=self.stopping.is_set(),
                next_round=self.next_round,
                num_rounds=self.rounds.num_rounds,
                min_clients=self.rounds.min_clients,
                last_round_metrics=self.last_round_metrics,
                uptime_s=self.clock() - self._started,
                rounds_without_dp=self.guarantee.rounds_without_dp(),
            )

    # ---- RPC entry points -----------------------------------------------------------------

    def join(self, silo: str, *, sdk_version: str = "", resources: Resources | None = None) -> None:
        """Register `silo` (again, after a restart), with what it reports of its resources."""
        with self.cond:
            self.registry.touch(silo)
            self.registry.unbench(silo)
            if resources is not None:
                self.registry.note_resources(silo, resources)
            self.cond.notify_all()
        self.store.touch_silo(silo)
        self._audit(AuditKind.JOIN, silo, f"sdk {sdk_version}" if sdk_version else "")
        logger.info("joined silo=%s", silo)

    def _audit(self, kind: AuditKind, silo: str, detail: str) -> None:
        """Record an event of `silo` in the audit log, with its session's peer address."""
        self.store.audit.record(kind, silo, self.sessions.peer(silo), detail)

    def mark_gone(self, silo: str, detail: str) -> None:
        """Forget `silo` until it calls again, and free its identity (caller holds the lock).

        Its upload broke off: the next attempt must not wait for it to time out.
        """
        self.registry.forget(silo)
        self._audit(AuditKind.GONE, silo, detail)
        self.sessions.end(silo)

    def note_resources(self, silo: str, resources: Resources) -> None:
        """Keep the resources and pace `silo` sent with a training result."""
        with self.cond:
            self.registry.note_resources(silo, resources)

    def heartbeat(self, silo: str, task_id: str = "") -> tuple[bool, bool]:
        """Note that `silo` is alive: whether it is known, and whether `task_id` is closed.

        Not known: it never joined (it should join again). Closed: the coordinator no
        longer takes that task's result, so the silo must release nothing for it.
        """
        with self.cond:
            known = self.registry.known(silo)
            if known:
                self.registry.touch(silo)
            phase = self.phase
            closed = bool(task_id) and not (phase is not None and phase.takes_result(silo, task_id))
            return known, closed

    def leave(self, silo: str, reason: str) -> None:
        """Forget `silo`; a task it holds counts as dropped."""
        with self.cond:
            self.registry.forget(silo)
            phase = self.phase
            if phase is not None and phase.waiting_on(silo):
                self.resolve(phase, silo, Outcome.DROPPED, f"left: {reason}")
            self.cond.notify_all()
        self._audit(AuditKind.LEAVE, silo, reason)
        self.sessions.end(silo)
        logger.info("left silo=%s reason=%s", silo, reason)

    def pull_task(self, silo: str, *, wait_s: float) -> Assignment:
        """Return the silo's next task, waiting up to `wait_s` for one."""
        deadline = self.clock() + max(0.0, min(wait_s, float(self.config.poll_wait_s)))
        with self.cond:
            self.registry.touch(silo)
            while True:
                if self._finished or self._stop_reason:
                    self.registry.told_finished(silo)
                    self.cond.notify_all()
                    return Assignment(kind=TaskKind.FINISHED, stop_reason=self._stop_reason)
                phase = self.phase
                if phase is not None and not phase.closed and phase.waiting_on(silo):
                    # Given again if asked again: the silo restarted and lost the first copy.
                    return phase.assignment(silo)
                remaining = deadline - self.clock()
                if remaining <= 0 or self.stopping.is_set():
                    return Assignment(kind=TaskKind.WAIT)
                # A waiting poll must not keep a finished round's model alive.
                phase = None
                self.cond.wait(remaining)

    def decline(self, silo: str, *, task_id: str, round: int, reason: str) -> None:
        """Record that `silo` refused its task (for example: privacy budget exhausted).

        Raises:
            ProtocolError: The silo has no open task with that id.
        """
        with self.cond:
            self.registry.touch(silo)
            phase = self.phase
            session = self._secagg_of(phase)
            if session is not None and phase is not None and phase.tasks.get(silo) == task_id:
                # Also after its upload: a survivor that will not reveal is not waited for.
                session.withdraw(silo, reason[:1000])
            if phase is None or phase.closed or phase.tasks.get(silo) != task_id:
                raise ProtocolError(f"silo {silo!r} has no open task {task_id!r} for round {round}")
            self.resolve(phase, silo, Outcome.DECLINED, reason[:1000])
            if phase.kind is TaskKind.TRAIN and session is None:
                # Left out of this round's further attempts: it would decline again, and
                # each attempt costs the other silos privacy budget. A restarted silo
                # (fixed, say) joins again and takes part (Join clears this).
                self.registry.bench([silo])
            self.cond.notify_all()

    def open_upload(
        self, silo: str, header: Header, *, task_id: str, metrics: Mapping[str, Scalar]
    ) -> Upload:
        """Check `header` (what the silo claims) against its task and open its upload.

        Raises:
            ProtocolError: The silo has no open task with that id and round.
            UpdateRejected: The header is invalid; every problem is listed.
        """
        return intake.open_upload(self, silo, header, task_id=task_id, metrics=metrics)

    def complete_upload(
        self, upload: Upload, *, error: Exception | None = None, broken: bool = False
    ) -> None:
        """Fold `upload` into the round and accept it, or record why it failed.

        Raises:
            UpdateRejected: Validation failed at the end of the stream.
            ProtocolError: The round closed before the upload completed.
        """
        intake.complete_upload(self, upload, error=error, broken=broken)

    def resolve(
        self,
        phase: Phase,
        silo: str,
        outcome: Outcome,
        detail: str,
        result: UploadResult | None = None,
        *,
        reason: Reason = Reason.INVALID,
    ) -> None:
        """Record a silo's outcome for the phase and wake its waiters (caller holds the lock)."""
        if silo in phase.outcomes:
            return
        phase.outcomes[silo] = outcome
        phase.details[silo] = detail
        self.cond.notify_all()
        if outcome is Outcome.REJECTED:
            self._audit(AuditKind.REJECTED, silo, f"round {phase.round}: {detail}")
            if isinstance(self.reporter, RejectionReporter):
                self.reporter.update_rejected(
                    silo=silo, round=phase.round, reason=reason.value, detail=detail
                )
        if outcome is not Outcome.ACCEPTED:
            logger.warning(
                "[%s] silo=%s round=%d outcome=%s detail=%s",
                phase.kind.name,
                silo,
                phase.round,
                outcome.value,
                detail,
            )
        self.store.record_participant(
            round=phase.round,
            task=phase.kind.name.lower(),
            silo=silo,
            outcome=outcome.value,
            num_examples=result.num_examples if result else 0,
            bytes_received=result.bytes_received if result else 0,
            detail=detail,
        )

    # ---- secure aggregation -------------------------------------------------------------

    @staticmethod
    def _secagg_of(phase: Phase | None) -> ServerSession | None:
        """The secure-aggregation session of `phase`, if it runs one."""
        if phase is not None and isinstance(phase.aggregation, SecureRound):
            return phase.aggregation.session
        return None

    def _alive(self, silo: str) -> bool:
        return self.registry.alive(silo)

    def _bench(self, silos: Collection[str]) -> None:
        with self.cond:
            self.registry.bench(silos)

    def _secagg_refused(self, silo: str, reason: str) -> None:
        """A silo's secure-aggregation keys or shares were refused: it is out of the round."""
        with self.cond:
            phase = self.phase
            if self._secagg_of(phase) is not None and phase is not None and silo in phase.tasks:
                self.resolve(phase, silo, Outcome.REJECTED, reason[:1000], reason=Reason.SECAGG)
                self.cond.notify_all()

    def secagg_session(self, silo: str, task_id: str) -> ServerSession:
        """The secure-aggregation session of `silo`'s open TRAIN task.

        Raises:
            ProtocolError: No such task, or the round has no secure aggregation.
        """
        with self.cond:
            self.registry.touch(silo)
            phase = self.phase
            session = self._secagg_of(phase)
            if session is None or phase is None or phase.tasks.get(silo) != task_id:
                raise ProtocolError(
                    f"silo {silo!r} has no secure-aggregation task {task_id!r} in this round"
                )
            return session

    # ---- the rounds loop ------------------------------------------------------------------

    def run(self) -> None:
        """Run rounds until all are complete or ``stop`` is called.

        Raises:
            RoundFailed: A round failed ``max_failed_attempts`` times in a row.
        """
        self._loop.run()

    def stop(self) -> None:
        """Ask ``run`` to return soon."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        """Free the kept upload spools (after ``stop`` and the server's shutdown)."""
        self.spools.close()

    def wait_until_silos_told(self, timeout_s: float) -> bool:
        """After the last round, wait until every live silo has been told FINISHED."""
        end = self.clock() + timeout_s
        with self.cond:
            while True:
                if self.registry.all_told_finished():
                    return True
                now = self.clock()
                if now >= end:
                    return False
                self.cond.wait(min(0.5, end - now))
