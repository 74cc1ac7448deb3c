"""Limits against exhaustion: per-identity stream caps, stream timeouts, message sizes.

A caller that trips a limit gets RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED or
INVALID_ARGUMENT, and the coordinator's log gets at most one line per identity
per ``refusal_log_interval_s``. Everything here runs before or around the
servicers, in :class:`LimitInterceptor`; honest calls pay one counter update and,
for request streams, a hand-off between two threads per message
(:class:`fedpriv.transport.guards.TimedReader`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedpriv.errors import CallRefused, ConfigError, LimitExceeded
from fedpriv.transport.auth import peer_identity
from fedpriv.transport.guards import (
    Refusal,
    RefusalLog,
    StreamSlots,
    TimedReader,
    guard_deserializer,
)
from fedpriv.transport.options import MAX_MESSAGE_BYTES

__all__ = ["CallLimits", "LimitInterceptor", "ServerLimits"]

# gRPC's own ceiling for one message.
_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    """The coordinator's limits against exhaustion (the ``[limits]`` table).

    Args:
        max_streams_per_identity: Concurrent streaming calls (task long-polls,
            uploads) one identity may hold open; more get RESOURCE_EXHAUSTED. An
            honest silo holds at most two at a time.
        header_timeout_s: Time an upload stream has to send its first message;
            then DEADLINE_EXCEEDED.
        idle_timeout_s: Longest gap between two messages of an upload stream;
            then DEADLINE_EXCEEDED (bytes must keep flowing).
        max_header_bytes: Largest message that is not a tensor chunk (a result
            header, a SecAgg step, a join); larger gets RESOURCE_EXHAUSTED.
        max_metrics_bytes: Largest encoded metrics map in a result header.
        max_concurrent_rpcs: Calls the server runs at once, one worker thread
            each; the next gets RESOURCE_EXHAUSTED from gRPC at once instead of
            queueing behind them.
        max_connections: Open connections the server accepts; more are closed.
        max_streams_per_connection: HTTP/2 streams one connection may have open
            (``grpc.max_concurrent_streams``); further calls wait in the client. It
            bounds what one connection holds on the server; well above a burst that
            the per-identity cap refuses, since HTTP/2 answers streams past it that
            race its own bookkeeping with REFUSED_STREAM (UNAVAILABLE), not a status.
        min_ping_interval_s: Shortest interval between keepalive pings the server
            accepts on a connection without calls; faster pings are strikes.
        permit_keepalive_without_calls: Accept keepalive pings on a connection with
            no call open (silos ping between long-polls to keep NAT paths open).
        max_ping_strikes: Pings too early before the server closes the connection
            (GOAWAY, too_many_pings).
        refusal_log_interval_s: At most one log line per identity per interval
            for refused calls; the rest are counted and the count logged next time.
    """

    max_streams_per_identity: int = 4
    header_timeout_s: float = 30.0
    idle_timeout_s: float = 120.0
    max_header_bytes: int = 1 << 20
    max_metrics_bytes: int = 64 << 10
    max_concurrent_rpcs: int = 256
    max_connections: int = 1024
    max_streams_per_connection: int = 1000
    min_ping_interval_s: float = 20.0
    permit_keepalive_without_calls: bool = True
    max_ping_strikes: int = 2
    refusal_log_interval_s: float = 60.0

    def __post_init__(self) -> None:
        at_least_one = (
            "max_streams_per_identity",
            "max_concurrent_rpcs",
            "max_connections",
            "max_streams_per_connection",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} = {getattr(self, name)}: must be >= 1")
        positive = (
            "header_timeout_s",
            "idle_timeout_s",
            "min_ping_interval_s",
            "refusal_log_interval_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"limits.{name} = {getattr(self, name)}: must be > 0")
        if self.max_ping_strikes < 0:
            raise ConfigError(f"limits.max_ping_strikes = {self.max_ping_strikes}: must be >= 0")
        for name in ("max_header_bytes", "max_metrics_bytes"):
            if not 1024 <= getattr(self, name) <= _MAX_MESSAGE_BYTES:
                raise ConfigError(
                    f"limits.{name} = {getattr(self, name)}: must be in [1024, "
                    f"{_MAX_MESSAGE_BYTES}] (gRPC's message limit)"
                )
        if self.max_streams_per_identity >= self.max_concurrent_rpcs:
            raise ConfigError(
                f"limits.max_streams_per_identity = {self.max_streams_per_identity}: must be "
                f"less than limits.max_concurrent_rpcs ({self.max_concurrent_rpcs}), or one "
                "identity could occupy every worker thread"
            )

    def server_options(self) -> list[tuple[str, int | str]]:
        """The gRPC server options these limits set."""
        return [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(self.min_ping_interval_s * 1000),
            ),
            ("grpc.keepalive_permit_without_calls", int(self.permit_keepalive_without_calls)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]


class CallLimits:
    """The limits of one server: settings, per-identity slots and the refusal log.

    Args:
        settings: The configured limits.
        insecure: Identities are self-declared metadata (``--insecure``).
        clock: Monotonic seconds for the refusal log (tests pass their own).
    """

    def __init__(
        self,
        settings: ServerLimits,
        *,
        insecure: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.slots = StreamSlots(settings.max_streams_per_identity)
        self.log = RefusalLog(interval_s=settings.refusal_log_interval_s, clock=clock)
        self._insecure = insecure

    def identity(self, context: grpc.ServicerContext) -> str:
        """The caller's identity, or its peer address when it has none (health checks)."""
        identity = peer_identity(context, insecure=self._insecure)
        if identity is not None:
            return identity
        peer = context.peer() or "unknown"
        return "peer:" + peer.rpartition(":")[0]

    def refuse(
        self, identity: str, error: type[CallRefused], limit: str, detail: str
    ) -> CallRefused:
        """Log the refusal (rate-limited) and return the error to raise."""
        self.log.refused(identity, limit, detail)
        return error(detail)

    def interceptor(self) -> LimitInterceptor:
        """The server interceptor that applies these limits."""
        return LimitInterceptor(self)


