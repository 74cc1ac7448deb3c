"""Identity from the client certificate; allow list and revocation as a server interceptor."""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509

from fedpriv.names import NAME_RULE, is_valid_name

__all__ = [
    "INSECURE_IDENTITY_KEY",
    "AuthInterceptor",
    "DenialCallback",
    "DenialReason",
    "RevocationCheck",
    "peer_identity",
]

logger = logging.getLogger(__name__)

# Metadata key that names a silo on a plain-text channel (--insecure only).
INSECURE_IDENTITY_KEY = "fedpriv-silo"
_TLS13 = b"TLSv1.3"
_UNAUTHENTICATED_PATHS = ("/grpc.health.v1.Health/",)
_ADMIN_PATH = "/fedpriv.v1.Admin/"


def peer_identity(context: grpc.ServicerContext, *, insecure: bool) -> str | None:
    """Return the caller's identity, or None when it has none.

    With TLS it is the common name of the verified client certificate (gRPC
    has checked the chain against the federation CA). With ``insecure`` it is
    whatever the caller claims in metadata: anyone can claim any name.
    """
    if insecure:
        for key, value in context.invocation_metadata():
            if key == INSECURE_IDENTITY_KEY and isinstance(value, str) and value:
                return value
        return None
    names = context.auth_context().get("x509_common_name")
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


def _tls_version(context: grpc.ServicerContext) -> bytes | None:
    values = context.auth_context().get("ssl_tls_version")
    return values[0] if values else None


@functools.lru_cache(maxsize=1024)
def _serial_of(pem: bytes) -> int | None:
    # gRPC verified the chain already; only the serial is read here (cached per certificate).
    try:
        return int(x509.load_pem_x509_certificate(pem).serial_number)
    except ValueError:
        return None


def _peer_serial(context: grpc.ServicerContext) -> int | None:
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    pem = values[0]
    return _serial_of(pem if isinstance(pem, bytes) else str(pem).encode())


class DenialReason(enum.Enum):
    """Why the interceptor refused a call (what :data:`DenialCallback` receives)."""

    OLD_TLS = "tls-version"
    NO_CERT = "no-identity"
    REVOKED = "revoked"
    # An open call (an upload or a waiting poll) ended because its certificate was revoked.
    REVOKED_WHILE_OPEN = "revoked-while-open"
    NOT_OPERATOR = "not-an-operator"
    NOT_ALLOWED = "not-on-allow-list"


# on_denied(identity or None, peer address, reason); it runs on the gRPC thread, keep it short.
DenialCallback = Callable[[str | None, str, DenialReason], None]


class RevocationCheck(Protocol):
    """What the interceptor asks about a caller's certificate serial."""

    def is_revoked(self, serial: int) -> bool:
        """True if the certificate with `serial` must no longer be accepted."""
        ...


