from __future__ import annotations

import grpc
import pytest

from fedpriv import errors
from fedpriv.transport import AuthInterceptor, error_from_rpc


class Aborted(Exception):
    pass


class FakeContext:
    """Stands in for grpc.ServicerContext: what TLS reported, and where abort goes."""

    def __init__(self, auth: dict[str, list[bytes]], metadata=()):
        self._auth = auth
        self._metadata = metadata
        self.code = None
        self.details = None

    def auth_context(self):
        return self._auth

    def invocation_metadata(self):
        return self._metadata

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(details)


def run_guarded(interceptor, context, method="/fedpriv.v1.Fleet/Join"):
    handler = grpc.unary_unary_rpc_method_handler(lambda request, ctx: "ok")
    details = type("D", (), {"method": method, "invocation_metadata": ()})()
    guarded = interceptor.intercept_service(lambda _: handler, details)
    return guarded.unary_unary(None, context)


TLS13 = {"ssl_tls_version": [b"TLSv1.3"], "x509_common_name": [b"silo-a"]}


def test_allowed_identity_over_tls13_passes():
    assert (
        run_guarded(AuthInterceptor(allowed=["silo-a"], insecure=False), FakeContext(TLS13)) == "ok"
    )


def test_tls12_is_refused_even_with_a_valid_certificate():
    context = FakeContext({**TLS13, "ssl_tls_version": [b"TLSv1.2"]})
    with pytest.raises(Aborted):
        run_guarded(AuthInterceptor(allowed=None, insecure=False), context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and "TLSv1.2" in context.details


def test_identity_not_on_allow_list_is_denied():
    context = FakeContext(TLS13)
    with pytest.raises(Aborted):
        run_guarded(AuthInterceptor(allowed=["silo-b"], insecure=False), context)
    assert context.code == grpc.StatusCode.PERMISSION_DENIED


def test_insecure_mode_takes_identity_from_metadata_only_when_enabled():
    context = FakeContext({}, metadata=(("fedpriv-silo", "silo-a"),))
    assert run_guarded(AuthInterceptor(allowed=["silo-a"], insecure=True), context) == "ok"
    with pytest.raises(Aborted):
        run_guarded(
            AuthInterceptor(allowed=["silo-a"], insecure=False),
            FakeContext({}, metadata=(("fedpriv-silo", "silo-a"),)),
        )


def test_health_checks_bypass_the_allow_list():
    context = FakeContext({})
    assert (
        run_guarded(
            AuthInterceptor(allowed=["x"], insecure=False), context, "/grpc.health.v1.Health/Check"
        )
        == "ok"
    )


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, errors.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAVAILABLE, errors.ConnectError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.ProtocolError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.TransportError),
    ],
)
def test_rpc_errors_map_to_the_most_specific_class(code, cls):
    err = error_from_rpc(FakeRpcError(code, "detail"))
    assert type(err) is cls and "detail" in str(err)
