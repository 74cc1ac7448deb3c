"""gRPC transport: mTLS credentials, server and channel factories, identity, status mapping."""

from __future__ import annotations

from fedpriv.transport.auth import AuthInterceptor, DenialReason, peer_identity
from fedpriv.transport.server import ServerHandle, open_channel, serve
from fedpriv.transport.status import error_from_rpc, rpc_error_translator
from fedpriv.transport.tls import TLSConfig

__all__ = [
    "AuthInterceptor",
    "DenialReason",
    "ServerHandle",
    "TLSConfig",
    "error_from_rpc",
    "open_channel",
    "peer_identity",
    "rpc_error_translator",
    "serve",
]
