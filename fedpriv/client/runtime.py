"""The silo's loop: join, long-poll for tasks, run them, stream results back; reconnect on loss."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping

import grpc
import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.client.base import Client
from fedpriv.client.connection import (
    Backoff,
    ReceiveBuffer,
    first_task,
    fleet_stub,
    heartbeats,
)
from fedpriv.client.messages import (
    ClientStats,
    ErrorFeedback,
    compressed_messages,
    result_messages,
)
from fedpriv.client.release import ReleasePolicy
from fedpriv.client.resources import describe
from fedpriv.client.secure import SecureUpload
from fedpriv.client.tasks import ModelOwner, TaskLimits, ValidatedTask, receive_task
from fedpriv.client.user_code import UserCodeFailed, call_user_code
from fedpriv.errors import (
    AuthenticationError,
    ConnectError,
    DuplicateSession,
    FederationStopped,
    PermissionDenied,
    PrivacyBudgetExceeded,
    ProtocolError,
    TaskRejected,
    UpdateRejected,
)
from fedpriv.faults import FaultPoint, reach
from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.transport import TLSConfig, error_from_rpc, open_channel
from fedpriv.transport.options import DEFAULT_POLL_WAIT_S, DEFAULT_RECONNECT_TIMEOUT_S
from fedpriv.transport.session import new_session_id, with_session
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from fedpriv.wire import Compression, arrays_from_payload, scalars_to_proto
from fedpriv.wire.layout import TensorLayout

__all__ = ["Backoff", "run_client"]

logger = logging.getLogger(__name__)

SDK_VERSION = "0.1.0"  # keep equal to fedpriv.__version__ (a test checks)
_JOIN_TIMEOUT_S = 30.0


def _buffer_source(
    client: Client, task: fleet_pb2.Task, buffers: ReceiveBuffer
) -> Callable[[TensorLayout], npt.NDArray[np.uint8] | None]:
    """Where the task's model is received: into the client's own parameters when it can.

    A client with ``receive_buffer(layout)`` (a TorchClient on the CPU) hands out the
    memory its parameters live in, so the model arrives where training reads it and
    its update leaves from there: one model of memory. Not for an update sent as a
    difference from the received model (secure aggregation, update compression),
    which needs that model kept apart from the one training changes.
    """
    own = getattr(client, "receive_buffer", None)
    plain = not task.HasField("secagg") and task.compression == fleet_pb2.COMPRESSION_NONE
    if own is None or not plain:
        return buffers.take

    def take(layout: TensorLayout) -> npt.NDArray[np.uint8] | None:
        buffer: npt.NDArray[np.uint8] | None = own(layout)
        return buffer if buffer is not None else buffers.take(layout)

    return take


def _decline(
    stub: fleet_pb2_grpc.FleetStub, task: fleet_pb2.Task, reason: str, stats: ClientStats
) -> None:
    logger.warning("declining round=%d: %s", task.round, reason)
    header = fleet_pb2.ResultHeader(
        task_id=task.task_id, round=task.round, kind=task.kind, declined_reason=reason[:1000]
    )
    stub.PushResult(iter([fleet_pb2.ResultMessage(header=header)]), timeout=30)
    stats.declined += 1


def _privacy_plan(
    client: Client, config: Mapping[str, Scalar], ledger: PrivacyLedger | None
) -> tuple[GaussianSteps | None, str | None]:
    """The run's mechanism and, if the silo must refuse it, why."""
    plan_fn = getattr(client, "plan_privacy", None)
    planned: GaussianSteps | None = plan_fn(config) if plan_fn is not None else None
    if ledger is None:
        return planned, None
    if planned is None:
        return None, (
            "this silo has a privacy budget but its client does not train with differential "
            "privacy; refusing to release an update whose privacy cost is unbounded"
        )
    try:
        ledger.check(planned)
    except PrivacyBudgetExceeded as exceeded:
        return planned, str(exceeded)
    return planned, None


