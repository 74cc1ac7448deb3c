"""The Admin gRPC servicer: a running coordinator's state, for its operators."""

from __future__ import annotations

import grpc

from fedpriv.coordinator.audit import AuditKind, AuditLog
from fedpriv.coordinator.federation import Federation
from fedpriv.transport import peer_identity, rpc_error_translator
from fedpriv.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["AdminServicer"]


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]  # generated, untyped
    """Serves ``Admin.Status``; the interceptor admits only ``[federation] operators``."""

    def __init__(self, federation: Federation, *, audit: AuditLog, insecure: bool = False) -> None:
        self._federation = federation
        self._audit = audit
        self._insecure = insecure

    def Status(  # noqa: N802, D102
        self, request: admin_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.StatusReply:
        with rpc_error_translator(context, "Admin.Status"):
            self._audit.record(
                AuditKind.ADMIN,
                peer_identity(context, insecure=self._insecure) or "",
                context.peer(),
                "Admin.Status",
            )
            status = self._federation.status()
            config = self._federation.config
            return admin_pb2.StatusReply(
                federation=status.federation,
                state=status.state,
                round=status.round,
                num_rounds=status.num_rounds,
                completed_rounds=status.completed_rounds,
                min_clients=status.min_clients,
                silos=[
                    admin_pb2.SiloStatus(
                        name=silo.name,
                        seconds_since_seen=silo.seconds_since_seen,
                        live=silo.live,
                        round_outcome=silo.round_outcome,
                        device_kind=silo.resources.device_kind,
                        device_count=silo.resources.device_count,
                        device_memory_bytes=silo.resources.device_memory_bytes,
                        step_seconds=silo.resources.step_seconds,
                        full_steps=silo.resources.full_steps,
                        max_steps=silo.max_steps,
                    )
                    for silo in status.silos
                ],
                last_round_metrics=dict(status.last_round_metrics),
                uptime_s=status.uptime_s,
                secure_aggregation=config.secure_aggregation is not None,
                central_dp=config.dp is not None and config.secure_aggregation is None,
                rounds_without_dp=list(status.rounds_without_dp),
                discarded_updates=[
                    admin_pb2.DiscardedUpdate(round=d.round, silo=d.silo, reason=d.reason)
                    for d in self._federation.store.discarded_updates()
                ],
            )
