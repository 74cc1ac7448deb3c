"""Translate between fedpriv errors and gRPC status codes, one function each way."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc

from fedpriv import errors

__all__ = ["error_from_rpc", "rpc_error_translator", "status_of"]

logger = logging.getLogger(__name__)


def status_of(err: errors.FedprivError) -> grpc.StatusCode:
    """The status the coordinator answers `err` with: its class's ``grpc_status``."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, err.grpc_status)
    return code


@contextlib.contextmanager
def rpc_error_translator(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """Turn fedpriv errors into their gRPC status, anything else into INTERNAL.

    The public message of an unexpected error says only where to look; the
    detail goes to the coordinator's log.
    """
    try:
        yield
    except errors.CallRefused as err:  # logged, rate-limited, where it was refused
        context.abort(status_of(err), str(err))
    except errors.FedprivError as err:
        logger.info("[%s] %s: %s", method, type(err).__name__, err)
        context.abort(status_of(err), str(err))
    except Exception:
        logger.exception("[%s] unexpected error", method)
        context.abort(grpc.StatusCode.INTERNAL, "internal coordinator error; see its log")


def _error_classes() -> list[type[errors.FedprivError]]:
    named = (getattr(errors, name) for name in errors.__all__)
    return [c for c in named if isinstance(c, type) and issubclass(c, errors.FedprivError)]


def _received_by_status() -> dict[grpc.StatusCode, type[errors.FedprivError]]:
    """Each status a caller maps, to the class that lists it in its own ``grpc_received``.

    Only a class's own attribute counts: TaskRejected does not inherit ProtocolError's claim.
    """
    table: dict[grpc.StatusCode, type[errors.FedprivError]] = {}
    for cls in _error_classes():
        for name in cls.__dict__.get("grpc_received", ()):
            code = getattr(grpc.StatusCode, name)
            if code in table:
                raise TypeError(
                    f"{name} is received as both {table[code].__name__} and {cls.__name__}"
                )
            table[code] = cls
    return table


_BY_STATUS = _received_by_status()

_HANDSHAKE_HINT = (
    " (if the coordinator is up, the TLS handshake may have failed: check that this "
    "silo's certificate was issued by the federation CA and has not expired, and that "
    "the coordinator's certificate matches the address)"
)


_REFUSED_HINT = (
    " (nothing accepts connections at that address: check coordinator.address and that "
    "the coordinator is running)"
)


def error_from_rpc(err: grpc.RpcError) -> errors.FedprivError:
    """Pick the most specific fedpriv error for a failed call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_STATUS.get(code, errors.TransportError)
    message = f"{code.name}: {details}"
    lowered = details.lower()
    if cls is errors.ConnectError and "handshake failed" in lowered:
        # Retrying cannot help: the certificates do not fit each other.
        return errors.AuthenticationError(
            "the TLS handshake with the coordinator failed: this silo does not trust the "
            "coordinator's certificate (tls.ca must be the federation's ca.crt, and the "
            "coordinator's certificate must name the address, or coordinator.server_name), "
            f"or the coordinator refused this silo's certificate ({details})"
        )
    if cls is errors.ConnectError and "connection refused" in lowered:
        message += _REFUSED_HINT
    elif cls is errors.ConnectError:
        message += _HANDSHAKE_HINT
    return cls.received(message)