def _abort(context: grpc.ServicerContext, err: CallRefused) -> None:
    context.abort(getattr(grpc.StatusCode, err.grpc_status), str(err))


class LimitInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Applies :class:`CallLimits` to every call; place it after the authorisation interceptor.

    Every request deserializer is guarded (:func:`guard_deserializer`); streaming
    calls take one of their identity's slots, released when the call ends; request
    streams are read through a :class:`TimedReader`.
    """

    def __init__(self, limits: CallLimits) -> None:
        self._limits = limits

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method handler with the limits."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        limits = self._limits
        settings = limits.settings
        deserializer = guard_deserializer(
            handler.request_deserializer, max_header_bytes=settings.max_header_bytes
        )

        def check(request: Any, identity: str, context: grpc.ServicerContext) -> None:
            if isinstance(request, Refusal):
                refusal = limits.refuse(identity, request.error, request.limit, request.detail)
                _abort(context, refusal)

        def take_slot(identity: str, context: grpc.ServicerContext) -> None:
            if not limits.slots.acquire(identity):
                _abort(
                    context,
                    limits.refuse(
                        identity,
                        LimitExceeded,
                        "max_streams_per_identity",
                        f"{identity!r} already has {settings.max_streams_per_identity} streams "
                        "open (limits.max_streams_per_identity); close one first",
                    ),
                )

        def reader(requests: Iterator[Any], identity: str) -> TimedReader:
            return TimedReader(
                requests,
                first_timeout_s=settings.header_timeout_s,
                idle_timeout_s=settings.idle_timeout_s,
                refuse=lambda error, limit, detail: limits.refuse(identity, error, limit, detail),
            )

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(request, limits.identity(context), context)
            return handler.unary_unary(request, context)

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            identity = limits.identity(context)
            check(request, identity, context)
            take_slot(identity, context)
            try:
                yield from handler.unary_stream(request, context)
            finally:
                limits.slots.release(identity)

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            identity = limits.identity(context)
            take_slot(identity, context)
            timed = reader(requests, identity)
            try:
                return handler.stream_unary(timed, context)
            except CallRefused as err:  # a servicer without its own status translator
                _abort(context, err)
            finally:
                timed.close()
                limits.slots.release(identity)

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            identity = limits.identity(context)
            take_slot(identity, context)
            timed = reader(requests, identity)
            try:
                yield from handler.stream_stream(timed, context)
            except CallRefused as err:
                _abort(context, err)
            finally:
                timed.close()
                limits.slots.release(identity)

        factory: Callable[..., grpc.RpcMethodHandler]
        behavior: Callable[..., Any]
        if handler.unary_unary:
            factory, behavior = grpc.unary_unary_rpc_method_handler, unary_unary
        elif handler.unary_stream:
            factory, behavior = grpc.unary_stream_rpc_method_handler, unary_stream
        elif handler.stream_unary:
            factory, behavior = grpc.stream_unary_rpc_method_handler, stream_unary
        else:
            factory, behavior = grpc.stream_stream_rpc_method_handler, stream_stream
        return factory(
            behavior,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