@dataclass(frozen=True, slots=True)
class _OpenCall:
    identity: str
    serial: int
    peer: str
    context: grpc.ServicerContext


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Reject calls without an allowed identity before any servicer code runs.

    Args:
        allowed: Identities that may call the Fleet service; None admits any
            certificate the federation CA signed.
        insecure: The server runs without TLS; identities are self-declared.
        operators: Identities that may call the Admin service (and only they).
        revocations: Revoked certificate serials; a call whose certificate is on
            it gets PERMISSION_DENIED. None: nothing is revoked. Not consulted
            with `insecure` (there is no certificate).
        on_denied: Called with (identity, peer, reason) for every refused call and
            for every open call ended by :meth:`end_revoked` (an audit log's hook).
    """

    def __init__(
        self,
        *,
        allowed: Iterable[str] | None,
        insecure: bool,
        operators: Iterable[str] = (),
        revocations: RevocationCheck | None = None,
        on_denied: DenialCallback | None = None,
    ) -> None:
        self._allowed = None if allowed is None else frozenset(allowed)
        self._operators = frozenset(operators)
        self._insecure = insecure
        self._revocations = revocations
        self._on_denied = on_denied
        self._lock = threading.Lock()
        self._open: dict[int, _OpenCall] = {}
        self._tokens = itertools.count()
        # The serial each identity last called with: a revoked one means that identity is
        # gone, a renewed certificate under the same name is not.
        self._last_serial: dict[str, int] = {}

    def _deny(
        self,
        context: grpc.ServicerContext,
        *,
        identity: str | None,
        reason: DenialReason,
        code: grpc.StatusCode,
        message: str,
        method: str,
    ) -> None:
        peer = context.peer()
        logger.warning(
            "denied identity=%s peer=%s method=%s reason=%s", identity, peer, method, reason.value
        )
        self._notify(identity, peer, reason)
        context.abort(code, message)

    def _notify(self, identity: str | None, peer: str, reason: DenialReason) -> None:
        if self._on_denied is None:
            return
        try:
            self._on_denied(identity, peer, reason)
        except Exception:  # a broken hook must not let the call through or kill the thread
            logger.exception("on_denied callback failed for identity=%s", identity)

    def _check(self, context: grpc.ServicerContext, method: str) -> None:
        if not self._insecure and _tls_version(context) != _TLS13:
            # gRPC Python cannot set a minimum TLS version, so it is enforced here.
            self._deny(
                context,
                identity=peer_identity(context, insecure=False),
                reason=DenialReason.OLD_TLS,
                code=grpc.StatusCode.UNAUTHENTICATED,
                message="TLS 1.3 is required; the connection negotiated "
                f"{(_tls_version(context) or b'no TLS').decode()}",
                method=method,
            )
        identity = peer_identity(context, insecure=self._insecure)
        if identity is None:
            self._deny(
                context,
                identity=None,
                reason=DenialReason.NO_CERT,
                code=grpc.StatusCode.UNAUTHENTICATED,
                message=(
                    f"no client identity: send the {INSECURE_IDENTITY_KEY!r} metadata key "
                    "(plain-text mode)"
                    if self._insecure
                    else "no client identity: present a certificate issued by the federation CA"
                ),
                method=method,
            )
            return
        if self._insecure and not is_valid_name(identity):
            # The same rule a certificate's name follows: it appears in logs, paths and the store.
            self._deny(
                context,
                identity=None,
                reason=DenialReason.NO_CERT,
                code=grpc.StatusCode.UNAUTHENTICATED,
                message=f"{INSECURE_IDENTITY_KEY} = {identity[:80]!r} is not a valid name: "
                f"use {NAME_RULE}",
                method=method,
            )
            return
        if not self._insecure and self._revocations is not None:
            serial = _peer_serial(context)
            if serial is None:
                self._deny(
                    context,
                    identity=identity,
                    reason=DenialReason.NO_CERT,
                    code=grpc.StatusCode.UNAUTHENTICATED,
                    message="the client certificate could not be read",
                    method=method,
                )
                return
            if self._revocations.is_revoked(serial):
                self._deny(
                    context,
                    identity=identity,
                    reason=DenialReason.REVOKED,
                    code=grpc.StatusCode.PERMISSION_DENIED,
                    message=f"the certificate of {identity!r} (serial {serial:X}) has been "
                    "revoked by the federation operator; ask them for a new certificate",
                    method=method,
                )
            self._track(identity, serial, context)
        if method.startswith(_ADMIN_PATH):
            if identity not in self._operators:
                self._deny(
                    context,
                    identity=identity,
                    reason=DenialReason.NOT_OPERATOR,
                    code=grpc.StatusCode.PERMISSION_DENIED,
                    message=f"{identity!r} is not an operator of this coordinator; "
                    "ask the operator to add it to [federation] operators",
                    method=method,
                )
            return
        if self._allowed is not None and identity not in self._allowed:
            self._deny(
                context,
                identity=identity,
                reason=DenialReason.NOT_ALLOWED,
                code=grpc.StatusCode.PERMISSION_DENIED,
                message=f"silo {identity!r} is not on this coordinator's allow list; "
                "ask the operator to add it to [federation] allowed_silos",
                method=method,
            )

    def _track(self, identity: str, serial: int, context: grpc.ServicerContext) -> None:
        token = next(self._tokens)
        with self._lock:
            self._open[token] = _OpenCall(identity, serial, context.peer(), context)
            self._last_serial[identity] = serial

        def forget() -> None:
            with self._lock:
                self._open.pop(token, None)

        if not context.add_callback(forget):  # the call has ended already
            forget()

    def open_calls(self) -> int:
        """How many calls with a checked certificate are running now."""
        with self._lock:
            return len(self._open)

    def end_revoked(self, serials: Iterable[int]) -> set[str]:
        """Cancel every open call made with one of `serials`; a revocation list's listener.

        Returns:
            The identities whose latest certificate is among `serials` (gone from
            the federation, whether or not a call of theirs was open).
        """
        revoked = frozenset(serials)
        with self._lock:
            ending = [call for call in self._open.values() if call.serial in revoked]
            gone = {name for name, serial in self._last_serial.items() if serial in revoked}
        for call in ending:
            logger.warning(
                "ending open call identity=%s peer=%s reason=revoked", call.identity, call.peer
            )
            call.context.cancel()
            self._notify(call.identity, call.peer, DenialReason.REVOKED_WHILE_OPEN)
        return gone

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method handler so that the identity check runs first."""
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNAUTHENTICATED_PATHS):
            return handler
        check = self._check

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                check(context, method)
                return behavior(request, context)

            return guarded

        if handler.unary_unary:
            factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.unary_stream:
            factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        elif handler.stream_unary:
            factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        else:
            factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        return factory(
            wrap(behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
