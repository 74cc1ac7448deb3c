"""Upload intake: a result header admitted, its stream folded once complete, or refused.

RPC threads call :func:`open_upload` when a result header arrives and
:func:`complete_upload` when its stream ends. Both change the federation's
open phase under its lock; folding runs outside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedpriv._types import Scalar
from fedpriv.coordinator.admission import Expected, Header, Problem, header_problems
from fedpriv.coordinator.phases import Outcome, Phase, Reason, TaskKind
from fedpriv.coordinator.upload import Upload, UploadResult
from fedpriv.errors import ProtocolError, UpdateRejected
from fedpriv.wire import Compression

if TYPE_CHECKING:
    from fedpriv.coordinator.federation import Federation

__all__ = ["complete_upload", "open_upload"]


def open_upload(
    fed: Federation,
    silo: str,
    header: Header,
    *,
    task_id: str,
    metrics: Mapping[str, Scalar],
) -> Upload:
    """Check `header` (what the silo claims) against its task and open its upload.

    Raises:
        ProtocolError: The silo has no open task with that id and round (stale,
            replayed or forged).
        UpdateRejected: The header is invalid; every problem is listed.
    """
    with fed.cond:
        fed.registry.touch(silo)
        phase = fed.phase
        if phase is None or phase.closed or phase.tasks.get(silo) != task_id:
            raise ProtocolError(
                f"silo {silo!r} has no open task {task_id!r} for round {header.round}; "
                "the result is stale or for another silo"
            )
        if silo in phase.uploads:
            raise ProtocolError(
                f"silo {silo!r} already has an upload open for task {task_id!r}; "
                "one result per silo and task is taken"
            )
        if silo in phase.outcomes:
            raise ProtocolError(f"silo {silo!r} already sent a result for task {task_id!r}")
        aggregation = phase.aggregation
        plan = aggregation.plan if aggregation is not None else None
        policy: list[Problem] = []
        if phase.kind is TaskKind.TRAIN:
            policy = [Problem(Reason.PRIVACY, p) for p in fed.spends.problems(silo, metrics)]
        if aggregation is not None:
            policy += aggregation.policy_problems(silo)
        problems = _admit(
            phase,
            header,
            task_id=task_id,
            max_num_examples=fed.rounds.max_num_examples,
            policy=policy,
        )
        if problems:
            texts = [p.text for p in problems]
            reason = problems[0].reason
            fed.resolve(phase, silo, Outcome.REJECTED, "; ".join(texts), reason=reason)
            raise UpdateRejected(silo=silo, round=header.round, problems=texts, reason=reason)
        upload = Upload(
            silo=silo,
            round=phase.round,
            layout=plan.layout if plan is not None else None,
            aggregator=None,
            num_examples=header.num_examples,
            metrics=metrics,
            spool_dir=fed.store.directory / "spool",
            spools=fed.spools,
            on_chunk=lambda: fed.registry.touch(silo),
            weight=plan.weight(header.num_examples) if plan is not None else None,
            base=plan.base if plan is not None else None,
            clip_norm=plan.clip_norm if plan is not None else None,
            compression=plan.compression if plan is not None else Compression.NONE,
            max_value=fed.rounds.max_update_value,
        )
        phase.uploads[silo] = upload
        return upload


def complete_upload(
    fed: Federation, upload: Upload, *, error: Exception | None = None, broken: bool = False
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
    with fed.cond:
        phase = fed.phase
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
                failure = ProtocolError(f"round {upload.round} closed before the upload completed")
                fed.resolve(phase, upload.silo, Outcome.LATE, str(failure))
            elif isinstance(failure, UpdateRejected):
                fed.resolve(
                    phase,
                    upload.silo,
                    Outcome.REJECTED,
                    str(failure),
                    reason=Reason(failure.reason),
                )
            else:
                fed.resolve(phase, upload.silo, Outcome.DROPPED, str(failure))
        elif result is not None:
            upload.release()
            failure = ProtocolError(f"round {upload.round} closed before the upload completed")
        if broken:
            fed.mark_gone(upload.silo, str(failure))
        fed.cond.notify_all()
    if fold and phase is not None and result is not None:
        _fold(fed, phase, upload, result)
    if failure is not None and error is None:
        raise failure


def _fold(fed: Federation, phase: Phase, upload: Upload, result: UploadResult) -> None:
    """Fold an accepted upload into the phase's sum (outside the lock), then accept it.

    Raises:
        OSError: The spool could not be read back; the round fails.
    """
    try:
        if phase.aggregation is not None:
            phase.aggregation.take(upload)
        else:
            upload.fold()
    except Exception as err:
        with fed.cond:
            phase.folding -= 1
            del phase.uploads[upload.silo]
            detail = f"folding the update of silo {upload.silo!r} failed: {err}"
            phase.fold_error = phase.fold_error or detail
            fed.resolve(phase, upload.silo, Outcome.DROPPED, detail)
            fed.cond.notify_all()
        raise
    with fed.cond:
        phase.folding -= 1
        del phase.uploads[upload.silo]
        phase.results.append(result)
        phase.bytes_received += result.bytes_received
        if phase.aggregation is not None:
            phase.total_weight += phase.aggregation.plan.weight(result.num_examples)
        fed.resolve(phase, upload.silo, Outcome.ACCEPTED, "", result)
        if phase.kind is TaskKind.TRAIN:
            fed.spends.note(phase.round, upload.silo, result.metrics)
        fed.cond.notify_all()


def _admit(
    phase: Phase,
    header: Header,
    *,
    task_id: str,
    max_num_examples: int,
    policy: list[Problem],
) -> list[Problem]:
    """Every problem of `header` for `phase` (see :mod:`fedpriv.coordinator.admission`)."""
    plan = phase.aggregation.plan if phase.aggregation is not None else None
    expected = Expected(
        round=phase.round,
        kind=phase.kind,
        task_id=task_id,
        layout=plan.layout if plan is not None else None,
        compression=plan.compression if plan is not None else Compression.NONE,
        max_num_examples=max_num_examples,
    )
    return header_problems(header, expected, policy=policy)
