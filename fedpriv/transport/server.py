"""Server and channel factories: mTLS unless the caller asks for plain text by name."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedpriv.errors import ConfigError
from fedpriv.transport.auth import INSECURE_IDENTITY_KEY, AuthInterceptor
from fedpriv.transport.limits import CallLimits, ServerLimits
from fedpriv.transport.options import CHANNEL_OPTIONS, SERVER_OPTIONS
from fedpriv.transport.tls import TLSConfig

__all__ = ["ServerHandle", "open_channel", "serve", "with_metadata"]

logger = logging.getLogger(__name__)

_INSECURE_WARNING = (
    "running WITHOUT TLS (--insecure): traffic is readable and any peer can claim any "
    "silo identity; use this only on a trusted test network"
)


class ServerHandle:
    """A running server, its bound port and its health service."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        limits: CallLimits,
    ):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.limits = limits

    def stop(self, grace_s: float = 5.0) -> None:
        """Mark the service NOT_SERVING, then stop, giving calls `grace_s` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


@contextlib.contextmanager
def serve(
    add_servicers: Callable[[grpc.Server], Iterable[str]],
    *,
    address: str,
    tls: TLSConfig | None,
    insecure: bool = False,
    allowed: Iterable[str] | None = None,
    operators: Iterable[str] = (),
    auth: AuthInterceptor | None = None,
    limits: CallLimits | None = None,
) -> Iterator[ServerHandle]:
    """Run a gRPC server with mTLS, the allow list and the health service.

    Args:
        add_servicers: Registers the servicers on the server; returns their
            service names for the health service.
        address: ``host:port``; port 0 picks a free port (see the handle).
        tls: Server credentials; required unless `insecure`.
        insecure: Serve plain text (logs a warning).
        allowed: Identities allowed to call; None admits any CA-signed certificate.
        operators: Identities allowed to call the Admin service.
        auth: The authorisation interceptor, when the caller keeps it (revocation);
            by default one is built from `allowed`, `operators` and `insecure`.
        limits: Per-identity stream caps, timeouts, sizes, connection and keepalive
            limits; None: the defaults of :class:`ServerLimits`.

    Yields:
        The running server's handle; the server stops when the block exits.

    Raises:
        ConfigError: Neither TLS material nor `insecure` was given, or the address
            could not be bound.
    """
    credentials = None if insecure or tls is None else tls.server_credentials()
    if credentials is None and not insecure:
        raise ConfigError("TLS material is required; pass insecure=True to serve plain text")
    limits = limits or CallLimits(ServerLimits(), insecure=insecure)
    most = limits.settings.max_concurrent_rpcs
    server = grpc.server(
        # One thread per admitted call: a call gRPC admits never waits for a thread,
        # and the next one is refused with RESOURCE_EXHAUSTED instead of queueing.
        futures.ThreadPoolExecutor(max_workers=most, thread_name_prefix="fedpriv-rpc"),
        # The identity is checked first, so that limits count authorised identities.
        interceptors=[
            auth or AuthInterceptor(allowed=allowed, insecure=insecure, operators=operators),
            limits.interceptor(),
        ],
        options=[*SERVER_OPTIONS, *limits.settings.server_options()],
        maximum_concurrent_rpcs=most,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(add_servicers(server))
    try:
        if insecure:
            logger.warning(_INSECURE_WARNING)
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {address}: {err}") from err
    if port == 0:
        raise ConfigError(f"cannot listen on {address}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    handle = ServerHandle(server, port, health_servicer, limits)
    try:
        yield handle
    finally:
        handle.stop()


def open_channel(
    target: str,
    *,
    tls: TLSConfig | None,
    insecure: bool = False,
    identity: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """Open a channel to the coordinator that trusts only the federation CA.

    Args:
        target: ``host:port`` of the coordinator.
        tls: This silo's TLS material; required unless `insecure`.
        insecure: Use plain text (logs a warning); `identity` is then sent as metadata.
        identity: Silo name to claim on a plain-text channel.
        server_name: Name to verify the coordinator's certificate against, when it
            differs from the host in `target` (tests, NAT).

    Raises:
        ConfigError: Neither TLS material nor `insecure` was given.
    """
    options = list(CHANNEL_OPTIONS)
    if insecure:
        logger.warning(_INSECURE_WARNING)
        channel = grpc.insecure_channel(target, options=options)
        if identity:
            channel = with_metadata(channel, (INSECURE_IDENTITY_KEY, identity))
        return channel
    if tls is None:
        raise ConfigError("TLS material is required; pass insecure=True for plain text")
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)


class _CallMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]  # grpc ships no types
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
):
    """Adds fixed metadata to every call made on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


def with_metadata(channel: grpc.Channel, *pairs: tuple[str, str]) -> grpc.Channel:
    """`channel`, sending the (key, value) `pairs` as metadata with every call."""
    return grpc.intercept_channel(channel, _CallMetadata(tuple(pairs)))
