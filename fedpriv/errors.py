"""The one exception tree of fedpriv.

::

    FedprivError
    ├── ConfigError               bad configuration, found at start
    ├── TransportError            gRPC/TLS level problems
    │   ├── ConnectError          coordinator unreachable, handshake failed
    │   ├── AuthenticationError   no, expired or foreign certificate
    │   ├── PermissionDenied      valid certificate, identity not allowed
    │   └── CallRefused           a call ended by the caller's doing, logged rate-limited
    │       ├── LimitExceeded     too many streams, too large a message (RESOURCE_EXHAUSTED)
    │       ├── StreamStalled     no header, or no bytes, for too long (DEADLINE_EXCEEDED)
    │       ├── StreamCut         the caller cancelled, or gRPC cut, a request stream
    │       └── MalformedMessage  undecodable bytes, a stream that starts wrong (INVALID_ARGUMENT)
    ├── ProtocolError             a peer broke the Fleet protocol (stale task, ...)
    │   ├── TaskRejected          a coordinator's task failed the silo's checks
    │   ├── DuplicateSession      the identity already has a live session elsewhere
    │   └── SecAggError           a secure-aggregation peer or roster broke the protocol
    │       ├── InvalidPublicKey  an advertised X25519 key is malformed or of small order
    │       └── InvalidShare      a relayed share ciphertext did not authenticate
    ├── UpdateRejected            an update failed validation (lists every problem)
    ├── RoundFailed               a round could not complete; no model was published
    ├── PrivacyBudgetExceeded     a silo refused to train: the round would overspend its budget
    ├── PKIError                  certificate authority and certificate handling
    └── StoreError                durable state could not be read or written
        └── IntegrityError        an encrypted file: wrong key, modified or truncated

    PrivacyWarning (UserWarning)  a silo chose to send values its DP does not cover

Errors that cross the wire carry ``grpc_status`` (the name of a
``grpc.StatusCode`` member), so that one translator in each direction maps
them without ``isinstance`` ladders: the coordinator answers a raised error
with its ``grpc_status``, and a caller turns a status back into the one class
that lists it in ``grpc_received`` (``fedpriv.transport.status`` derives both
tables from these attributes; any other status is a plain TransportError).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "CallRefused",
    "ConfigError",
    "ConnectError",
    "DuplicateSession",
    "FederationStopped",
    "FedprivError",
    "IntegrityError",
    "InvalidPublicKey",
    "InvalidShare",
    "LimitExceeded",
    "MalformedMessage",
    "PKIError",
    "PermissionDenied",
    "PrivacyBudgetExceeded",
    "PrivacyWarning",
    "ProtocolError",
    "RoundFailed",
    "SecAggError",
    "StoreError",
    "StreamCut",
    "StreamStalled",
    "TaskRejected",
    "TransportError",
    "UpdateRejected",
]


class FedprivError(Exception):
    """Root of every error fedpriv raises on purpose."""

    grpc_status: ClassVar[str] = "INTERNAL"
    # The statuses a caller turns into this class, read from each class itself (never
    # inherited); each status is listed by one class at most.
    grpc_received: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def received(cls, message: str) -> FedprivError:
        """This error as a caller sees it, from a failed call's status message."""
        return cls(message)


class ConfigError(FedprivError):
    """A configuration value is missing, of the wrong type or out of range."""

    grpc_status = "INVALID_ARGUMENT"


class TransportError(FedprivError):
    """The channel to the coordinator failed."""

    grpc_status = "UNAVAILABLE"


class ConnectError(TransportError):
    """The coordinator could not be reached or the TLS handshake failed.

    A call the coordinator did not answer before the caller's deadline is one too.
    """

    grpc_status = "UNAVAILABLE"
    grpc_received = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class AuthenticationError(TransportError):
    """The peer presented no certificate, or one the federation CA did not sign."""

    grpc_status = "UNAUTHENTICATED"
    grpc_received = ("UNAUTHENTICATED",)


class PermissionDenied(TransportError):
    """The certificate is valid but its identity is not on the allow list."""

    grpc_status = "PERMISSION_DENIED"
    grpc_received = ("PERMISSION_DENIED",)


class CallRefused(TransportError):
    """The coordinator ended a call by the caller's doing.

    A broken limit (``[limits]``), undecodable bytes, a cut stream. It is logged
    where it happens, at most once per identity per ``limits.refusal_log_interval_s``,
    so that a caller cannot flood the log; the status translator does not log it again.
    """

    grpc_status = "RESOURCE_EXHAUSTED"


class LimitExceeded(CallRefused):
    """Too many concurrent streams from one identity, or a message larger than allowed."""

    grpc_status = "RESOURCE_EXHAUSTED"


class StreamStalled(CallRefused):
    """A request stream sent no header, or no bytes, for longer than its timeout."""

    grpc_status = "DEADLINE_EXCEEDED"


class StreamCut(CallRefused):
    """A request stream ended without a clean half-close.

    The caller cancelled it, or gRPC refused one of its messages (over the size
    limit) and ended the call.
    """

    grpc_status = "CANCELLED"


class MalformedMessage(CallRefused):
    """Bytes that do not decode as the method's message, or a stream that starts wrong."""

    grpc_status = "INVALID_ARGUMENT"


class ProtocolError(FedprivError):
    """A message arrived that the Fleet protocol does not allow at this point."""

    grpc_status = "FAILED_PRECONDITION"
    grpc_received = ("FAILED_PRECONDITION",)


