"""Identity from the client certificate, and the allow list as a server interceptor."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc

__all__ = ["INSECURE_IDENTITY_KEY", "AuthInterceptor", "peer_identity"]

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


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Reject calls without an allowed identity before any servicer code runs.

    Args:
        allowed: Identities that may call the Fleet service; None admits any
            certificate the federation CA signed.
        insecure: The server runs without TLS; identities are self-declared.
        operators: Identities that may call the Admin service (and only they).
    """

    def __init__(
        self,
        *,
        allowed: Iterable[str] | None,
        insecure: bool,
        operators: Iterable[str] = (),
    ) -> None:
        self._allowed = None if allowed is None else frozenset(allowed)
        self._operators = frozenset(operators)
        self._insecure = insecure

    def _check(self, context: grpc.ServicerContext, method: str) -> None:
        if not self._insecure and _tls_version(context) != _TLS13:
            # gRPC Python cannot set a minimum TLS version, so it is enforced here.
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "TLS 1.3 is required; the connection negotiated "
                f"{(_tls_version(context) or b'no TLS').decode()}",
            )
        identity = peer_identity(context, insecure=self._insecure)
        if identity is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client identity: present a certificate issued by the federation CA",
            )
        if method.startswith(_ADMIN_PATH):
            if identity not in self._operators:
                logger.warning(
                    "denied identity=%s method=%s reason=not-an-operator", identity, method
                )
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{identity!r} is not an operator of this coordinator; "
                    "ask the operator to add it to [federation] operators",
                )
            return
        if self._allowed is not None and identity not in self._allowed:
            logger.warning("denied silo=%s method=%s reason=not-on-allow-list", identity, method)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"silo {identity!r} is not on this coordinator's allow list; "
                "ask the operator to add it to [federation] allowed_silos",
            )

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
