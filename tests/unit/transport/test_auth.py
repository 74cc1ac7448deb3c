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
        self.callbacks = []
        self.cancelled = False

    def auth_context(self):
        return self._auth

    def peer(self):
        return "ipv4:127.0.0.1:50000"

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def cancel(self):
        self.cancelled = True

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


# ---- revocation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    from fedpriv.pki import CertificateAuthority, Role

    root = tmp_path_factory.mktemp("auth-pki")
    ca = CertificateAuthority.create(root, federation="fed")
    pems = {}
    for label in ("silo-a", "silo-b"):
        pems[label] = ca.issue(label, role=Role.CLIENT, out_dir=root).cert_path.read_bytes()
    renewed = root / "renewed"
    pems["silo-a-renewed"] = ca.issue(
        "silo-a", role=Role.CLIENT, out_dir=renewed
    ).cert_path.read_bytes()
    return ca, pems


def _serial(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).serial_number


def tls_context(name: str, pem: bytes) -> FakeContext:
    return FakeContext(
        {
            "ssl_tls_version": [b"TLSv1.3"],
            "x509_common_name": [name.encode()],
            "x509_pem_cert": [pem],
        }
    )


class Revoked:
    def __init__(self, *serials):
        self.serials = set(serials)

    def is_revoked(self, serial):
        return serial in self.serials


def test_revoked_certificate_is_denied_with_a_message_naming_revocation(certificates):
    from fedpriv.transport import DenialReason

    _, pems = certificates
    denied = []
    interceptor = AuthInterceptor(
        allowed=None,
        insecure=False,
        revocations=Revoked(_serial(pems["silo-a"])),
        on_denied=lambda *args: denied.append(args),
    )
    context = tls_context("silo-a", pems["silo-a"])
    with pytest.raises(Aborted):
        run_guarded(interceptor, context)
    assert context.code == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in context.details and "silo-a" in context.details
    assert denied == [("silo-a", "ipv4:127.0.0.1:50000", DenialReason.REVOKED)]
    # The same name under a renewed certificate (new serial) and another silo still pass.
    assert run_guarded(interceptor, tls_context("silo-a", pems["silo-a-renewed"])) == "ok"
    assert run_guarded(interceptor, tls_context("silo-b", pems["silo-b"])) == "ok"


def test_an_unreadable_certificate_is_refused_when_revocation_is_checked(certificates):
    context = tls_context("silo-a", b"not a certificate")
    with pytest.raises(Aborted):
        run_guarded(AuthInterceptor(allowed=None, insecure=False, revocations=Revoked()), context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED


def test_end_revoked_cancels_only_the_open_calls_of_revoked_serials(certificates):
    from fedpriv.transport import DenialReason

    _, pems = certificates
    denied = []
    interceptor = AuthInterceptor(
        allowed=None, insecure=False, revocations=Revoked(), on_denied=lambda *a: denied.append(a)
    )
    a, b = tls_context("silo-a", pems["silo-a"]), tls_context("silo-b", pems["silo-b"])
    run_guarded(interceptor, a)
    run_guarded(interceptor, b)
    assert interceptor.open_calls() == 2
    gone = interceptor.end_revoked({_serial(pems["silo-a"])})
    assert gone == {"silo-a"}
    assert a.cancelled and not b.cancelled
    assert denied == [("silo-a", "ipv4:127.0.0.1:50000", DenialReason.REVOKED_WHILE_OPEN)]
    for callback in a.callbacks + b.callbacks:  # the calls end
        callback()
    assert interceptor.open_calls() == 0


def test_a_silo_that_moved_to_a_renewed_certificate_is_not_gone(certificates):
    _, pems = certificates
    interceptor = AuthInterceptor(allowed=None, insecure=False, revocations=Revoked())
    run_guarded(interceptor, tls_context("silo-a", pems["silo-a"]))
    run_guarded(interceptor, tls_context("silo-a", pems["silo-a-renewed"]))
    assert interceptor.end_revoked({_serial(pems["silo-a"])}) == set()


def test_on_denied_hears_every_refusal_and_a_failing_hook_still_refuses(certificates):
    from fedpriv.transport import DenialReason

    _, pems = certificates
    heard = []

    def hook(identity, peer, reason):
        heard.append((identity, reason))
        raise RuntimeError("audit log down")

    interceptor = AuthInterceptor(allowed=["silo-b"], insecure=False, on_denied=hook)
    for context in (
        tls_context("silo-a", pems["silo-a"]),
        FakeContext({"ssl_tls_version": [b"TLSv1.3"]}),
        FakeContext({**TLS13, "ssl_tls_version": [b"TLSv1.2"]}),
    ):
        with pytest.raises(Aborted):
            run_guarded(interceptor, context)
    with pytest.raises(Aborted):
        run_guarded(interceptor, tls_context("silo-b", pems["silo-b"]), "/fedpriv.v1.Admin/Status")
    assert heard == [
        ("silo-a", DenialReason.NOT_ALLOWED),
        (None, DenialReason.NO_CERT),
        ("silo-a", DenialReason.OLD_TLS),
        ("silo-b", DenialReason.NOT_OPERATOR),
    ]


def test_interceptor_follows_the_crl_file_as_it_changes(certificates, tmp_path):
    from fedpriv.pki import CertificateAuthority, RevocationList, Role

    ca = CertificateAuthority.create(tmp_path, federation="fed")
    pem = ca.issue("silo-c", role=Role.CLIENT, out_dir=tmp_path).cert_path.read_bytes()
    interceptor = AuthInterceptor(
        allowed=None,
        insecure=False,
        revocations=RevocationList(ca.crl_path, issuer=ca.certificate),
    )
    assert run_guarded(interceptor, tls_context("silo-c", pem)) == "ok"
    ca.revoke("silo-c")
    context = tls_context("silo-c", pem)
    with pytest.raises(Aborted):
        run_guarded(interceptor, context)
    assert context.code == grpc.StatusCode.PERMISSION_DENIED


def test_insecure_mode_consults_no_revocation_list():
    class Explodes:
        def is_revoked(self, serial):
            raise AssertionError("consulted")

    context = FakeContext({}, metadata=(("fedpriv-silo", "silo-a"),))
    interceptor = AuthInterceptor(allowed=None, insecure=True, revocations=Explodes())
    assert run_guarded(interceptor, context) == "ok"


@pytest.mark.parametrize(
    "claimed", ["silo a", "x" * 64, "-leading-dash", "silo\nforged-log-line", "silo/../etc"]
)
def test_insecure_mode_refuses_an_identity_no_certificate_could_carry(claimed):
    context = FakeContext({}, metadata=(("fedpriv-silo", claimed),))
    with pytest.raises(Aborted):
        run_guarded(AuthInterceptor(allowed=None, insecure=True), context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert "fedpriv-silo" in context.details and "letters, digits" in context.details


def test_insecure_mode_without_the_identity_key_names_the_key():
    context = FakeContext({}, metadata=(("fedpriv-session", "0" * 32),))
    with pytest.raises(Aborted):
        run_guarded(AuthInterceptor(allowed=None, insecure=True), context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert "'fedpriv-silo' metadata key" in context.details