class TaskRejected(ProtocolError):
    """A task from the coordinator failed the silo's checks; every problem is listed.

    The silo declines the task with this message as the reason, never runs it,
    and polls for the next one.

    Args:
        task_id: The task's id as the coordinator sent it.
        round: The round the task claimed to belong to.
        problems: Human-readable descriptions, one per problem.

    Example:
        >>> err = TaskRejected(task_id="t1", round=3, problems=["TRAIN task carries no model"])
        >>> str(err)
        "task 't1' for round 3 refused: TRAIN task carries no model"
    """

    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, *, task_id: str, round: int, problems: Sequence[str]) -> None:
        self.task_id = task_id
        self.round = round
        self.problems = tuple(problems)
        super().__init__(f"task {task_id!r} for round {round} refused: " + "; ".join(self.problems))


class SecAggError(ProtocolError):
    """A secure-aggregation peer, or the coordinator's relay, broke the protocol.

    For example: a roster that names a silo twice, leaves this silo out, changes
    a peer's key between steps or grows between steps. A silo that meets one
    takes no further part in the round and declines its task with this message.
    """


class InvalidPublicKey(SecAggError):
    """An advertised X25519 public key is not 32 bytes, or is a point of small order.

    A small-order key (the all-zero key, for one) makes every key agreement with
    it give a shared secret the key's owner does not need a private key for.
    The coordinator refuses such an advertisement; a silo that is relayed one
    leaves that peer out of the round, as if it had dropped.
    """

    grpc_status = "INVALID_ARGUMENT"


class InvalidShare(SecAggError):
    """A share ciphertext relayed from a peer did not authenticate.

    Opaque on purpose: it does not say whether the key, the nonce, the
    associated data or the text was wrong. The receiving silo reveals nothing
    about that peer's secrets.
    """


class DuplicateSession(ProtocolError):
    """A call under an identity that already has a live session from another connection.

    The coordinator keeps one session per identity, so that a round never
    counts an identity twice: a second process holding the same certificate
    is refused while the first has a call in progress (or took the identity
    over from it), until the first leaves, its upload breaks off, or it falls
    silent for the liveness window.
    """

    grpc_status = "ALREADY_EXISTS"
    grpc_received = ("ALREADY_EXISTS",)


class UpdateRejected(FedprivError):
    """An update failed validation; every problem found is listed.

    Args:
        silo: Identity of the silo that sent the update.
        round: Round the update claimed to belong to.
        problems: Human-readable descriptions, one per problem.
        reason: The first problem's kind, for metrics: ``layout``, ``round``,
            ``kind``, ``num_examples``, ``compression``, ``metrics``, ``privacy``
            (the reported epsilon went down), ``secagg``, ``non_finite``, ``bounds``
            (a value beyond ``rounds.max_update_value``) or ``stream``.

    Example:
        >>> err = UpdateRejected(silo="hospital-a", round=7, problems=["w: 3 NaN values"])
        >>> str(err)
        "update from silo 'hospital-a' for round 7 rejected: w: 3 NaN values"
    """

    grpc_status = "INVALID_ARGUMENT"
    # A silo's call refused as invalid is its update, or a message of its round, rejected.
    grpc_received = ("INVALID_ARGUMENT",)

    def __init__(
        self, *, silo: str, round: int, problems: Sequence[str], reason: str = "invalid"
    ) -> None:
        self.silo = silo
        self.round = round
        self.problems = tuple(problems)
        self.reason = reason
        super().__init__(
            f"update from silo {silo!r} for round {round} rejected: " + "; ".join(self.problems)
        )

    @classmethod
    def received(cls, message: str) -> FedprivError:
        """The rejection as the silo sees it: the coordinator's message is the one problem.

        >>> err = UpdateRejected.received("INVALID_ARGUMENT: w: 3 NaN values")
        >>> str(err), err.problems, err.round
        ('INVALID_ARGUMENT: w: 3 NaN values', ('INVALID_ARGUMENT: w: 3 NaN values',), -1)
        """
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        err.silo, err.round, err.problems, err.reason = "", -1, (message,), "invalid"
        return err


class RoundFailed(FedprivError):
    """A round ended without enough accepted updates; the global model is unchanged."""


class FederationStopped(FedprivError):
    """The coordinator stopped the federation before its last round (the silo exits)."""


class PrivacyBudgetExceeded(FedprivError):
    """Training this round would take the silo's epsilon past its budget.

    Args:
        spent_epsilon: Epsilon already spent (from the ledger).
        projected_epsilon: Epsilon after the refused round.
        budget_epsilon: The silo's limit.
        delta: The delta all three are computed at.
    """

    grpc_status = "FAILED_PRECONDITION"

    def __init__(
        self, *, spent_epsilon: float, projected_epsilon: float, budget_epsilon: float, delta: float
    ) -> None:
        self.spent_epsilon = spent_epsilon
        self.projected_epsilon = projected_epsilon
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        super().__init__(
            f"privacy budget exceeded: training this round would raise epsilon from "
            f"{spent_epsilon:.3f} to {projected_epsilon:.3f} (delta={delta:g}), over the "
            f"budget of {budget_epsilon:g}; the silo refuses to train and sends nothing"
        )


class PrivacyWarning(UserWarning):
    """A silo sends values that its differential privacy does not cover.

    Raised as a warning (not an error) when a silo opts in to sharing metrics
    under DP (``[privacy] share_metrics``): those values leave the silo un-noised,
    and its printed epsilon says nothing about them.
    """


class PKIError(FedprivError):
    """A certificate or key could not be created, read or verified."""


class StoreError(FedprivError):
    """Durable coordinator state could not be read or written."""


class IntegrityError(StoreError):
    """A file encrypted at rest did not authenticate: wrong key, modified or truncated.

    Also raised for a plain file where an encrypted one is expected. Nothing of
    the file was loaded.
    """