def _task_closed(stub: fleet_pb2_grpc.FleetStub, task: fleet_pb2.Task) -> bool:
    """Whether the coordinator says it no longer takes `task`'s result (False if unsure)."""
    try:
        reply = stub.Heartbeat(fleet_pb2.HeartbeatRequest(task_id=task.task_id), timeout=10)
    except grpc.RpcError:
        return False  # the upload finds out, and is refused if the task is closed
    return bool(reply.task_closed)


def _log_withheld(task: fleet_pb2.Task, dropped: tuple[str, ...]) -> None:
    if dropped:
        logger.info(
            "withheld under DP round=%d metrics=%s (opt in with [privacy] share_metrics)",
            task.round,
            ",".join(dropped),
        )


def _run_task(
    client: Client,
    stub: fleet_pb2_grpc.FleetStub,
    received: ValidatedTask,
    stats: ClientStats,
    ledger: PrivacyLedger | None,
    feedback: ErrorFeedback,
    release: ReleasePolicy,
    limits: TaskLimits,
) -> None:
    task = received.task
    arrays = arrays_from_payload(received.layout, received.payload)
    config = received.config
    timeout = max(1.0, task.deadline_unix_s - time.time()) if task.deadline_unix_s else None
    if task.kind == fleet_pb2.TASK_KIND_TRAIN:
        planned, refusal = _privacy_plan(client, config, ledger)
        if refusal is not None:
            _decline(stub, task, refusal, stats)
            return
        secure = None
        if received.secagg is not None:
            # Keys are agreed before training, so a round that cannot reach the
            # threshold fails before anyone spends time or privacy on it.
            secure = SecureUpload(stub, task, received.secagg, stats, limits)
            secure.setup(timeout=timeout)
        # Under DP only the noised update, the accounting values below and what the
        # silo opted in to leave it (see fedpriv.client.release).
        private = ledger is not None or planned is not None
        fit = call_user_code("fit", lambda: client.fit(arrays, config=config), private=private)
        allowed = release.fit(fit.metrics, num_examples=fit.num_examples, private=private)
        _log_withheld(task, allowed.dropped)
        metrics = dict(allowed.metrics)
        if _task_closed(stub, task):
            # The round was called off (or its deadline passed) while this silo trained:
            # nobody takes the update, so it is neither recorded nor sent.
            logger.warning(
                "round %d was called off while this silo trained: nothing released, "
                "no privacy spent",
                task.round,
            )
            stats.withheld += 1
            return
        if planned is not None:
            metrics["noise_multiplier"] = planned.noise_multiplier
        if ledger is not None and planned is not None:
            # Recorded (and fsynced) before the first byte of the update leaves the silo.
            privacy = getattr(client, "privacy", None)
            metrics["epsilon"] = ledger.record(
                planned,
                round=task.round,
                max_grad_norm=float(getattr(privacy, "max_grad_norm", 0.0)),
            )
            metrics["delta"] = ledger.budget.delta
            # The looser RDP bound of the same history, shown beside the tight figure.
            metrics["epsilon_rdp"] = ledger.spent_epsilon_rdp()
            reach(FaultPoint.AFTER_LEDGER_RECORD_BEFORE_UPLOAD)
        if secure is not None:
            secure.push(
                fit.parameters,
                arrays,
                num_examples=allowed.num_examples,
                metrics=metrics,
                timeout=timeout,
                resources=release.resources(describe(client), private=private),
            )
            stats.trained += 1
            return
        compression = received.compression
        header = fleet_pb2.ResultHeader(
            task_id=task.task_id,
            round=task.round,
            kind=task.kind,
            num_examples=allowed.num_examples,
            metrics=scalars_to_proto(metrics),
            update=received.layout.to_proto(),
            update_compression=compression.to_proto(),
            # For coordinators that read only the deprecated name (field 8).
            compression=compression.value,
            resources=release.resources(describe(client), private=private).to_proto(),
        )
        if compression is Compression.NONE:
            messages = result_messages(header, received.layout, fit.parameters, stats)
        else:
            messages = compressed_messages(
                header,
                received.layout,
                fit.parameters,
                received.payload,
                compression,
                feedback,
                stats,
            )
        stats.trained += 1
    else:
        plan_fn = getattr(client, "plan_privacy", None)
        private = ledger is not None or (plan_fn is not None and plan_fn(config) is not None)
        evaluation = call_user_code(
            "evaluate", lambda: client.evaluate(arrays, config=config), private=private
        )
        allowed = release.evaluate(
            evaluation.metrics, num_examples=evaluation.num_examples, private=private
        )
        _log_withheld(task, allowed.dropped)
        if private and not allowed.metrics:
            _decline(
                stub,
                task,
                "this silo trains with differential privacy and its evaluation data is not "
                "declared public ([privacy] public_evaluation); it sends no evaluation metrics",
                stats,
            )
            return
        header = fleet_pb2.ResultHeader(
            task_id=task.task_id,
            round=task.round,
            kind=task.kind,
            num_examples=allowed.num_examples,
            metrics=scalars_to_proto(allowed.metrics),
        )
        messages = result_messages(header, None, None, stats)
        stats.evaluated += 1
    stub.PushResult(messages, timeout=timeout)


