"""Translate between fedpriv errors and gRPC status codes, one function each way."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc

from fedpriv import errors

__all__ = ["error_from_rpc", "rpc_error_translator"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def rpc_error_translator(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """Turn fedpriv errors into their gRPC status, anything else into INTERNAL.

    The public message of an unexpected error says only where to look; the
    detail goes to the coordinator's log.
    """
    try:
        yield
    except errors.CallRefused as err:  # logged, rate-limited, where it was refused
        context.abort(getattr(grpc.StatusCode, err.grpc_status), str(err))
    except errors.FedprivError as err:
        logger.info("[%s] %s: %s", method, type(err).__name__, err)
        context.abort(getattr(grpc.StatusCode, err.grpc_status), str(err))
    except Exception:
        logger.exception("[%s] unexpected error", method)
        context.abort(grpc.StatusCode.INTERNAL, "internal coordinator error; see its log")


_BY_STATUS: dict[grpc.StatusCode, type[errors.FedprivError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: errors.ConnectError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.ConnectError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ProtocolError,
    grpc.StatusCode.ALREADY_EXISTS: errors.DuplicateSession,
    grpc.StatusCode.INVALID_ARGUMENT: errors.ProtocolError,
}

_HANDSHAKE_HINT = (
    " (if the coordinator is up, the TLS handshake may have failed: check that this "
    "silo's certificate was issued by the federation CA and has not expired, and that "
    "the coordinator's certificate matches the address)"
)


def error_from_rpc(err: grpc.RpcError) -> errors.FedprivError:
    """Pick the most specific fedpriv error for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_STATUS.get(code, errors.TransportError)
    message = f"{code.name}: {details}"
    if cls is errors.ConnectError:
        message += _HANDSHAKE_HINT
    return cls(message)
