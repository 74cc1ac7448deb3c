"""Status codes and errors, both directions, over a real gRPC call on loopback.

The coordinator answers every fedpriv error with its class's ``grpc_status``; the caller turns
the status back into the class that lists it in ``grpc_received`` (INVALID_ARGUMENT: the
update was rejected). Both tables come from the error classes, so a new error class cannot
drift from the translator.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from fedpriv import errors
from fedpriv.transport import error_from_rpc, rpc_error_translator
from fedpriv.transport.status import status_of

SPECIAL = {
    "TaskRejected": lambda: errors.TaskRejected(task_id="t1", round=3, problems=["no model"]),
    "UpdateRejected": lambda: errors.UpdateRejected(silo="a", round=3, problems=["w: NaN"]),
    "PrivacyBudgetExceeded": lambda: errors.PrivacyBudgetExceeded(
        spent_epsilon=1.0, projected_epsilon=2.0, budget_epsilon=1.5, delta=1e-5
    ),
}
CLASSES = [
    name
    for name in errors.__all__
    if isinstance(getattr(errors, name), type)
    and issubclass(getattr(errors, name), errors.FedprivError)
]


# Statuses no caller maps to a class of its own (a caller retries them as any transport
# failure): an unexpected coordinator error, a cut stream, a call refused by a limit.
UNMAPPED = {"INTERNAL", "CANCELLED", "RESOURCE_EXHAUSTED"}


def _raise(name: str) -> errors.FedprivError:
    return SPECIAL[name]() if name in SPECIAL else getattr(errors, name)(f"a {name}")


@pytest.fixture(scope="module")
def call() -> Iterator:
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        with rpc_error_translator(context, "Raise"):
            raise _raise(request.decode())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_unary("/test.Errors/Raise")
    try:
        yield lambda name: method(name.encode(), timeout=10)
    finally:
        channel.close()
        server.stop(None)


@pytest.mark.parametrize("name", CLASSES)
def test_a_raised_error_arrives_with_its_status_and_comes_back_as_the_class_that_owns_it(
    call, name
):
    raised = _raise(name)
    with pytest.raises(grpc.RpcError) as caught:
        call(name)
    code = caught.value.code()
    assert code == status_of(raised) and code.name == raised.grpc_status
    assert str(raised) in caught.value.details()
    received = error_from_rpc(caught.value)
    if raised.grpc_status in UNMAPPED:
        assert type(received) is errors.TransportError
    else:  # the class the caller gets stands for the status the error was answered with
        assert raised.grpc_status in type(received).__dict__["grpc_received"]
    assert str(raised) in str(received)


def test_an_invalid_argument_comes_back_as_update_rejected_with_the_coordinators_message(call):
    with pytest.raises(grpc.RpcError) as caught:
        call("UpdateRejected")
    received = error_from_rpc(caught.value)
    assert type(received) is errors.UpdateRejected
    assert received.problems == (str(received),) and "w: NaN" in str(received)
    # A MalformedMessage or a ConfigError is answered INVALID_ARGUMENT too: the silo's call was refused.
    with pytest.raises(grpc.RpcError) as caught:
        call("MalformedMessage")
    assert type(error_from_rpc(caught.value)) is errors.UpdateRejected


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_maps_to_one_class_that_declares_it_or_to_transport_error(code):
    class Failed(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "detail"

    received = error_from_rpc(Failed())
    owners = [
        name
        for name in CLASSES
        if code.name in getattr(errors, name).__dict__.get("grpc_received", ())
    ]
    assert len(owners) <= 1
    assert type(received).__name__ == (owners[0] if owners else "TransportError")
    assert "detail" in str(received)


def test_every_status_an_error_is_answered_with_is_one_a_caller_maps():
    # A class's grpc_status that no class claims would come back as a bare TransportError.
    claimed = {
        s for name in CLASSES for s in getattr(errors, name).__dict__.get("grpc_received", ())
    }
    answered = {getattr(errors, name).grpc_status for name in CLASSES}
    assert answered - claimed == UNMAPPED