def run_client(
    client: Client,
    *,
    coordinator: str,
    tls: TLSConfig | None,
    insecure: bool = False,
    identity: str | None = None,
    server_name: str | None = None,
    poll_wait_s: int = DEFAULT_POLL_WAIT_S,
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
    stop: threading.Event | None = None,
    ledger: PrivacyLedger | None = None,
    release: ReleasePolicy | None = None,
    limits: TaskLimits | None = None,
) -> ClientStats:
    """Serve `client` to the coordinator until the federation finishes.

    Args:
        client: The silo's training code.
        coordinator: ``host:port`` of the coordinator.
        tls: This silo's certificate, key and the federation CA.
        insecure: Plain text (with `identity` claimed in metadata); logs a warning.
        identity: Silo name to claim on a plain-text channel.
        server_name: Expected name in the coordinator's certificate, if not the host.
        poll_wait_s: How long each long-poll may wait.
        reconnect_timeout_s: Give up after being unable to reach the coordinator this long.
        stop: Set to make the loop leave the federation and return.
        ledger: The silo's privacy ledger and budget. With a ledger, every training
            run is checked against the budget before it starts (and refused if it
            would overspend), and recorded durably before its update is sent.
        release: What a silo that trains with DP sends besides its update (default:
            only the accounting values; see :mod:`fedpriv.client.release`).
        limits: What this silo accepts from the coordinator (default
            :class:`~fedpriv.client.tasks.TaskLimits`). A task that breaks a limit
            or any rule of the protocol is declined with the reason, and the silo
            takes the next one.

    Returns:
        Counters of what the silo did.

    Raises:
        AuthenticationError: The coordinator refused this silo's certificate.
        PermissionDenied: The silo is not on the coordinator's allow list.
        ConnectError: The coordinator stayed unreachable for `reconnect_timeout_s`.
        DuplicateSession: Another process held this silo's identity (a live session
            under the same certificate) for `reconnect_timeout_s`.
    """
    stop = stop or threading.Event()
    release = release or ReleasePolicy()
    limits = limits or TaskLimits()
    release.announce()
    stats = ClientStats()
    backoff = Backoff()
    feedback = ErrorFeedback()
    channel = open_channel(
        coordinator, tls=tls, insecure=insecure, identity=identity, server_name=server_name
    )
    # One id for this run: reconnects stay one session; a second process is another.
    channel = with_session(channel, new_session_id())
    stub = fleet_stub(channel)
    buffers = ReceiveBuffer()
    joined = False
    heartbeat_s = 10.0
    last_contact = time.monotonic()
    try:
        while not stop.is_set():
            try:
                if not joined:
                    # Under DP the pace is sent only if opted in (fedpriv.client.release).
                    private = ledger is not None or getattr(client, "privacy", None) is not None
                    resources = release.resources(describe(client), private=private)
                    reply = stub.Join(
                        fleet_pb2.JoinRequest(
                            sdk_version=SDK_VERSION, resources=resources.to_proto()
                        ),
                        timeout=_JOIN_TIMEOUT_S,
                    )
                    joined = True
                    stats.silo = reply.silo
                    heartbeat_s = float(max(1, reply.heartbeat_interval_s))
                    logger.info("joined federation=%s as silo=%s", reply.federation, reply.silo)
                stream = stub.PullTask(
                    fleet_pb2.PullTaskRequest(wait_s=poll_wait_s), timeout=poll_wait_s + 600
                )
                try:
                    task = first_task(stream)
                except ProtocolError as err:
                    stream.cancel()
                    delay = backoff.next_delay()
                    logger.warning("%s; polling again in %.1f s", err, delay)
                    stop.wait(delay)
                    continue
                last_contact = time.monotonic()
                backoff.reset()
                kind = task.kind
                if kind in (fleet_pb2.TASK_KIND_FINISHED, fleet_pb2.TASK_KIND_WAIT):
                    if task.HasField("model"):
                        stream.cancel()  # never downloaded: nothing to run it on
                        logger.warning(
                            "the coordinator's %s task carries a model; ignored",
                            fleet_pb2.TaskKind.Name(kind),
                        )
                    if kind == fleet_pb2.TASK_KIND_FINISHED:
                        if task.stop_reason:
                            raise FederationStopped(
                                f"the coordinator stopped the federation: {task.stop_reason[:1000]}"
                            )
                        logger.info("federation finished")
                        break
                    continue
                try:
                    received = receive_task(
                        task,
                        stream,
                        stats=stats,
                        limits=limits,
                        take_buffer=_buffer_source(client, task, buffers),
                        expected=client.model_shapes() if isinstance(client, ModelOwner) else None,
                    )
                except TaskRejected as rejected:
                    stream.cancel()  # the rest of a refused model is not wanted
                    _decline(stub, task, str(rejected), stats)
                    continue
                logger.info("task round=%d kind=%s", task.round, fleet_pb2.TaskKind.Name(kind))
                with heartbeats(stub, heartbeat_s):
                    try:
                        _run_task(client, stub, received, stats, ledger, feedback, release, limits)
                    except ProtocolError as err:
                        # A task this silo cannot complete safely (too few silos for secure
                        # aggregation, a peer or roster that breaks it): declined with the
                        # reason, and the silo takes the next task.
                        _decline(stub, received.task, str(err), stats)
                    except UserCodeFailed as failed:
                        # The silo's own fit or evaluate raised (logged with its traceback):
                        # that task fails with the reason, and the silo takes the next one.
                        _decline(stub, received.task, failed.reason, stats)
                buffers.keep(received.payload)
                del received
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                if isinstance(error, AuthenticationError | PermissionDenied):
                    raise error from None
                if isinstance(error, UpdateRejected):
                    stats.rejected += 1
                    logger.error("result rejected by the coordinator: %s", rpc_error.details())
                    continue
                if isinstance(error, ProtocolError) and not isinstance(error, DuplicateSession):
                    logger.warning("coordinator: %s", rpc_error.details())
                    continue
                joined = False
                waited = time.monotonic() - last_contact
                if isinstance(error, DuplicateSession):
                    # Retried: a crashed predecessor's calls end; a live twin's session does not.
                    if waited > reconnect_timeout_s:
                        raise error from None
                    delay = backoff.next_delay()
                    logger.error("refused by the coordinator: %s; retrying in %.1f s", error, delay)
                    stop.wait(delay)
                    continue
                if waited > reconnect_timeout_s:
                    raise ConnectError(
                        f"coordinator {coordinator} unreachable for {waited:.0f} s: {error}"
                    ) from None
                delay = backoff.next_delay()
                stats.reconnects += 1
                logger.warning("coordinator unreachable (%s); retrying in %.1f s", error, delay)
                stop.wait(delay)
        if stop.is_set() and joined:
            with contextlib.suppress(grpc.RpcError):
                stub.Leave(fleet_pb2.LeaveRequest(reason="stopped"), timeout=5)
    finally:
        channel.close()
    return stats
