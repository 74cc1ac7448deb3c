"""`fedpriv audit-log STATE_DIR` as operators run it: a real coordinator, real processes."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import numpy as np

from fedpriv.coordinator import Coordinator
from fedpriv.transport import open_channel
from fedpriv.v1 import fleet_pb2, fleet_pb2_grpc
from tests.helpers import make_config
from tests.integration.test_processes import ROOT, fedpriv
from tests.integration.test_status import status


def audit_log(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fedpriv("audit-log", *args), cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_audit_log_prints_joins_leaves_and_admin_calls_filtered_by_identity_and_kind(tmp_path, pki):
    # Arrange: silo-a joins and leaves; the operator asks for the status
    config = dataclasses.replace(
        make_config(tmp_path, pki.root, {"w": np.zeros(4, np.float32)}, min_clients=2),
        operators=frozenset({"operator"}),
    )
    with Coordinator(config) as coordinator:
        port = coordinator.port
        with open_channel(f"127.0.0.1:{port}", tls=pki.tls("silo-a")) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.Join(fleet_pb2.JoinRequest(sdk_version="test-sdk"), timeout=5)
            stub.Leave(fleet_pb2.LeaveRequest(reason="maintenance"), timeout=5)
        assert status(tmp_path, pki, port, "operator").returncode == 0
        # Act: read while the coordinator runs
        table = audit_log(str(config.state_dir))
        silo_a = audit_log(str(config.state_dir), "--identity", "silo-a", "--json")
        admin = audit_log(str(config.state_dir), "--kind", "admin", "--kind", "leave")
    # Assert
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["time", "(UTC)", "kind", "identity", "peer"]
    assert [line.split()[1:3] for line in lines[1:]] == [
        ["join", "silo-a"],
        ["leave", "silo-a"],
        ["admin", "operator"],
    ]
    assert "sdk test-sdk" in lines[1] and "maintenance" in lines[2] and "Admin.Status" in lines[3]
    records = [json.loads(line) for line in silo_a.stdout.splitlines()]
    assert [(r["kind"], r["identity"], r["detail"]) for r in records] == [
        ("join", "silo-a", "sdk test-sdk"),
        ("leave", "silo-a", "maintenance"),
    ]
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") and r["time"].endswith("Z") for r in records)
    assert [line.split()[1] for line in admin.stdout.splitlines()[1:]] == ["leave", "admin"]


def test_audit_log_refuses_an_unknown_kind_and_a_folder_without_state(tmp_path):
    unknown = audit_log(str(tmp_path), "--kind", "joins")
    missing = audit_log(str(tmp_path / "nowhere"))
    assert unknown.returncode == 2 and "--kind joins: not an audit kind" in unknown.stderr
    assert "join, leave, gone, rejected, duplicate, takeover, denied, admin" in unknown.stderr
    assert missing.returncode == 2 and "point at a coordinator's state folder" in missing.stderr
