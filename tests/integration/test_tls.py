"""Real TLS handshakes on loopback: who may join and who may not."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedpriv.client import run_client
from fedpriv.coordinator import Coordinator
from fedpriv.errors import ConfigError, ConnectError, PermissionDenied
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.helpers import make_config


@pytest.fixture
def coordinator(tmp_path, pki):
    config = make_config(
        tmp_path, pki.root, {"w": np.zeros(2, np.float32)}, allowed=("silo-a", "silo-b")
    )
    with Coordinator(config) as running:
        yield running


def _join(channel: grpc.Channel) -> fleet_pb2.JoinReply:
    return fleet_pb2_grpc.FleetStub(channel).Join(fleet_pb2.JoinRequest(), timeout=5)


def test_allowed_silo_joins_under_its_certificate_name(coordinator, pki):
    with open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a")) as channel:
        reply = _join(channel)
    assert reply.silo == "silo-a"
    assert coordinator.federation.available() == ["silo-a"]


def test_certificate_from_another_ca_fails_the_handshake(coordinator, pki):
    with open_channel(
        f"127.0.0.1:{coordinator.port}", tls=pki.tls("silo-a", foreign=True)
    ) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _join(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.federation.available() == []


def test_sdk_reports_foreign_certificate_as_connect_error_with_hint(coordinator, pki, array_client):
    with pytest.raises(ConnectError, match="certificate was issued by the federation CA"):
        run_client(
            array_client(),
            coordinator=f"127.0.0.1:{coordinator.port}",
            tls=pki.tls("silo-a", foreign=True),
            reconnect_timeout_s=1.0,
        )


def test_valid_certificate_not_on_allow_list_gets_permission_denied(coordinator, pki, array_client):
    with open_channel(f"127.0.0.1:{coordinator.port}", tls=pki.tls("intruder")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _join(channel)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "intruder" in caught.value.details() and "allow list" in caught.value.details()
    with pytest.raises(PermissionDenied):
        run_client(
            array_client(), coordinator=f"127.0.0.1:{coordinator.port}", tls=pki.tls("intruder")
        )
    assert coordinator.federation.available() == []


def test_client_without_certificate_cannot_connect(coordinator, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki.root / "ca.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{coordinator.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _join(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.federation.available() == []


def test_plain_text_client_cannot_talk_to_tls_coordinator(coordinator):
    with grpc.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _join(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_silo_refuses_coordinator_whose_certificate_another_ca_signed(tmp_path, pki):
    # The silo pins the foreign CA: the real coordinator's certificate must not verify.
    from fedpriv.transport import TLSConfig

    config = make_config(tmp_path, pki.root, {"w": np.zeros(2, np.float32)})
    with Coordinator(config) as running:
        tls = TLSConfig.from_files(
            ca=pki.foreign / "ca.crt",
            cert=pki.foreign / "silo-a.crt",
            key=pki.foreign / "silo-a.key",
        )
        with open_channel(f"127.0.0.1:{running.port}", tls=tls) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _join(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_insecure_mode_requires_the_explicit_flag(tmp_path, pki):
    from fedpriv.errors import ConfigError

    config = make_config(tmp_path, None, {"w": np.zeros(2, np.float32)})
    with pytest.raises(ConfigError, match="--insecure"):
        Coordinator(config)


def test_health_service_reports_serving(tmp_path, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = make_config(tmp_path, pki.root, {"w": np.zeros(2, np.float32)})
    with Coordinator(config) as running:
        with open_channel(f"127.0.0.1:{running.port}", tls=pki.tls("silo-c")) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "fedpriv.v1.Fleet"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_insecure_mode_logs_a_warning(tmp_path, caplog):
    config = make_config(tmp_path, None, {"w": np.zeros(2, np.float32)})
    with caplog.at_level("WARNING", logger="fedpriv.transport.server"):
        with Coordinator(config, insecure=True):
            pass
    assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)


# ---- real handshakes pinned to one TLS version, and an expired certificate ------------------


def _raw_context(pki, name: str, version, *, root=None):
    import ssl

    from tests.h2_raw import tls_context

    base = root or pki.root
    return tls_context(
        version=ssl.TLSVersion[version],
        ca=str(pki.root / "ca.crt"),
        cert=str(base / f"{name}.crt"),
        key=str(base / f"{name}.key"),
    )


def test_real_tls12_client_with_a_valid_certificate_is_refused(coordinator, pki):
    # gRPC Python cannot set a minimum TLS version (grpc/grpc#37305): the handshake itself
    # succeeds, and the interceptor refuses every call before any servicer code runs.
    from tests.h2_raw import unary_call

    refused = unary_call(
        _raw_context(pki, "silo-a", "TLSv1_2"), coordinator.port, "/fedpriv.v1.Fleet/Join"
    )
    assert (refused.version, refused.alpn) == ("TLSv1.2", "h2")
    assert refused.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "TLS 1.3 is required" in refused.headers["grpc-message"]
    assert "TLSv1.2" in refused.headers["grpc-message"]
    assert coordinator.federation.available() == []
    # The same raw client over TLS 1.3 is admitted: the refusal above is the version's.
    admitted = unary_call(
        _raw_context(pki, "silo-a", "TLSv1_3"), coordinator.port, "/fedpriv.v1.Fleet/Join"
    )
    assert admitted.version == "TLSv1.3" and admitted.grpc_status == 0
    assert coordinator.federation.available() == ["silo-a"]


@pytest.fixture
def expired(pki, tmp_path):
    """silo-a's name, on the allow list, under a certificate that expired in 2020."""
    import datetime as dt

    from fedpriv.pki import CertificateAuthority, Role

    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    CertificateAuthority.load(pki.root, now=lambda: long_ago).issue(
        "silo-a", role=Role.CLIENT, out_dir=tmp_path, days=1
    )
    return tmp_path


def test_expired_certificate_fails_the_handshake(coordinator, pki, expired):
    from fedpriv.transport import TLSConfig

    # from_files refuses an expired certificate before connecting (test below); built
    # as is, the coordinator must refuse it too.
    tls = TLSConfig(
        ca_pem=(pki.root / "ca.crt").read_bytes(),
        cert_pem=(expired / "silo-a.crt").read_bytes(),
        key_pem=(expired / "silo-a.key").read_bytes(),
    )
    with pytest.raises(ConfigError, match="not now"):
        TLSConfig.from_files(
            ca=pki.root / "ca.crt", cert=expired / "silo-a.crt", key=expired / "silo-a.key"
        )
    with open_channel(f"127.0.0.1:{coordinator.port}", tls=tls) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _join(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.federation.available() == []


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_real_tls_client_with_an_expired_certificate_gets_no_answer(
    coordinator, pki, expired, version
):
    import ssl

    from tests.h2_raw import unary_call

    try:
        answer = unary_call(
            _raw_context(pki, "silo-a", version, root=expired),
            coordinator.port,
            "/fedpriv.v1.Fleet/Join",
        )
    except ssl.SSLError:
        pass  # TLS 1.2: the server aborts the handshake itself
    else:
        # TLS 1.3: the client's side completes before the server checks its certificate;
        # the server then closes without a single HTTP/2 frame.
        assert answer.closed_without_answer and answer.frames == []
    assert coordinator.federation.available() == []
