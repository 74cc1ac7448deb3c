"""The round loop: select silos, open a phase, wait for it, release the sum, commit.

The loop knows nothing of differential privacy or secure aggregation: the
federation's aggregation mode opens each TRAIN phase's :class:`RoundAggregation`
and ends it with a :class:`RoundRelease`, which the strategy turns into the
next model. One background thread runs :meth:`RoundLoop.run`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedpriv._types import Scalar
from fedpriv.coordinator.checkpoint import drop_page_cache
from fedpriv.coordinator.guarantees import release_mode
from fedpriv.coordinator.modes import RoundRelease, nonfinite_message, nonfinite_tensors
from fedpriv.coordinator.pacing import PROBE_AFTER, cannot_answer, step_budgets
from fedpriv.coordinator.phases import Outcome, Phase, RoundSummary, TaskKind, weighted_means
from fedpriv.errors import RoundFailed
from fedpriv.faults import FaultPoint, reach
from fedpriv.strategy.protocol import StatefulStrategy, Strategy, announced
from fedpriv.wire import Model

if TYPE_CHECKING:
    from fedpriv.coordinator.federation import Federation

__all__ = ["RoundLoop"]

logger = logging.getLogger(__name__)


# The longest wait between two attempts at a round.
_MAX_BACKOFF_S = 60.0

# The outcomes that put a round out of reach, in the order a reader wants them.
_CAUSES = (Outcome.DECLINED, Outcome.REJECTED, Outcome.DROPPED)


def _called_off(phase: Phase, needed: int) -> str:
    """Why `phase` stops before its deadline: who cannot deliver, and why.

    >>> from fedpriv.coordinator.phases import TaskKind
    >>> phase = Phase(kind=TaskKind.TRAIN, round=1, tasks={"a": "t1", "b": "t2"},
    ...               model=None, config={}, deadline=0.0, deadline_unix_s=0.0)
    >>> phase.outcomes["b"], phase.details["b"] = Outcome.DECLINED, "no DP"
    >>> _called_off(phase, 2).split(": ", 1)[1]
    '1 of the 2 results it needs can still arrive (b declined: no DP)'
    """
    causes = "; ".join(
        f"{silo} {phase.outcomes[silo].value}: {phase.details.get(silo, '')}"
        for outcome in _CAUSES
        for silo in sorted(phase.outcomes)
        if phase.outcomes[silo] is outcome
    )
    return (
        f"round {phase.round} was called off before its deadline: "
        f"{phase.accepted + phase.pending} of the {needed} results it needs can still arrive"
        + (f" ({causes})" if causes else "")
    )


class RoundLoop:
    """Runs the rounds of one federation (its state and lock are the federation's)."""

    def __init__(self, federation: Federation) -> None:
        self._fed = federation

    def run(self) -> None:
        """Run rounds until all are complete or the federation stops.

        Raises:
            RoundFailed: A round failed ``max_failed_attempts`` times in a row.
        """
        fed = self._fed
        rounds = fed.rounds
        failures = 0
        try:
            while fed.next_round <= rounds.num_rounds and not fed.stopping.is_set():
                silos = self._wait_for_silos()
                if silos is None:
                    return
                try:
                    self._run_round(fed.next_round, silos)
                except RoundFailed as err:
                    failures += 1
                    fed.reporter.round_failed(fed.next_round, str(err))
                    if failures >= rounds.max_failed_attempts:
                        raise RoundFailed(
                            f"round {fed.next_round} failed {failures} times in a row; last: {err}"
                        ) from err
                    # Exponential backoff: what failed an attempt (a slow silo, a network
                    # blip) gets time to clear before the next one costs the silos again.
                    delay = min(rounds.retry_backoff_s * 2 ** (failures - 1), _MAX_BACKOFF_S)
                    if delay > 0:
                        logger.info("retrying round %d in %.0f s", fed.next_round, delay)
                        fed.stopping.wait(delay)
                    continue
                failures = 0
                with fed.cond:
                    fed.registry.round_done()
                    fed.next_round += 1
        finally:
            fed.staged.commit()
        if fed.next_round > rounds.num_rounds:
            fed.mark_finished()

    def _wait_for_silos(self) -> list[str] | None:
        fed = self._fed
        needed = fed.rounds.min_clients
        announced_wait = False
        while not fed.stopping.is_set():
            with fed.cond:
                registry = fed.registry
                hopeless = cannot_answer(
                    fed.rounds.pace,
                    registry.resources(),
                    registry.available(),
                    deadline_s=fed.rounds.deadline_s,
                )
                avoid = {s for s in hopeless if registry.left_out_rounds(s) < PROBE_AFTER}
                silos = registry.select(
                    needed=needed,
                    at_most=fed.rounds.max_clients,
                    avoid=avoid,
                    keep=fed.rounds.required_results,
                )
                have = len(registry.available())
                benched = registry.benched()
                if silos is not None:
                    paced_out = sorted(avoid - set(silos))
                    registry.round_selected(silos, paced_out)
            if silos is not None:
                for silo in paced_out:
                    logger.info(
                        "[PACE] round=%d left out silo=%s: one step takes %.1f s, more than "
                        "90%% of deadline_s=%g (it takes part again after %d rounds out)",
                        fed.next_round,
                        silo,
                        hopeless[silo],
                        fed.rounds.deadline_s,
                        PROBE_AFTER,
                    )
                return silos
            if not announced_wait:
                left_out = f" left_out={','.join(benched)}" if benched else ""
                logger.info("waiting for silos have=%d need=%d%s", have, needed, left_out)
                announced_wait = True
            fed.staged.commit()  # no round stays uncommitted while the federation waits
            with fed.cond:
                fed.cond.wait(1.0)
        return None

    def _open_phase(self, kind: TaskKind, round: int, silos: list[str], deadline_s: float) -> Phase:
        fed = self._fed
        tasks = {silo: uuid.uuid4().hex for silo in silos}
        deadline = fed.clock() + deadline_s
        config: dict[str, Scalar] = dict(fed.rounds.client_config)
        aggregation = None
        if kind is TaskKind.TRAIN:
            config.update(announced(fed.strategy, round))
            aggregation = fed.mode.open(round, model=fed.model, tasks=tasks, deadline=deadline)
        config["round"] = round
        phase = Phase(
            kind=kind,
            round=round,
            tasks=tasks,
            model=fed.model,
            config=config,
            deadline=deadline,
            deadline_unix_s=time.time() + deadline_s,
            aggregation=aggregation,
            announcement=aggregation.announce() if aggregation is not None else None,
        )
        if kind is TaskKind.TRAIN:
            with fed.cond:
                reported = fed.registry.resources()
            budgets = step_budgets(
                fed.rounds.pace, reported, silos, deadline_s=fed.rounds.deadline_s
            )
            phase.silo_config = {silo: {"max_steps": n} for silo, n in budgets.items()}
            for silo, steps in budgets.items():
                logger.info(
                    "[PACE] round=%d silo=%s max_steps=%d of %d (%.2f s a step)",
                    round,
                    silo,
                    steps,
                    reported[silo].full_steps,
                    reported[silo].step_seconds,
                )
        with fed.cond:
            fed.phase = phase
            fed.cond.notify_all()
        logger.info("[%s] round=%d silos=%s", kind.name, round, ",".join(silos))
        return phase

    def _wait_phase(self, phase: Phase, *, needed: int) -> None:
        """Wait until every silo answered, the deadline passed, or `needed` is out of reach."""
        fed = self._fed
        called_off: str | None = None
        with fed.cond:
            while not fed.stopping.is_set():
                now = fed.clock()
                for silo in phase.tasks:
                    if not fed.registry.alive(silo) and phase.waiting_on(silo):
                        detail = "stopped polling and heartbeating"
                        fed.resolve(phase, silo, Outcome.DROPPED, detail)
                if phase.pending == 0 or now >= phase.deadline:
                    break
                if phase.accepted + phase.pending < needed:
                    called_off = _called_off(phase, needed)
                    break
                fed.cond.wait(min(0.5, phase.deadline - now))
            phase.closed = True
            open_uploads = list(phase.uploads.values())
        if called_off is not None:
            logger.warning("%s", called_off)
        for upload in open_uploads:
            if called_off is not None:
                if upload.cancel(called_off):
                    with fed.cond:
                        fed.resolve(phase, upload.silo, Outcome.CANCELLED, called_off)
            elif upload.cancel(
                f"round {phase.round} closed (deadline) before the upload completed"
            ):
                with fed.cond:
                    fed.resolve(phase, upload.silo, Outcome.LATE, "deadline passed during upload")
        with fed.cond:
            # Uploads accepted before the phase closed are being folded: the sum is read
            # only once they are all in (each notifies when its fold ends).
            fed.cond.wait_for(lambda: phase.folding == 0)
            for silo in phase.tasks:
                if phase.waiting_on(silo):
                    if called_off is not None:
                        fed.resolve(phase, silo, Outcome.CANCELLED, called_off)
                    else:
                        fed.resolve(phase, silo, Outcome.TIMEOUT, "no result before the deadline")

    def _fail_attempt(self, round: int, started_unix: float, detail: str) -> RoundFailed:
        """Record a failed attempt at `round`; the error to raise (the model is unchanged)."""
        self._fed.store.record_attempt(
            round=round, started_unix_s=started_unix, outcome="failed", detail=detail
        )
        return RoundFailed(f"round {round}: {detail}")

    def _release(self, train: Phase, started_unix: float) -> tuple[Model, dict[str, float]]:
        """The next global model from the closed TRAIN phase, and the federation's metrics.

        Raises:
            RoundFailed: Too few updates, a broken fold, an unreleasable or non-finite sum.
        """
        fed = self._fed
        needed = fed.rounds.required_results
        aggregation = train.aggregation
        assert aggregation is not None  # every TRAIN phase has one
        try:
            if train.fold_error is not None:
                raise self._fail_attempt(train.round, started_unix, train.fold_error)
            if train.accepted < needed:
                detail = (
                    f"{train.accepted} of {len(train.tasks)} updates accepted, {needed} needed "
                    f"(rejected={train.count(Outcome.REJECTED)} "
                    f"dropped={train.count(Outcome.DROPPED)} "
                    f"declined={train.count(Outcome.DECLINED)} "
                    f"late={train.count(Outcome.LATE, Outcome.TIMEOUT)} "
                    f"cancelled={train.count(Outcome.CANCELLED)})"
                )
                fed.store.record_attempt(
                    round=train.round, started_unix_s=started_unix, outcome="failed", detail=detail
                )
                raise RoundFailed(f"round {train.round}: {detail}; the global model is unchanged")
            try:
                release = aggregation.finish(train.results)
            except RoundFailed as err:
                raise self._fail_attempt(train.round, started_unix, str(err)) from None
            model = self._aggregate(train.round, release)
        finally:
            aggregation.close(f"round {train.round} is over")
        nonfinite = nonfinite_tensors(model)
        if nonfinite:
            raise self._fail_attempt(train.round, started_unix, nonfinite_message(nonfinite))
        return model, release.metrics

    def _strategy_state(self) -> tuple[str, Model] | None:
        """The strategy's state to commit with the round (an optimiser's moments), if any."""
        strategy = self._fed.strategy
        if not isinstance(strategy, StatefulStrategy):
            return None
        state = strategy.state()
        return None if state is None else (strategy.name, state)

    def _aggregate(self, round: int, release: RoundRelease) -> Model:
        """Hand the round's sum (or its updates) to the strategy."""
        fed = self._fed
        strategy = fed.strategy
        if isinstance(strategy, Strategy):
            assert release.total is not None  # streaming modes end in a sum
            return strategy.aggregate(round, base=fed.model, total=release.total)
        return strategy.aggregate_updates(round, base=fed.model, updates=release.updates)

    def _run_round(self, round: int, silos: list[str]) -> None:
        fed = self._fed
        started = fed.clock()
        started_unix = time.time()
        train = self._open_phase(TaskKind.TRAIN, round, silos, fed.rounds.deadline_s)
        # The silos download the last round's model while it is made durable.
        fed.staged.commit()
        self._wait_phase(train, needed=fed.rounds.required_results)
        model, federation_metrics = self._release(train, started_unix)
        reach(FaultPoint.AFTER_FOLD_BEFORE_COMMIT)
        privacy = release_mode(fed.config)
        federation_metrics = fed.guarantee.record(round, privacy, federation_metrics)
        fit_metrics = weighted_means(train.results)
        silo_metrics = {r.silo: dict(r.metrics) for r in train.results}
        metrics: dict[str, Mapping[str, Scalar]] = {"fit": fit_metrics}
        metrics.update({f"silo:{silo}": values for silo, values in silo_metrics.items()})
        if federation_metrics:
            metrics["federation"] = federation_metrics
        # The served model's file is superseded: its pages become the new checkpoint's.
        drop_page_cache(fed.store.checkpoint_path(round - 1))
        # The privacy spend is committed with the model it paid for, and with the
        # round's metrics and attempt: one transaction, one fsync. The checkpoint is
        # written now; it becomes durable (fsync, rename, transaction) once the next
        # phase has opened, so that the silos download while the disk syncs.
        staged = fed.store.stage_round(
            round=round,
            model=model,
            started_unix_s=started_unix,
            selected=len(silos),
            accepted=train.accepted,
            total_weight=train.total_weight,
            metrics=metrics,
            record_attempt=True,
            privacy=privacy,
            strategy_state=self._strategy_state(),
        )
        # Served from the checkpoint's pages from now on: the buffer `model` was summed
        # in is free for the next round's sum, so the process holds one model, not two.
        served = fed.store.load_checkpoint(staged.temporary)
        del model
        with fed.cond:
            fed.model = served
        fed.staged.stage(staged)
        if fed.config.dp is not None:
            # A noised model's privacy spend is on disk before any silo can download it.
            fed.staged.commit()
        evaluation = self._evaluate(round, train)
        last = {**fit_metrics, **evaluation}
        last.update({f"federation_{k}": v for k, v in federation_metrics.items()})
        epsilons = [float(v["epsilon"]) for v in silo_metrics.values() if "epsilon" in v]
        if epsilons:
            last["max_silo_epsilon"] = max(epsilons)
        with fed.cond:
            fed.phase = None
            fed.last_round_metrics = last
            joined = len(fed.registry.available())
        declined = train.count(Outcome.DECLINED)
        rejected = train.count(Outcome.REJECTED)
        # Reported once durable: a round shown as completed survives a crash.
        fed.staged.report(
            RoundSummary(
                round=round,
                num_rounds=fed.rounds.num_rounds,
                selected=len(silos),
                joined=joined,
                accepted=train.accepted,
                rejected=rejected,
                dropped=len(silos) - train.accepted - rejected - declined,
                declined=declined,
                fit_metrics=fit_metrics,
                evaluation_metrics=evaluation,
                silo_metrics=silo_metrics,
                federation_metrics=federation_metrics,
                bytes_received=train.bytes_received,
                duration_s=fed.clock() - started,
                privacy=privacy,
            )
        )

    def _evaluate(self, round: int, train: Phase) -> dict[str, float]:
        """Federated evaluation of the new model by the silos that trained it ({} if off)."""
        fed = self._fed
        if not fed.rounds.federated_evaluation:
            return {}
        evaluators = [r.silo for r in train.results if r.silo in fed.available()]
        phase = self._open_phase(
            TaskKind.EVALUATE, round, evaluators, fed.rounds.evaluation_deadline_s
        )
        fed.staged.commit()
        # Wait for every evaluator (or the deadline): a missing one must not cut the others.
        self._wait_phase(phase, needed=min(1, len(evaluators)))
        evaluation = weighted_means(phase.results)
        fed.store.record_metrics(round=round, source="evaluate", values=evaluation)
        return evaluation
