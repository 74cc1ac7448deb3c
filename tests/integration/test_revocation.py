"""Revocation without a restart: real gRPC, real mTLS, the real ``fedpriv pki`` command."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from fedpriv.coordinator import Coordinator
from fedpriv.coordinator.audit import AuditKind
from fedpriv.coordinator.config import TLSFiles
from fedpriv.errors import PermissionDenied, PKIError
from fedpriv.pki import CertificateAuthority, Role
from fedpriv.transport import DenialReason, TLSConfig, open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.helpers import CollectingReporter, make_config, silo_thread, wait_silos

SILOS = ("silo-1", "silo-2", "silo-3")


@pytest.fixture
def ca_dir(tmp_path):
    # A CA of its own: the revocations below must not reach other tests' coordinators.
    root = tmp_path / "ca"
    ca = CertificateAuthority.create(root, federation="revfed")
    ca.issue("coordinator", role=Role.SERVER, out_dir=root, hosts=["127.0.0.1"])
    for name in SILOS:
        ca.issue(name, role=Role.CLIENT, out_dir=root)
    return root


def tls(root, name: str) -> TLSConfig:
    return TLSConfig.from_files(
        ca=root / "ca.crt", cert=root / f"{name}.crt", key=root / f"{name}.key"
    )


def revoke_with_the_cli(root, name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedpriv", "pki", "revoke", name, "--dir", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    tick = threading.Event()
    for _ in range(int(timeout_s * 100)):
        if predicate():
            return
        tick.wait(0.01)
    raise AssertionError("condition not reached")


class Delta:
    """A silo whose update is the model plus `delta`; `on_fit` runs inside fit."""

    def __init__(self, delta: float, on_fit=None):
        self.delta = delta
        self.on_fit = on_fit

    def fit(self, parameters, *, config):
        from fedpriv.client import FitResult

        if self.on_fit is not None:
            self.on_fit()
        return FitResult(
            parameters={k: v + np.float32(self.delta) for k, v in parameters.items()},
            num_examples=10,
            metrics={},
        )

    def evaluate(self, parameters, *, config):
        from fedpriv.client import EvaluateResult

        return EvaluateResult(num_examples=10, metrics={"loss": 0.0})


def test_revoking_a_silo_mid_round_refuses_its_next_call_and_the_others_finish(ca_dir, tmp_path):
    # Arrange: a round that needs all three silos selected and two results.
    config = make_config(
        tmp_path,
        ca_dir,
        {"w": np.zeros(4, np.float32)},
        allowed=SILOS,
        num_rounds=1,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    denied: list[tuple[str | None, DenialReason]] = []
    reporter = CollectingReporter()
    revoked = threading.Event()

    def revoke_me() -> None:
        revoke_with_the_cli(ca_dir, "silo-2")  # during silo-2's training
        revoked.set()

    clients = [Delta(1.0), Delta(100.0, on_fit=revoke_me), Delta(3.0)]
    with Coordinator(
        config, reporter=reporter, on_denied=lambda who, peer, why: denied.append((who, why))
    ) as coordinator:
        started = id(coordinator.federation)
        # Act
        with (
            silo_thread(clients[0], port=coordinator.port, tls=tls(ca_dir, "silo-1")) as one,
            silo_thread(clients[1], port=coordinator.port, tls=tls(ca_dir, "silo-2")) as two,
            silo_thread(clients[2], port=coordinator.port, tls=tls(ca_dir, "silo-3")) as three,
        ):
            assert coordinator.wait(timeout_s=120)
            wait_silos([one, two, three])
        # Assert: the same coordinator ran the round to the end without silo-2's update.
        assert revoked.is_set()
        assert id(coordinator.federation) == started
        model = {k: v.copy() for k, v in coordinator.federation.model.arrays().items()}
    error = two.get("error")
    assert isinstance(error, PermissionDenied), two
    assert "revoked" in str(error) and "silo-2" in str(error)
    assert one.get("stats") is not None and three.get("stats") is not None
    assert one["stats"].trained == 1 and three["stats"].trained == 1
    assert [s.round for s in reporter.completed] == [1]
    assert reporter.completed[0].accepted == 2
    np.testing.assert_allclose(model["w"], np.full(4, 2.0, np.float32))  # (1 + 3) / 2
    assert ("silo-2", DenialReason.REVOKED) in denied


def test_an_open_call_of_a_revoked_silo_is_ended_and_it_leaves(ca_dir, tmp_path):
    config = dataclasses.replace(
        make_config(tmp_path, ca_dir, {"w": np.zeros(2, np.float32)}, min_clients=3),
        poll_wait_s=60,
    )
    denied: list[tuple[str | None, DenialReason]] = []
    with Coordinator(config, on_denied=lambda who, peer, why: denied.append((who, why))) as running:
        target = f"127.0.0.1:{running.port}"
        with (
            open_channel(target, tls=tls(ca_dir, "silo-2")) as revoked_channel,
            open_channel(target, tls=tls(ca_dir, "silo-1")) as other_channel,
        ):
            revoked_stub = fleet_pb2_grpc.FleetStub(revoked_channel)
            other_stub = fleet_pb2_grpc.FleetStub(other_channel)
            revoked_stub.Join(fleet_pb2.JoinRequest(), timeout=10)
            other_stub.Join(fleet_pb2.JoinRequest(), timeout=10)
            auth = running._auth
            assert auth is not None
            wait_until(lambda: auth.open_calls() == 0)  # both joins have ended
            # A long poll: no round can start with two of three silos.
            poll = revoked_stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=60), timeout=60)
            wait_until(lambda: auth.open_calls() == 1)
            assert running.federation.available() == ["silo-1", "silo-2"]

            revoke_with_the_cli(ca_dir, "silo-2")
            # Any call notices the new file; no signal, no restart.
            other_stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10)

            with pytest.raises(grpc.RpcError) as ended:
                next(poll)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
            with pytest.raises(grpc.RpcError) as refused:
                revoked_stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "revoked" in refused.value.details()
            assert running.federation.available() == ["silo-1"]
            other_stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10)  # still admitted
    assert ("silo-2", DenialReason.REVOKED_WHILE_OPEN) in denied
    assert ("silo-2", DenialReason.REVOKED) in denied


def test_reload_on_demand_picks_up_a_revocation_and_the_refusal_is_audited(ca_dir, tmp_path):
    config = make_config(tmp_path, ca_dir, {"w": np.zeros(2, np.float32)})
    with Coordinator(config) as running:
        CertificateAuthority.load(ca_dir).revoke("silo-3")
        running.reload_revocations()  # what SIGHUP does
        assert running.revocations is not None and len(running.revocations.serials) == 1
        with open_channel(f"127.0.0.1:{running.port}", tls=tls(ca_dir, "silo-3")) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                fleet_pb2_grpc.FleetStub(channel).Join(fleet_pb2.JoinRequest(), timeout=10)
        denied = running.store.audit.entries(kinds=frozenset({AuditKind.DENIED}))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The revocation hit is in the audit log, with the identity and its address.
    assert [(e.identity, e.detail) for e in denied] == [("silo-3", "revoked")]
    assert denied[0].peer.startswith("ipv4:127.0.0.1:")


def test_coordinator_refuses_to_start_with_a_foreign_or_missing_configured_crl(ca_dir, tmp_path):
    foreign = CertificateAuthority.create(tmp_path / "foreign", federation="revfed")
    foreign.revoke("0x1")
    config = make_config(tmp_path, ca_dir, {"w": np.zeros(2, np.float32)})
    assert config.tls is not None
    with_foreign = dataclasses.replace(
        config, tls=dataclasses.replace(config.tls, crl=foreign.crl_path)
    )
    with pytest.raises(PKIError, match="not signed by the federation CA"):
        Coordinator(with_foreign)
    missing = dataclasses.replace(
        config,
        tls=TLSFiles(
            ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key, crl=tmp_path / "none.crl"
        ),
    )
    with pytest.raises(PKIError, match="tls.crl"):
        Coordinator(missing)


def fedpriv_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpriv", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_pki_list_shows_issued_expired_and_revoked_certificates(tmp_path):
    import datetime as dt

    root = tmp_path / "ca"
    assert fedpriv_cli("pki", "init", "--dir", str(root), "--federation", "listfed").returncode == 0
    for name in ("silo-1", "silo-2"):
        assert fedpriv_cli("pki", "issue", name, "--client", "--dir", str(root)).returncode == 0
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    CertificateAuthority.load(root, now=lambda: long_ago).issue(
        "silo-old", role=Role.CLIENT, out_dir=root, days=30
    )
    revoked = fedpriv_cli("pki", "revoke", "silo-2", "--dir", str(root))
    assert revoked.returncode == 0 and "revoked silo-2 serial" in revoked.stdout

    listing = fedpriv_cli("pki", "list", "--dir", str(root))

    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ROLE", "SERIAL", "STATE"]
    states = {line.split()[0]: line.split()[3] for line in lines[1:]}
    assert states == {"silo-1": "valid", "silo-2": "revoked", "silo-old": "expired"}
    again = fedpriv_cli("pki", "revoke", "silo-2", "--dir", str(root))
    assert again.returncode == 2 and "already revoked" in again.stderr
    renewed = fedpriv_cli("pki", "crl", "--dir", str(root))
    assert renewed.returncode == 0 and "(1 revoked)" in renewed.stdout


def test_an_upload_in_progress_is_ended_by_revocation_and_undone(ca_dir, tmp_path, monkeypatch):
    from fedpriv.coordinator import Store, read_checkpoint
    from fedpriv.coordinator import upload as upload_module
    from fedpriv.v1 import tensor_pb2
    from fedpriv.wire import Model, PayloadAssembler, layout_from_proto

    # Arrange: silo-2 streams its first chunk (of 100s), then holds its upload open.
    chunk_seen = threading.Event()
    original = upload_module.Upload.add_chunk

    def add_chunk(self, offset, data):
        original(self, offset, data)
        if self.silo == "silo-2":
            chunk_seen.set()

    monkeypatch.setattr(upload_module.Upload, "add_chunk", add_chunk)
    config = make_config(
        tmp_path,
        ca_dir,
        {"w": np.zeros(1024, np.float32)},
        chunk_bytes=1024,
        allowed=SILOS,
        num_rounds=1,
        min_clients=3,
        min_results=2,
        federated_evaluation=False,
    )
    release = threading.Event()
    with Coordinator(config) as coordinator:
        with (
            silo_thread(Delta(1.0), port=coordinator.port, tls=tls(ca_dir, "silo-1")) as one,
            silo_thread(Delta(3.0), port=coordinator.port, tls=tls(ca_dir, "silo-3")) as three,
            open_channel(f"127.0.0.1:{coordinator.port}", tls=tls(ca_dir, "silo-2")) as channel,
        ):
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(), timeout=10)
            while True:
                messages = list(stub.PullTask(fleet_pb2.PullTaskRequest(wait_s=2), timeout=30))
                if messages[0].task.kind == fleet_pb2.TASK_KIND_TRAIN:
                    break
            task = messages[0].task
            layout, _ = layout_from_proto(task.model)
            assembler = PayloadAssembler(layout)
            for message in messages[1:]:
                assembler.add(message.chunk.offset, message.chunk.data)
            assembler.finish()
            huge = Model.from_arrays({"w": np.full(1024, 100.0, np.float32)}, layout=layout)
            offset, data = next(iter(huge.chunks()))

            def upload():
                yield fleet_pb2.ResultMessage(
                    header=fleet_pb2.ResultHeader(
                        task_id=task.task_id,
                        round=task.round,
                        kind=task.kind,
                        num_examples=10,
                        update=layout.to_proto(),
                    )
                )
                yield fleet_pb2.ResultMessage(
                    chunk=tensor_pb2.TensorChunk(offset=offset, data=bytes(data))
                )
                release.wait(60)

            call = stub.PushResult.future(upload(), timeout=60)
            assert chunk_seen.wait(60)

            # Act: revoke with the real command; SIGHUP's path makes the reload immediate.
            revoke_with_the_cli(ca_dir, "silo-2")
            coordinator.reload_revocations()

            # Assert
            assert call.exception(timeout=30).code() == grpc.StatusCode.CANCELLED
            release.set()
            assert coordinator.wait(timeout_s=60)
            wait_silos([one, three])
    store = Store(config.state_dir)
    committed = store.last_committed()
    outcomes = {silo: outcome for _, silo, outcome, _ in store.participants(1)}
    store.close()
    assert outcomes["silo-1"] == outcomes["silo-3"] == "accepted"
    # The cut stream ends the upload short: it is undone, never summed (labelled
    # "rejected" as a short stream, or "dropped").
    assert outcomes["silo-2"] in ("rejected", "dropped")
    assert committed is not None
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    np.testing.assert_array_equal(final["w"], np.full(1024, 2.0, np.float32))


def test_the_daemon_rereads_the_list_on_sighup_and_keeps_running(ca_dir, tmp_path):
    import queue
    import signal

    (tmp_path / "coordinator.toml").write_text(f"""
[server]
address = "127.0.0.1:0"
[tls]
ca = "{ca_dir / "ca.crt"}"
cert = "{ca_dir / "coordinator.crt"}"
key = "{ca_dir / "coordinator.key"}"
[rounds]
num_rounds = 1
min_clients = 2
[model]
factory = "tests.apps:make_model"
[store]
dir = "{tmp_path / "state"}"
""")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "fedpriv", "coordinator", "--quiet", "--config"]
        + [str(tmp_path / "coordinator.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in daemon.stderr:
            lines.put(line)
        lines.put(None)  # the process closed its stderr: it ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(text: str) -> str:
        while (line := lines.get(timeout=60)) is not None:
            if text in line:
                return line
        raise AssertionError(f"the coordinator ended (rc={daemon.wait()}) before {text!r}")

    try:
        wait_for("coordinator listening")
        revoke_with_the_cli(ca_dir, "silo-1")
        daemon.send_signal(signal.SIGHUP)
        # The file watch or the signal loads it first; the signal's line comes either way.
        assert "newly revoked" in wait_for("SIGHUP:")
        assert daemon.poll() is None  # SIGHUP no longer ends the process
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        reader.join(60)
        daemon.stderr.close()
