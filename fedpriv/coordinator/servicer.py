"""The Fleet gRPC servicer: translates messages and calls the Federation, nothing more."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from fedpriv.coordinator.admission import Header
from fedpriv.coordinator.federation import Federation, TaskKind
from fedpriv.errors import LimitExceeded, MalformedMessage, ProtocolError, StreamCut
from fedpriv.faults import FaultPoint, reach
from fedpriv.transport import peer_identity, rpc_error_translator
from fedpriv.transport.limits import CallLimits
from fedpriv.transport.session import session_key
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from fedpriv.wire import layout_from_proto, scalars_from_proto, scalars_to_proto
from fedpriv.wire.compression import declared_compression
from fedpriv.wire.frames import RawChunk, chunk_frame, chunk_of, parse_with_chunks, serialize
from fedpriv.wire.resources import Resources

__all__ = ["FleetServicer", "add_fleet_servicer"]

logger = logging.getLogger(__name__)


class FleetServicer(fleet_pb2_grpc.FleetServicer):  # type: ignore[misc]  # generated, untyped
    """Serves the Fleet service for one :class:`Federation`."""

    def __init__(
        self, federation: Federation, *, insecure: bool, limits: CallLimits | None = None
    ) -> None:
        self._federation = federation
        self._insecure = insecure
        self._limits = limits or CallLimits(federation.config.limits, insecure=insecure)
        settings = federation.config.secure_aggregation
        self._unmask_deadline_s = settings.unmask_deadline_s if settings is not None else 60.0

    def _silo(self, context: grpc.ServicerContext) -> str:
        silo = peer_identity(context, insecure=self._insecure)
        if silo is None:  # the interceptor already refused such calls
            raise ProtocolError("caller has no identity")
        # One session per identity: a second connection under it is refused here.
        release = self._federation.sessions.claim(
            silo, session=session_key(context), peer=context.peer()
        )
        if not context.add_callback(release):  # the call has already ended
            release()
        return silo

    def Join(  # noqa: N802, D102
        self, request: fleet_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.JoinReply:
        with rpc_error_translator(context, "Fleet.Join"):
            silo = self._silo(context)
            logger.info(
                "[Fleet.Join] silo=%s peer=%s sdk=%s",
                silo,
                context.peer(),
                request.sdk_version[:64],
            )
            resources = (
                Resources.from_proto(request.resources) if request.HasField("resources") else None
            )
            self._federation.join(silo, sdk_version=request.sdk_version[:64], resources=resources)
            return fleet_pb2.JoinReply(
                silo=silo,
                federation=self._federation.config.federation,
                heartbeat_interval_s=self._federation.config.heartbeat_interval_s,
            )

    def PullTask(  # noqa: N802, D102
        self, request: fleet_pb2.PullTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.TaskMessage | bytes]:
        with rpc_error_translator(context, "Fleet.PullTask"):
            silo = self._silo(context)
            task = self._federation.pull_task(silo, wait_s=request.wait_s)
            header = task.model.layout.to_proto() if task.model is not None else None
            yield fleet_pb2.TaskMessage(
                task=fleet_pb2.Task(
                    task_id=task.task_id,
                    kind=task.kind.value,
                    round=task.round,
                    config=scalars_to_proto(task.config),
                    model=header,
                    deadline_unix_s=task.deadline_unix_s,
                    secagg=task.secagg.to_proto() if task.secagg is not None else None,
                    compression=task.compression.to_proto(),
                    stop_reason=task.stop_reason,
                )
            )
            if task.model is None:
                return
            logger.info(
                "[Fleet.PullTask] silo=%s round=%d kind=%s", silo, task.round, task.kind.name
            )
            for offset, view in task.model.chunks():
                if not context.is_active():
                    return
                # A hand-made frame: the chunk's bytes are copied once, not four times.
                frame = chunk_frame(offset, (view,), len(view))
                # The frame holds the bytes now; a model served from its checkpoint
                # keeps only the chunks in flight mapped in.
                task.model.evict(offset, len(view))
                yield frame

    def PushResult(  # noqa: N802, D102
        self, request_iterator: Iterator[fleet_pb2.ResultMessage], context: grpc.ServicerContext
    ) -> fleet_pb2.PushReply:
        with rpc_error_translator(context, "Fleet.PushResult"):
            silo = self._silo(context)
            first = next(request_iterator, None)
            if first is None or isinstance(first, RawChunk) or first.WhichOneof("part") != "header":
                raise self._limits.refuse(
                    silo,
                    MalformedMessage,
                    "protocol",
                    "PushResult must start with a ResultHeader message",
                )
            header = first.header
            most = self._limits.settings.max_metrics_bytes
            size = sum(len(k) + v.ByteSize() for k, v in header.metrics.items())
            if size > most:
                raise self._limits.refuse(
                    silo,
                    LimitExceeded,
                    "max_metrics_bytes",
                    f"the result's metrics take {size} bytes; at most {most} are allowed "
                    "(limits.max_metrics_bytes)",
                )
            if header.declined_reason:
                self._federation.decline(
                    silo, task_id=header.task_id, round=header.round, reason=header.declined_reason
                )
                return fleet_pb2.PushReply(accepted=False)
            layout, header_problems = (
                layout_from_proto(header.update) if header.HasField("update") else (None, [])
            )
            metrics, metric_problems = scalars_from_proto(header.metrics)
            compression, compression_problems = declared_compression(header)
            try:
                kind = TaskKind(header.kind)
            except ValueError:
                raise ProtocolError(f"unknown result kind {header.kind}") from None
            logger.info(
                "[Fleet.PushResult] silo=%s round=%d kind=%s", silo, header.round, kind.name
            )
            if kind is TaskKind.TRAIN and header.HasField("resources"):
                # Advisory (the pacing policy's input): values that make no sense are
                # ignored with a warning; the update is judged on its own.
                self._federation.note_resources(silo, Resources.from_proto(header.resources))
            claim = Header(
                round=header.round,
                kind=kind,
                num_examples=header.num_examples,
                layout=layout,
                compression=compression,
                layout_problems=tuple(header_problems or []),
                compression_problems=tuple(compression_problems),
                metric_problems=tuple(metric_problems),
            )
            upload = self._federation.open_upload(
                silo, claim, task_id=header.task_id, metrics=metrics
            )
            try:
                for message in request_iterator:
                    chunk = chunk_of(message)
                    if chunk is None:
                        raise ProtocolError("only TensorChunk messages may follow the ResultHeader")
                    upload.add_chunk(*chunk)
                    reach(FaultPoint.DURING_UPLOAD)
                if not context.is_active():
                    # gRPC ends the request stream when it refuses a message (one over
                    # the size limit, say) and answers the caller with an error: the
                    # upload was cut, whatever it held so far.
                    raise StreamCut("the upload stream was cut before it ended")
            except (grpc.RpcError, StreamCut) as err:
                # Cancelled, disconnected or cut by gRPC: the upload broke off (dropped).
                self._federation.complete_upload(upload, error=err, broken=True)
                if isinstance(err, StreamCut):
                    raise
                return fleet_pb2.PushReply(accepted=False)
            except Exception as err:
                self._federation.complete_upload(upload, error=err)
                raise
            self._federation.complete_upload(upload)
            return fleet_pb2.PushReply(accepted=True)

    def Heartbeat(  # noqa: N802, D102
        self, request: fleet_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.HeartbeatReply:
        with rpc_error_translator(context, "Fleet.Heartbeat"):
            known, closed = self._federation.heartbeat(self._silo(context), request.task_id[:256])
            return fleet_pb2.HeartbeatReply(known=known, task_closed=closed)

    def Leave(  # noqa: N802, D102
        self, request: fleet_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.LeaveReply:
        with rpc_error_translator(context, "Fleet.Leave"):
            self._federation.leave(self._silo(context), request.reason[:200])
            return fleet_pb2.LeaveReply()

    def SecAgg(  # noqa: N802, D102
        self, request: fleet_pb2.SecAggRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.SecAggReply:
        with rpc_error_translator(context, "Fleet.SecAgg"):
            silo = self._silo(context)
            task_id = request.task_id
            session = self._federation.secagg_session(silo, task_id)
            step = request.WhichOneof("step")
            if step == "advertise":
                peers = session.advertise(
                    silo,
                    task_id,
                    cipher_key=request.advertise.cipher_public_key,
                    mask_key=request.advertise.mask_public_key,
                    commitment=request.advertise.graph_commitment,
                )
                commitments = session.commitments()
                return fleet_pb2.SecAggReply(
                    peers=[
                        fleet_pb2.PeerKeys(
                            silo=name,
                            cipher_public_key=c,
                            mask_public_key=m,
                            graph_commitment=commitments.get(name, b""),
                        )
                        for name, (c, m) in peers.items()
                    ]
                )
            if step == "graph":
                contributions, neighbours = session.open_graph(
                    silo, task_id, request.graph.contribution
                )
                return fleet_pb2.SecAggReply(
                    contributions=[
                        fleet_pb2.GraphContribution(silo=name, contribution=value)
                        for name, value in contributions.items()
                    ],
                    neighbours=neighbours,
                )
            if step == "share":
                shares = {s.silo: s.ciphertext for s in request.share.shares}
                if len(shares) != len(request.share.shares):
                    raise ProtocolError("two shares are addressed to the same silo")
                received = session.share(silo, task_id, shares)
                return fleet_pb2.SecAggReply(
                    shares=[
                        fleet_pb2.EncryptedShares(silo=sender, ciphertext=ciphertext)
                        for sender, ciphertext in received.items()
                    ]
                )
            if step == "roster":
                survivors, dropped = session.roster(
                    silo, task_id, until=session.deadline + self._unmask_deadline_s
                )
                return fleet_pb2.SecAggReply(survivors=survivors, dropped=dropped)
            if step == "unmask":
                session.unmask(
                    silo,
                    task_id,
                    self_mask=[(r.silo, r.x, r.y) for r in request.unmask.self_mask],
                    mask_key=[(r.silo, r.x, r.y) for r in request.unmask.mask_key],
                )
                return fleet_pb2.SecAggReply()
            raise ProtocolError("a SecAgg request must carry one step")


def add_fleet_servicer(servicer: FleetServicer, server: grpc.Server) -> None:
    """Register `servicer` as the generated code would, with hand-framed chunk streams.

    PullTask's responses and PushResult's requests are the same protobuf bytes;
    only the copies that the generated (de)serializers make are left out.
    """
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join,
            request_deserializer=fleet_pb2.JoinRequest.FromString,
            response_serializer=fleet_pb2.JoinReply.SerializeToString,
        ),
        "PullTask": grpc.unary_stream_rpc_method_handler(
            servicer.PullTask,
            request_deserializer=fleet_pb2.PullTaskRequest.FromString,
            response_serializer=serialize,
        ),
        "PushResult": grpc.stream_unary_rpc_method_handler(
            servicer.PushResult,
            request_deserializer=parse_with_chunks(fleet_pb2.ResultMessage.FromString),
            response_serializer=fleet_pb2.PushReply.SerializeToString,
        ),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat,
            request_deserializer=fleet_pb2.HeartbeatRequest.FromString,
            response_serializer=fleet_pb2.HeartbeatReply.SerializeToString,
        ),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave,
            request_deserializer=fleet_pb2.LeaveRequest.FromString,
            response_serializer=fleet_pb2.LeaveReply.SerializeToString,
        ),
        "SecAgg": grpc.unary_unary_rpc_method_handler(
            servicer.SecAgg,
            request_deserializer=fleet_pb2.SecAggRequest.FromString,
            response_serializer=fleet_pb2.SecAggReply.SerializeToString,
        ),
    }
    missing = set(fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].methods_by_name) - set(handlers)
    if missing:
        raise RuntimeError(f"Fleet methods without a handler: {sorted(missing)}")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fedpriv.v1.Fleet", handlers),)
    )
    server.add_registered_method_handlers("fedpriv.v1.Fleet", handlers)
